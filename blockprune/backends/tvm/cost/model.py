"""Predicted time of one Linear layer (per form, block and density) and of a whole model, per target.

Why: the planner (``blockprune plan``) must compare thousands of per-layer choices without
compiling any of them. Two models answer the same questions:

* :class:`MeasuredCost` reads a ``blockprune calibrate`` table (per layer shape and block: the
  dense TVM matmul time and the BSR kernel time at each swept density). The sweep is noisy
  (neighbouring densities can swap order on a shared machine), so each sweep is first made
  non-decreasing in density (pool-adjacent-violators: the least-squares monotone fit), then
  interpolated linearly. Below the lowest measured density time falls in proportion to density;
  shapes not in the table take the nearest measured shape of the same block, scaled by the
  multiply-add count; other row counts (batch x sequence) scale linearly.
* :class:`AnalyticCost` predicts from the target's stated core (:mod:`.hardware`): a layer takes
  ``max(compute, memory)`` with compute = multiply-adds / (peak x efficiency) and memory = bytes
  streamed / DRAM bandwidth, plus a fixed call overhead for BSR. The efficiencies (the fraction
  of peak the dense schedule and each block's BSR kernel reach) are fitted on this host's
  measured table and assumed to carry over to NEON; :func:`analytic_error` reports how far the
  analytic model is from that table on x86 itself.

Both add the **non-linear remainder** (attention matmuls, softmax, LayerNorm, embeddings, VM
allocation), a per-model constant measured from the per-kernel time shares of the compiled
default flow (``data/remainder_x86-64[-avx512].json``, per host vector unit like the calibrate
tables); for other models it scales with layers x tokens x hidden size, and for other targets
with the ratio of peak throughput (both stated assumptions).

Mixed models: on the Zen 3 (AVX2), dense Linear kernels in a compiled model that also holds BSR
layers measured 1.35-1.8x slower than in the all-dense build (a backend effect, not understood);
the planner charges dense layers ``mixed_dense_factor`` (1.6) there whenever the plan holds BSR
layers (:meth:`CostModel.mixed_dense_factor`). On the AVX-512 Xeon the same kernels ran at the
same speed in both builds, so its factor is 1.0.

In-model factors: ``calibrate`` times each kernel alone, with its weights hot in L2 and no
epilogue; inside the compiled model the weights come from L3 and bias/residual/GELU epilogues run.
On the AVX-512 Xeon the dense Linear kernels took 1.18x their table time in the all-dense build and
16x1 BSR 1.32x (1x32 1.11x), measured from the default flow's kernel shares; without them the
plans ran 10-13% slower than predicted. ``in_model_factors`` in the remainder table; 1.0 on the
Zen 3, where the mixed-build factor was measured instead.

Not modelled: ``compress``'s compaction (FFN neurons or heads whose blocks are all pruned are cut
out, a smaller dense or BSR layer). It only makes a layer faster, so a plan with large blocks at
high ratios can run faster than predicted (MiniLM 32x32 at 0.8: predicted 14.6 ms, forced BSR
measured 14.9 ms, the compacting default flow 9.0 ms; ``benchmarks/results/plan.md``).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from blockprune.backends.tvm.cost.calibrate import BreakEvenTable, default_break_even_table
from blockprune.backends.tvm.cost.hardware import CoreSpec, core_spec, host_core
from blockprune.blocks import BlockShape
from blockprune.errors import BlockpruneError

REMAINDER_TABLES = {"avx2": Path(__file__).resolve().parent / "data" / "remainder_x86-64.json",
                    "avx512": Path(__file__).resolve().parent / "data" / "remainder_x86-64-avx512.json"}
REMAINDER_TABLE = REMAINDER_TABLES["avx2"]
BSR_CALL_OVERHEAD_MS = 0.01  # analytic: launch + row-pointer walk of one BSR call


@dataclass(frozen=True)
class ModelShape:
    """What the remainder depends on: encoder layers, hidden size, rows per call (batch x seq)."""

    num_layers: int
    hidden_size: int
    rows: int = 128


@dataclass
class LayerTime:
    """Predicted ms of one layer in the form the backend will use (the faster one)."""

    ms: float
    form: str  # "dense" or "bsr"
    dense_ms: float
    bsr_ms: float | None


def isotonic(y: Iterable[float]) -> np.ndarray:
    """Least-squares non-decreasing fit of ``y`` (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in y:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    return np.concatenate([np.full(int(c), s / c) for s, c in blocks])


class CostModel:
    """Interface of both cost models (times in ms at one thread)."""

    target: str = ""
    isa: str = "avx2"  # the x86 vector unit whose remainder table and mixed factor apply
    measured: bool = False
    source: str = ""
    blocks: tuple[str, ...] = ()

    def dense_ms(self, n: int, k: int, rows: int) -> float:
        raise NotImplementedError

    def bsr_ms(self, n: int, k: int, block: str, density: float, rows: int) -> float | None:
        raise NotImplementedError

    def remainder_ms(self, shape: ModelShape) -> float:
        raise NotImplementedError

    def assumptions(self) -> list[str]:
        return []

    def mixed_dense_factor(self) -> float:
        """Slow-down of a dense layer in a model that also holds BSR layers (measured on x86)."""
        return float(_remainder_data(self.isa).get("mixed_dense_factor", 1.0))

    def in_model_factor(self, block: str | None) -> float:
        """In-model time of a Linear kernel over its calibrate time (``None``: dense), measured per
        host class from the compiled default flow's kernel shares; 1.0 where not measured."""
        f = _remainder_data(self.isa).get("in_model_factors") or {}
        if block is None:
            return float(f.get("dense", 1.0))
        bsr = f.get("bsr") or {}
        return float(bsr.get(str(block), bsr.get("default", 1.0)))

    def layer(self, n: int, k: int, block: str, density: float, rows: int) -> LayerTime:
        """The faster of dense and BSR for ``W[n, k]`` at ``density`` (what the Policy will pick)."""
        dense = self.dense_ms(n, k, rows)
        bsr = None
        b = BlockShape.parse(block)
        if density < 1.0 and n % b.rows == 0 and k % b.cols == 0:
            bsr = self.bsr_ms(n, k, str(b), density, rows)
        if bsr is not None and bsr < dense:
            return LayerTime(bsr, "bsr", dense, bsr)
        return LayerTime(dense, "dense", dense, bsr)


@functools.lru_cache(maxsize=None)
def _remainder_data(isa: str = "avx2") -> dict:
    """The remainder table measured on an x86 host with vector unit ``isa`` (AVX2's otherwise).
    Read once: the planner asks for its factors on every layer option (read-only to callers)."""
    return json.loads(REMAINDER_TABLES.get(isa, REMAINDER_TABLE).read_text())


def measured_remainder_ms(shape: ModelShape, isa: str = "avx2") -> tuple[float, str]:
    """x86 remainder: the measured constant of a model of the same size, else the per-element rate."""
    data = _remainder_data(isa)
    scale = shape.rows / data["batch_seq"][1]
    for name, m in data["models"].items():
        if (m["num_layers"], m["hidden_size"]) == (shape.num_layers, shape.hidden_size):
            return m["ms"] * scale, f"measured for {name} (default_flow per-kernel shares)"
    ms = data["ns_per_layer_token_hidden"] * 1e-6 * shape.num_layers * shape.rows * shape.hidden_size
    return ms, f"{data['ns_per_layer_token_hidden']:g} ns per layer x token x hidden (fitted on MiniLM, BERT-base)"


@dataclass
class _Sweep:
    n: int
    k: int
    densities: np.ndarray  # ascending
    ms: np.ndarray  # monotone fit, same order
    dense_ms: float


class MeasuredCost(CostModel):
    """Times from a ``blockprune calibrate`` table (see the module docstring for the rules)."""

    measured = True

    def __init__(self, table: BreakEvenTable | None = None, source: str = "") -> None:
        self.table = table or default_break_even_table()
        self.target = self.table.target
        self.isa = self.table.isa or "avx2"
        self.source = source or f"calibrate table ({self.table.target}, M={self.table.m}, measured {self.table.measured})"
        self.sweeps: dict[str, list[_Sweep]] = {}
        for e in self.table.entries:
            pts = sorted((float(d), float(t)) for d, t in e.sweep_ms.items())
            d = np.array([p[0] for p in pts])
            self.sweeps.setdefault(e.block, []).append(_Sweep(e.n, e.k, d, isotonic(p[1] for p in pts), e.dense_ms))
        self.blocks = tuple(self.sweeps)
        self._dense = {(e.n, e.k): e.dense_ms for e in self.table.entries}

    def _nearest(self, sweeps: list, n: int, k: int) -> tuple[object, float]:
        s = min(sweeps, key=lambda x: (abs(math.log(x.n * x.k / (n * k))), abs(math.log(x.n / n))))
        return s, (n * k) / (s.n * s.k)

    def dense_ms(self, n: int, k: int, rows: int) -> float:
        """In-model ms of a dense ``W[n, k]``: the table's time x the host's in-model factor."""
        f = self.in_model_factor(None)
        if (n, k) in self._dense:
            return f * self._dense[(n, k)] * rows / self.table.m
        shapes = [_Sweep(a, b, np.zeros(0), np.zeros(0), t) for (a, b), t in self._dense.items()]
        s, scale = self._nearest(shapes, n, k)
        return f * s.dense_ms * scale * rows / self.table.m

    def bsr_ms(self, n: int, k: int, block: str, density: float, rows: int) -> float | None:
        sweeps = self.sweeps.get(str(block))
        if not sweeps:
            return None
        s, scale = self._nearest(sweeps, n, k)
        lo = float(s.densities[0])
        if density < lo:
            t = float(s.ms[0]) * density / lo
        else:
            t = float(np.interp(density, s.densities, s.ms))
        return self.in_model_factor(block) * t * scale * rows / self.table.m

    def remainder_ms(self, shape: ModelShape) -> float:
        return measured_remainder_ms(shape, self.isa)[0]

    def assumptions(self) -> list[str]:
        return [f"Linear layers: {self.source}; sweeps made non-decreasing in density, interpolated linearly",
                "below the lowest measured density, time in proportion to density; other shapes: nearest measured "
                "shape scaled by multiply-adds; other batch x seq: linear in rows",
                "remainder (attention, softmax, LayerNorm, ...): per-model constant from "
                "benchmarks/results/default_flow.json kernel shares",
                f"in-model factors over the table (weights from L3, epilogues): dense x{self.in_model_factor(None):g}, "
                f"BSR 16x1 x{self.in_model_factor('16x1'):g}, 1x32 x{self.in_model_factor('1x32'):g}, others "
                f"x{self.in_model_factor('4x4'):g}",
                f"dense layers of a plan that also has BSR layers: x{self.mixed_dense_factor():g} (measured: dense kernels "
                "run slower in mixed builds)"]


@dataclass
class Efficiencies:
    """Fraction of the core's peak the TVM kernels reach (fitted on the x86 host's table), in two
    regimes: weights that fit the core's L2 and weights streamed from beyond it (``*_spill``).

    Why two: on the AVX-512 Xeon the same kernels ran at half their in-L2 rate once a layer's
    (kept) weights outgrew the 2 MiB L2 (BERT-base FFN: dense 74 vs 146 GFLOP/s; BSR 3.6x slower
    at density 0.5 than 0.3). On that host's table one efficiency per kernel is 19% off on average,
    two are 17% off; the split matters most on targets with small L2s (Cortex-A72: 1 MiB shared)."""

    dense: float
    bsr: dict[str, float] = field(default_factory=dict)
    fitted_on: str = ""
    dense_spill: float | None = None
    bsr_spill: dict[str, float] = field(default_factory=dict)

    def dense_eff(self, spills: bool) -> float:
        return (self.dense_spill or self.dense) if spills else self.dense

    def bsr_eff(self, block: str, spills: bool) -> float | None:
        if spills and block in self.bsr_spill:
            return self.bsr_spill[block]
        return self.bsr.get(block, self.bsr_spill.get(block))


def weight_bytes(n: int, k: int, density: float = 1.0, block: BlockShape | None = None) -> float:
    """Bytes of weights one call streams: the kept values, plus one int32 column index per block."""
    idx = 4.0 * density * n * k / (block.rows * block.cols) if block is not None else 0.0
    return 4.0 * density * n * k + idx


def fit_efficiencies(table: BreakEvenTable, core: CoreSpec) -> Efficiencies:
    """Median over the table's points of useful multiply-adds / (peak x measured time), separately
    for points whose weights fit the host core's L2 and points whose weights do not.

    BSR points with density >= 0.2 only (the sweep's own range); the dense path from each shape's
    dense time. Medians, so a noisy point does not move the fit."""
    peak = core.peak_gflops * 1e9
    l2 = core.l2_kib * 1024.0
    m = table.m
    dense: dict[bool, list[float]] = {False: [], True: []}
    per_block: dict[bool, dict[str, list[float]]] = {False: {}, True: {}}
    for e in table.entries:
        flops = 2.0 * m * e.n * e.k
        dense[weight_bytes(e.n, e.k) > l2].append(flops / (peak * e.dense_ms * 1e-3))
        b = BlockShape.parse(e.block)
        for d, t in e.sweep_ms.items():
            d = float(d)
            if d < 0.2 or t <= BSR_CALL_OVERHEAD_MS:
                continue
            spills = weight_bytes(e.n, e.k, d, b) > l2
            per_block[spills].setdefault(e.block, []).append(flops * d / (peak * (t - BSR_CALL_OVERHEAD_MS) * 1e-3))

    def med(v: list[float]) -> float | None:
        return float(np.median(v)) if v else None

    fit = med(dense[False]) or med(dense[True])
    return Efficiencies(float(fit), {b: float(np.median(v)) for b, v in per_block[False].items()},
                        f"{table.target} ({table.isa or 'avx2'}) table measured {table.measured} (M={m})",
                        dense_spill=med(dense[True]),
                        bsr_spill={b: float(np.median(v)) for b, v in per_block[True].items()})


class AnalyticCost(CostModel):
    """Roofline-style prediction from the target's stated core and the host-fitted efficiencies."""

    measured = False

    def __init__(self, target: str, efficiencies: Efficiencies | None = None,
                 host_table: BreakEvenTable | None = None, core: CoreSpec | None = None) -> None:
        self.core = core or core_spec(target)
        self.target = target
        host = host_table or default_break_even_table()
        self.isa = host.isa or "avx2"  # the host whose remainder and mixed factor are scaled over
        self.eff = efficiencies or fit_efficiencies(host, host_core(self.isa))
        self.blocks = tuple(dict.fromkeys([*self.eff.bsr, *self.eff.bsr_spill]))
        self.source = f"analytic ({self.core.name}: {self.core.note})"

    def _mem_ms(self, nbytes: float) -> float:
        return nbytes / (self.core.dram_gbs * 1e9) * 1e3

    def _spills(self, nbytes: float) -> bool:
        return nbytes > self.core.l2_kib * 1024.0

    def dense_ms(self, n: int, k: int, rows: int) -> float:
        eff = self.eff.dense_eff(self._spills(weight_bytes(n, k)))
        compute = 2.0 * rows * n * k / (self.core.peak_gflops * 1e9 * eff) * 1e3
        return max(compute, self._mem_ms(4.0 * (n * k + rows * k + rows * n)))

    def bsr_ms(self, n: int, k: int, block: str, density: float, rows: int) -> float | None:
        b = BlockShape.parse(block)
        e = self.eff.bsr_eff(str(b), self._spills(weight_bytes(n, k, density, b)))
        if e is None:
            return None
        compute = 2.0 * rows * n * k * density / (self.core.peak_gflops * 1e9 * e) * 1e3
        nbytes = 4.0 * (density * n * k + rows * k + rows * n) + 4.0 * density * n * k / (b.rows * b.cols)
        return BSR_CALL_OVERHEAD_MS + max(compute, self._mem_ms(nbytes))

    def remainder_ms(self, shape: ModelShape) -> float:
        host = host_core(self.isa)
        return measured_remainder_ms(shape, self.isa)[0] * host.peak_gflops / self.core.peak_gflops

    def assumptions(self) -> list[str]:
        c = self.core
        l3 = f", L3 {c.l3_kib} KiB" if c.l3_kib else ", no L3"
        return [f"core: {c.name} ({c.note}); {c.isa} {c.lanes} float32 lanes x {c.fma_pipes} FMA pipe(s) x "
                f"{c.ghz:g} GHz = {c.peak_gflops:.1f} GFLOP/s peak; L1d {c.l1d_kib} KiB, L2 {c.l2_kib} KiB{l3}; "
                f"DRAM {c.dram_gbs:g} GB/s (one core)",
                "layer time = max(multiply-adds / (peak x efficiency), bytes / DRAM bandwidth)"
                f" (+{BSR_CALL_OVERHEAD_MS} ms per BSR call); the efficiency is the in-L2 one while the layer's "
                "kept weights fit this core's L2, the streaming one beyond",
                f"efficiencies fitted on the {self.eff.fitted_on}, assumed the same on this target: dense "
                f"{self.eff.dense:.2f} in L2 / {self.eff.dense_eff(True):.2f} beyond, BSR in L2 "
                + ", ".join(f"{b} {v:.2f}" for b, v in self.eff.bsr.items())
                + "; beyond L2 " + (", ".join(f"{b} {v:.2f}" for b, v in self.eff.bsr_spill.items()) or "as in L2"),
                "remainder (attention, softmax, LayerNorm, ...): the x86 per-model constant scaled by the ratio "
                "of peak throughput",
                f"dense layers of a plan that also has BSR layers: x{self.mixed_dense_factor():g} (as measured on x86)"]


def analytic_error(table: BreakEvenTable | None = None) -> dict[str, float]:
    """How far the analytic model, applied to the x86 host, is from that host's measured table.

    Relative error |analytic - measured| / measured over every dense point and every swept BSR
    point (the measured side made monotone first, as :class:`MeasuredCost` uses it)."""
    table = table or default_break_even_table()
    analytic = AnalyticCost(table.target, host_table=table, core=host_core(table.isa or "avx2"))
    measured = MeasuredCost(table)
    errs_dense, errs_bsr = [], []
    for e in table.entries:
        errs_dense.append(abs(analytic.dense_ms(e.n, e.k, table.m) / e.dense_ms - 1.0))
        for d in e.sweep_ms:
            d = float(d)
            if d >= 1.0:
                continue
            got = analytic.bsr_ms(e.n, e.k, e.block, d, table.m)
            ref = measured.bsr_ms(e.n, e.k, e.block, d, table.m)
            if got is not None and ref:
                errs_bsr.append(abs(got / ref - 1.0))
    both = errs_dense + errs_bsr
    return {"dense_mean_abs_rel": float(np.mean(errs_dense)), "bsr_mean_abs_rel": float(np.mean(errs_bsr)),
            "bsr_median_abs_rel": float(np.median(errs_bsr)), "all_mean_abs_rel": float(np.mean(both)),
            "points": len(both)}


class BoardMeasuredCost(MeasuredCost):
    """Linear layers timed on the board itself (``calibrate --rpc``).

    What the board's table cannot say is stated, not hidden: on a non-x86 board the in-model
    factors and the mixed-build factor (measured on x86 hosts) are taken as 1, and the remainder
    (attention, softmax, LayerNorm) comes from the target's analytic model."""

    def __init__(self, table: BreakEvenTable, address: str) -> None:
        super().__init__(table, source=f"calibrate over RPC at {address} ({table.target}, M={table.m}, "
                                       f"measured {table.measured})")
        self.x86 = table.isa in REMAINDER_TABLES
        self.analytic = None
        if not self.x86:
            from blockprune.backends.tvm.cost.hardware import CORES

            self.analytic = AnalyticCost(table.target) if table.target in CORES else None

    def in_model_factor(self, block: str | None) -> float:
        return super().in_model_factor(block) if self.x86 else 1.0

    def mixed_dense_factor(self) -> float:
        return super().mixed_dense_factor() if self.x86 else 1.0

    def remainder_ms(self, shape: ModelShape) -> float:
        if self.analytic is not None:
            return self.analytic.remainder_ms(shape)
        return super().remainder_ms(shape)

    def assumptions(self) -> list[str]:
        if self.x86:
            return super().assumptions()
        return [f"Linear layers: {self.source}; sweeps made non-decreasing in density, interpolated linearly; other "
                "shapes: nearest measured shape scaled by multiply-adds",
                "in-model and mixed-build factors: 1 (measured on x86 hosts only)",
                "remainder (attention, softmax, LayerNorm, ...): " + (
                    "analytic, the x86 remainder scaled by peak FLOP/s (unmeasured on the board)"
                    if self.analytic is not None else "the x86 host's measured constant (no preset for this target)")]


def board_table(target: str, address: str, shapes, blocks, m: int, cache: Path | None = None,
                progress: bool = True) -> tuple[BreakEvenTable, bool]:
    """The calibrate table of ``target`` timed over RPC at ``address`` for ``shapes`` x ``blocks``
    (cached in ``cache``, keyed by all of them); (table, True) when read from the cache."""
    from blockprune.backends.tvm.cost.calibrate import calibrate

    key = {"target": target, "rpc": address, "shapes": sorted([int(n), int(k)] for n, k in shapes),
           "blocks": sorted(blocks), "m": int(m)}
    if cache is not None and cache.is_file():
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return BreakEvenTable.load_dict(data["table"]), True
        except (OSError, ValueError, KeyError, TypeError, BlockpruneError):
            pass
    table = calibrate([tuple(s) for s in key["shapes"]], blocks=key["blocks"], target=target, m=m, rpc=address,
                      progress=progress)
    if cache is not None:
        from blockprune.io import atomic_path

        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache, suffix=".json") as tmp:
            tmp.write_text(json.dumps({"key": key, "table": table.to_dict()}, indent=1) + "\n")
    return table, False


def cost_model_for(target: str, table_path: str | None = None, rpc: str | None = None,
                   board: BreakEvenTable | None = None) -> CostModel:
    """The cost model ``plan`` uses for ``target``.

    ``rpc`` with ``board``: the table timed on the board over RPC (``board_table``); ``rpc`` alone
    is an error naming the fix (the shapes to time come from the model: ``plan`` measures them).
    ``table_path``: a calibrate JSON (measured on the target itself). x86-64 without a table: the
    shipped table of this machine class. Other targets without a table: the analytic model
    (predictions flagged unmeasured)."""
    if rpc:
        if board is None:
            raise BlockpruneError(
                f"--rpc {rpc}: no table was timed on the board",
                "let `blockprune plan --rpc HOST:PORT` time the model's shapes there, or run `blockprune calibrate "
                "--target T --rpc HOST:PORT -o board.json` and give `plan --cost-table board.json`")
        if board.target != target:
            raise BlockpruneError(f"the table timed over RPC is for {board.target!r}, not {target!r}",
                                  f"plan with --target {board.target}")
        return BoardMeasuredCost(board, rpc)
    if table_path:
        table = BreakEvenTable.load(table_path)
        if table.target != target:
            raise BlockpruneError(f"cost table {table_path!r} was measured for {table.target!r}, not {target!r}",
                                  f"calibrate on the {target} target, or plan with --target {table.target}")
        return MeasuredCost(table, source=f"calibrate table {table_path} ({table.target}, measured {table.measured})")
    if target == "x86-64":
        return MeasuredCost()
    return AnalyticCost(target)
