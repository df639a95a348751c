"""Measured break-even densities: below which density a block-sparse layer beats dense, per target.

Why measure: the density at which our BSR kernel overtakes the dense path depends on the layer
shape, the block shape and the CPU (1x32 row segments need ~0.5 density on an FFN-down shape,
16x1 columns are already as fast as dense at 1.0 on some). A single guessed threshold either
leaves speed on the table or makes layers slower. ``calibrate`` sweeps densities for each
(shape, block), times the TVM BSR kernel against the TVM dense matmul compiled with the project's
pipeline, and interpolates the crossing. The resulting ``BreakEvenTable`` (JSON) is what the
passes' ``Policy`` reads (`blockprune compress --break-even-file`).

Calibration runs on this machine (targets this host can execute) or, with ``rpc``, on a board
through TVM RPC (``calibrate_rpc``): compiled here, timed there.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from blockprune.blocks import BlockShape
from blockprune.errors import BlockpruneError
from blockprune.io import atomic_path

TABLE_FORMAT = "blockprune.break-even/1"
DEFAULT_DENSITIES = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
DEFAULT_BLOCKS = ("1x32", "16x1", "4x4", "32x32")


def break_even_density(densities: Sequence[float], bsr_seconds: Sequence[float], dense_seconds: float) -> float | None:
    """The density at which the BSR kernel takes as long as the dense path.

    Why interpolate: the sweep is coarse (steps of 0.1) and the policy needs one threshold.
    Points are sorted by density; walking from dense to sparse, the first pair where BSR goes
    from slower (or equal) to faster than dense brackets the crossing, and the crossing is
    interpolated linearly in time. Returns the highest tested density when BSR is already faster
    there (break-even at or above it; a lower bound) and None when BSR never beats dense.
    """
    if len(densities) != len(bsr_seconds) or not densities:
        raise ValueError("densities and bsr_seconds must be non-empty and of equal length")
    pts = sorted(zip(densities, bsr_seconds), key=lambda p: -p[0])
    if pts[0][1] < dense_seconds:
        return float(pts[0][0])
    for (d_hi, t_hi), (d_lo, t_lo) in zip(pts, pts[1:]):
        if t_hi >= dense_seconds > t_lo:
            frac = (t_hi - dense_seconds) / (t_hi - t_lo)
            return float(d_hi + frac * (d_lo - d_hi))
    return None


def block_sparse_weight(rng: np.random.Generator, n: int, k: int, block: str, density: float) -> np.ndarray:
    """W[n, k] keeping round(density * blocks) blocks chosen uniformly at random (at least one)."""
    r, c = (int(v) for v in block.split("x"))
    gr, gc = n // r, k // c
    keep = np.zeros(gr * gc, dtype=bool)
    keep[rng.permutation(gr * gc)[: max(1, round(density * gr * gc))]] = True
    mask = np.repeat(np.repeat(keep.reshape(gr, gc), r, 0), c, 1)
    return rng.standard_normal((n, k)).astype(np.float32) * mask


def dense_matmul_executable(wt: np.ndarray, x_shape, preset):
    """The dense path for one Linear (``x @ wt``, ``wt`` = W^T constant) compiled with our pipeline."""
    from tvm import relax

    from blockprune.backends.tvm.pipeline.compile import compile_relax

    bb = relax.BlockBuilder()
    xv = relax.Var(name="x", ty=relax.TensorType(shape=list(x_shape), dtype="float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(xv, relax.const(np.ascontiguousarray(wt))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return compile_relax(bb.get(), preset)


def tvm_dense_call(wt: np.ndarray, x: np.ndarray, target: str = "host") -> Callable[[], object]:
    """The TVM dense path for one Linear (``x @ wt``, ``wt`` = W^T constant), compiled with our pipeline."""
    import tvm
    from tvm import relax

    from blockprune.backends.tvm.targets.presets import resolve_target

    ex = dense_matmul_executable(wt, x.shape, resolve_target(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    xt = tvm.runtime.tensor(x)
    got = vm["main"](xt).numpy()
    err = float(np.abs(got - x @ wt).max())
    if err > 1e-2:
        raise RuntimeError(f"TVM dense matmul differs from numpy by {err}")
    fn = vm["main"]
    return lambda: fn(xt)


def bsr_call(w: np.ndarray, x: np.ndarray, block: str, target: str = "host") -> tuple[Callable[[], object], float]:
    """The TVM BSR kernel for ``W[n, k]`` (and its max error vs numpy)."""
    from blockprune.backends.tvm.kernels.bsr_kernel import build_bsr_kernel
    from blockprune.bsr import dense_to_bsr

    bsr = dense_to_bsr(w, block)
    kernel = build_bsr_kernel(x.shape, w.shape[0], block, target=target)
    err = float(np.abs(kernel(x, bsr) - x @ w.T).max())
    return kernel.prepared_call(x, bsr), err


@dataclass
class BreakEven:
    k: int  # in features
    n: int  # out features
    block: str
    density: float | None  # None: BSR never beat dense in the sweep
    dense_ms: float = 0.0
    sweep_ms: dict[str, float] = field(default_factory=dict)  # density -> BSR ms


@dataclass
class BreakEvenTable:
    """Measured break-evens for one target; ``lookup`` answers the Policy's question per layer."""

    target: str
    m: int
    threads: int
    entries: list[BreakEven]
    default: float = 0.6
    machine: str = ""
    measured: str = ""
    isa: str = ""  # vector unit the kernels were compiled for (avx2, avx512, neon); "" in old tables

    def lookup(self, out_f: int, in_f: int, block: str) -> tuple[float, str]:
        """(break-even density, where it came from) for a layer ``W[out_f, in_f]`` with ``block``."""
        same_block = [e for e in self.entries if e.block == str(block)]
        exact = [e for e in same_block if (e.n, e.k) == (out_f, in_f)]
        if exact:
            e, how = exact[0], "measured"
        elif same_block:
            size = out_f * in_f
            e = min(same_block, key=lambda x: abs(np.log((x.n * x.k) / size)))
            how = f"measured on {e.n}x{e.k}"
        else:
            return self.default, f"default (no {block} measurement)"
        return (0.0 if e.density is None else e.density), f"{how} on {self.target}"

    def to_dict(self) -> dict:
        return {"format": TABLE_FORMAT, **asdict(self)}

    @classmethod
    def load_dict(cls, data: dict) -> "BreakEvenTable":
        data = dict(data)
        if data.pop("format", None) != TABLE_FORMAT:
            raise ValueError(f"format is not {TABLE_FORMAT}")
        entries = [BreakEven(**e) for e in data.pop("entries")]
        return cls(entries=entries, **data)

    def save(self, path: str | Path) -> Path:
        data = self.to_dict()
        path = Path(path)
        with atomic_path(path, suffix=".json") as tmp:
            tmp.write_text(json.dumps(data, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "BreakEvenTable":
        path = Path(path)
        if not path.is_file():
            raise BlockpruneError(f"break-even file {str(path)!r} does not exist",
                                  "create it with `blockprune calibrate --target ... -o FILE`")
        try:
            return cls.load_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError) as exc:
            raise BlockpruneError(f"break-even file {str(path)!r} is not a blockprune calibration ({exc})",
                                  "regenerate it with `blockprune calibrate`") from exc


DATA_DIR = Path(__file__).resolve().parent / "data"
# Shipped tables per x86 vector unit. The AVX2 one keeps its first name (older docs point at it).
SHIPPED_TABLES = {"avx2": DATA_DIR / "break_even_x86-64.json", "avx512": DATA_DIR / "break_even_x86-64-avx512.json"}
DEFAULT_TABLE = SHIPPED_TABLES["avx2"]


def host_isa() -> str:
    """The host's vector unit as the BSR kernels pick it (``avx512``, ``avx2``, ``sse``, ``neon``).

    Read from /proc/cpuinfo's flags (the same features LLVM's host CPU implies), so ``compress``
    does not load TVM just to choose a table."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "neon"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return "avx2"
    if "avx512f" in flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "sse"


def shipped_table_path(isa: str | None = None) -> Path:
    """The shipped table for ``isa`` (default: this host's); AVX2's for anything not measured.

    Why per vector unit: the same kernels run at different rates on AVX2 and AVX-512 hosts (the
    dense matmul ~1.8x, BSR 1.5-2.5x, and onnxruntime changes too), so a Zen 3 table misplaces
    every break-even and every plan on an AVX-512 Xeon (a "1.5x" plan ran 3.4x there)."""
    isa = isa or host_isa()
    return SHIPPED_TABLES.get(isa, DEFAULT_TABLE)


def default_break_even_table(isa: str | None = None) -> "BreakEvenTable":
    """The table shipped with blockprune for this host's vector unit (or ``isa``), measured with
    ``blockprune calibrate`` at 1 thread for MiniLM and BERT-base layer shapes and the fast blocks:
    AVX2 on an AMD EPYC Zen 3, AVX-512 on an Intel Xeon. ``compress`` uses it when the user gives
    neither ``--break-even`` nor a file: a guessed single threshold (0.6) kept layers dense that ran
    faster block-sparse (16x1 at 0.7 density). Shapes not in it use the nearest measured size for
    the same block; blocks not in it, 0.6.
    """
    table = BreakEvenTable.load(shipped_table_path(isa))
    if not table.isa:
        table.isa = "avx2"
    return table


class LocalTimer:
    """Times kernels on this machine (median process-CPU seconds of ``runs`` calls)."""

    def __init__(self, target: str, runs: int) -> None:
        self.target, self.runs = target, runs

    def dense_seconds(self, wt: np.ndarray, x: np.ndarray) -> float:
        from blockprune.bench_timing import time_calls

        return time_calls(tvm_dense_call(wt, x, self.target), self.runs)[1]

    def bsr_seconds(self, w: np.ndarray, x: np.ndarray, block: str) -> float:
        from blockprune.bench_timing import time_calls

        call, _ = bsr_call(w, x, block, self.target)
        return time_calls(call, self.runs)[1]

    def machine(self) -> str:
        from blockprune.bench_timing import cpu_name

        return f"{platform.machine()} {cpu_name()}".strip()

    def close(self) -> None:
        pass


def calibrate(shapes: Sequence[tuple[int, int]], blocks: Sequence[str] = DEFAULT_BLOCKS,
              densities: Sequence[float] = DEFAULT_DENSITIES, target: str = "host", m: int = 128,
              runs: int = 10, threads: int | None = None, progress: bool = True,
              rpc: str | None = None) -> BreakEvenTable:
    """Sweep every (out, in) shape and block; shapes a block does not divide are skipped.

    Without ``rpc`` the kernels run on this machine (a cross target is refused: emulated timings
    mean nothing). With ``rpc`` (``HOST:PORT`` of a TVM RPC server on the board) they are compiled
    here for ``target`` and timed there (``calibrate_rpc.RemoteTimer``)."""
    import os

    from tqdm.auto import tqdm

    from blockprune.backends.tvm.targets.presets import resolve_target

    preset = resolve_target(target)
    if rpc:
        from blockprune.backends.tvm.cost.calibrate_rpc import RemoteTimer, parse_address

        parse_address(rpc)  # a malformed address fails before anything is compiled
        timer: "LocalTimer | RemoteTimer" = RemoteTimer(rpc, preset, number=max(1, runs // 2), repeat=5)
    elif preset.is_cross:
        raise BlockpruneError(
            f"cannot calibrate {preset.name!r} here: its code does not run natively on this machine",
            "time it on the board: `blockprune calibrate --target ... --rpc HOST:PORT` with a TVM RPC server "
            "running there (timings under emulation mean nothing)",
        )
    else:
        timer = LocalTimer(target, runs)
    rng = np.random.default_rng(0)
    jobs = [(n, k, BlockShape.parse(b)) for (n, k) in shapes for b in blocks]
    jobs = [(n, k, b) for n, k, b in jobs if n % b.rows == 0 and k % b.cols == 0]
    entries = []
    bar = tqdm(jobs, desc="calibrate" + (f" over rpc://{rpc}" if rpc else ""), unit="shape x block",
               disable=not progress)
    dense_cache: dict[tuple[int, int], float] = {}
    try:
        for n, k, b in bar:
            bar.set_postfix_str(f"{n}x{k} {b}")
            x = rng.standard_normal((m, k)).astype(np.float32)
            if (n, k) not in dense_cache:
                w = rng.standard_normal((n, k)).astype(np.float32)
                dense_cache[(n, k)] = timer.dense_seconds(np.ascontiguousarray(w.T), x)
            dense_s = dense_cache[(n, k)]
            times = [timer.bsr_seconds(block_sparse_weight(rng, n, k, str(b), d), x, str(b)) for d in densities]
            entries.append(BreakEven(k, n, str(b), break_even_density(list(densities), times, dense_s),
                                     dense_s * 1e3, {f"{d:g}": t * 1e3 for d, t in zip(densities, times)}))
        machine = timer.machine()
    finally:
        timer.close()
    from blockprune.backends.tvm.kernels.bsr_kernel import vector_isa

    return BreakEvenTable(preset.name, m, threads or int(os.environ.get("TVM_NUM_THREADS", "1")), entries,
                          machine=machine, measured=str(date.today()), isa=vector_isa(preset).name)
