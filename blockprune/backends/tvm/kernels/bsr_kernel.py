"""TensorIR kernel for ``Y = X @ W^T (+ bias)`` with ``W[N, K]`` block-sparse (BSR, r x c).

This is exactly what a pruned transformer Linear computes: ``X[M, K]`` activations (or
``[B, S, K]``, taken as ``M = B*S``), ``W`` in the PyTorch ``[out, in]`` layout, block ``r``
along ``N`` (outputs) and ``c`` along ``K`` (inputs). TVM 0.27 has no sparse op, so we write
the loop nest ourselves, unrolled in Python, with explicit vectors: what LLVM receives is
already the register tile, and it only allocates registers and schedules.

Three layouts, chosen per block shape and target (:func:`choose_schedule`):

* ``n-lanes`` (blocks at least one vector tall: 16x1, 32x32, 4x4 on NEON): vectors run along
  the block's output rows. Block data is stored transposed, ``[nnzb, c, r]``, so the ``r``
  outputs of one input feature are contiguous; each FMA is ``acc[ti] += bcast(X[m, k]) * w``.
  No reduction at the end: the accumulators are rows of ``Y``.
* ``k-lanes`` (short blocks: 1x32 row segments, 4x4 on AVX2/AVX-512): an ``n-lanes`` vector
  would be 1-4 lanes wide. Instead vectors run along the flattened block ``[r, c]`` (stored
  as is), i.e. along input features, and each output is a sum over lanes. The horizontal sums
  are done for ``c`` accumulators at once by a shuffle tree (even+odd lanes of two vectors,
  log2(c) levels; LLVM turns it into vhaddps on x86), a few instructions per output instead
  of one per lane. The sums are staged per task and copied to ``Y`` as vectors.
* ``m-lanes`` (blocks one row tall on AVX-512: 1x32, 1x16 row segments, M >= 4 vectors):
  vectors run along M (tokens). X is transposed once per call into a workspace ``Xt[K, M]``
  (V x V tiles transposed in registers); for each block ``(o, c0)`` and ``kk < c`` the kernel
  does ``acc[mv] += bcast(W[o, c0+kk]) * Xt[c0+kk, mv-th vector]`` for the TM = 8 vectors of a
  token tile: one contiguous load per FMA (the minimum for a block one row tall, which gives an
  X value no reuse across outputs) and no horizontal sums. K is walked in slices whose ``Xt``
  rows stay in L1: a task's blocks are one flat list ordered by slice, then row
  (:func:`m_lanes_arrays`), each moving its row's accumulators in from and back out to the
  staged rows ``[outputs, TM]`` (no data-dependent branches); the staged rows are written to
  ``Y`` through in-register transposes, where the bias and epilogue are applied.

Common to both (see tvm-notes): parallel over chunks of block rows; inside a task, a tile of
``TI`` input rows is kept in L1 while the chunk's block rows stream by; accumulators are
separate small ``global``-scope buffers (< 1024 bytes each) so TVM makes them stack allocas
and LLVM keeps them in registers (a ``local`` or larger buffer becomes a heap workspace with a
load/store around every FMA). A long ``K`` is walked in slices (``k_chunk``) so the X slice
stays in L1; the row pointers are then per row and slice (:func:`chunked_indptr`). ``M`` is
static; a remainder of ``M % TI`` rows gets its own, narrower tile. ``nnzb`` is symbolic, so
one compiled kernel serves every layer of a shape.

Kernel signature: ``name(X, data, indices, indptr[, bias][, R], Y)`` with the middle arrays from
:func:`kernel_arrays` (destination-passing, as ``relax.call_tir`` wants).

Epilogue (``BSRKernelSpec.bias/gelu/residual``): the bias starts the accumulators; GELU and the
residual add ``R`` are applied to the finished accumulators as they are stored, so the output
is written once instead of once per elementwise op. GELU's erf is a rational approximation in
plain arithmetic (vectorises; libm's ``erff`` would be called once per element): our own fit
``erf(x) ~ x P(x^2) / Q(x^2)`` on ``|x| <= 4``, max error 6e-7 in float32 (:data:`ERF_P`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from blockprune.blocks import BlockShape
from blockprune.bsr import BSRMatrix
from blockprune.errors import BlockpruneError

from blockprune.backends.tvm.targets.presets import TargetPreset, export_fcompile, resolve_target

_MAX_ACC_BYTES = 1020  # one accumulator buffer must stay below TVM's 1024-byte stack limit
# More X rows per tile barely improves FMAs per load (TI/(TI+1) for n-lanes with one weight
# vector) but their K-long rows must share L1 with the weights streaming by.
_MAX_TILE_ROWS = 12
# The TI x k_chunk slice of X a task reuses across its block rows should stay in L1 (32 KB on
# Zen 3/4 and Cortex-A72/A53, 48-64 KB on newer cores) next to the streaming weights.
_X_TILE_BYTES = 24 * 1024


# --------------------------------------------------------------------------------------------
# Target vector units and schedules
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VectorISA:
    """What the register tile is sized for: float32 lanes and the vector register file."""

    name: str
    lanes: int  # float32 lanes per vector register
    registers: int  # architectural vector registers
    max_acc: int  # accumulators we allow at most (leave room for addresses, spills of LLVM)


_ISAS = {
    "avx512": VectorISA("avx512", 16, 32, 24),
    "avx2": VectorISA("avx2", 8, 16, 12),
    "sse": VectorISA("sse", 4, 16, 12),
    "neon": VectorISA("neon", 4, 32, 24),
}


def vector_isa(target: "TargetPreset | str | Any") -> VectorISA:
    """The vector unit of a target: NEON on aarch64; AVX-512 / AVX2 / SSE on x86 per -mcpu."""
    preset = resolve_target(target)
    if preset.arch == "aarch64":
        return _ISAS["neon"]
    from tvm.target import codegen

    tgt = preset.target()
    if codegen.llvm_cpu_has_features("avx512f", tgt):
        return _ISAS["avx512"]
    if codegen.llvm_cpu_has_features(["avx2", "fma"], tgt):
        return _ISAS["avx2"]
    return _ISAS["sse"]


@dataclass(frozen=True)
class BSRSchedule:
    """How the kernel is tiled; :func:`choose_schedule` picks one per shape and target."""

    layout: str  # "n-lanes" (data [nnzb, c, r]), "k-lanes" or "m-lanes" (data [nnzb, r*c])
    lanes: int  # vector length in float32 lanes
    tile_rows: int  # TI: rows of X per register tile (m-lanes: a multiple of lanes, tokens per task)
    row_chunk: int  # block rows per parallel task
    slots_per_pass: int = 0  # n-lanes: vectors of a block row accumulated at once (0: all)
    isa: str = ""
    k_chunk: int = 0  # input features per pass over a block row (0: all of K in one pass)
    x_pad: int = 0  # floats added to each X row in a packed copy (0: X read in place); see _x_pad

    def __post_init__(self) -> None:
        if self.layout not in ("n-lanes", "k-lanes", "m-lanes"):
            raise BlockpruneError(f"unknown BSR kernel layout {self.layout!r}", "use n-lanes, k-lanes or m-lanes")
        if self.lanes < 1 or self.tile_rows < 1 or self.row_chunk < 1:
            raise BlockpruneError(f"invalid BSR schedule {self}", "lanes, tile_rows, row_chunk must be >= 1")


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two dividing n, at most cap."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def _k_lanes_fits(block: BlockShape, lanes: int) -> bool:
    r, c = block.rows, block.cols
    if c >= lanes:
        return c % lanes == 0
    return lanes % c == 0 and (r * c) % lanes == 0


def choose_schedule(m: int, n: int, block: "BlockShape | str", target: Any = "host",
                    isa: VectorISA | None = None, k: int | None = None) -> BSRSchedule:
    """Pick layout and tile sizes for ``M x N`` output with ``r x c`` blocks on ``target``.

    ``n-lanes`` whenever a block is at least one vector tall (no reduction, full vectors),
    else ``k-lanes`` when the flattened block fills whole vectors, else ``n-lanes`` with a
    narrow vector (correct, slower; e.g. 2x2 blocks). With ``k`` given, a long K is split into
    passes whose X slice fits L1 (measured on Zen 3 at K=3072: 1x32 at 50% and 4x4 at 90%
    sparsity ran 1.4x faster in 768-wide slices; 16x1 and 32x32 were unchanged).
    """
    block = BlockShape.parse(block)
    isa = isa or vector_isa(target)
    cores = int(resolve_target(target).config.get("num-cores", 1) or 1)
    r, c, v = block.rows, block.cols, isa.lanes
    nb = max(1, n // r)
    k_lanes = r < v and _k_lanes_fits(block, v)
    # Enough tasks per core to balance uneven rows, long enough chunks to reuse the X tile; a
    # divisor of the block rows so that no task needs a bounds check. k-lanes stages a chunk's
    # outputs (row_chunk * r floats per X row) in a stack buffer that must stay < 1024 bytes.
    target_chunk = max(1, min(32, nb // (4 * cores)))
    if k_lanes:
        target_chunk = max(1, min(target_chunk, (_MAX_ACC_BYTES // 4) // r))
    row_chunk = max(d for d in range(1, target_chunk + 1) if nb % d == 0)
    if _use_m_lanes(m, block, isa):
        sch = _m_lanes_schedule(m, block, isa, row_chunk)
        if k is not None and k * sch.tile_rows * 4 > _XT_L2_BYTES:
            # Each chunk walks all of X^T; once X^T crowds L2, longer chunks re-read it less
            # often (measured, K=3072 M=128 1x32 at 80%: 128-row chunks 1.14x faster than 32),
            # while leaving >= 2 tasks per core.
            target = max(row_chunk, min(128, nb // (2 * cores)))
            row_chunk = max(d for d in range(1, target + 1) if nb % d == 0)
            sch = replace(sch, row_chunk=row_chunk)
        if k is not None:
            sch = replace(sch, k_chunk=_m_k_chunk(k, c, sch.tile_rows))
        return sch
    if k_lanes:
        sch = _k_lanes_schedule(m, block, isa, row_chunk)
    else:
        sch = _n_lanes_schedule(m, block, isa, row_chunk)
    if k is not None:
        sch = replace(sch, k_chunk=_k_chunk(k, c, sch.tile_rows), x_pad=_x_pad(k, sch.tile_rows))
    return sch


# m-lanes: the X^T slice of a K pass (k_chunk rows of TM tokens) that every block row of a task
# reads again; 32 KB leaves room in a 48 KB L1 for the staged rows. Measured on a Xeon with
# AVX-512 (TM = 128, 1x32 at 80%): 64-row slices ran 1.1-1.25x faster than one pass over K.
_XT_SLICE_BYTES = 32 * 1024
# m-lanes: an X^T above this shares L2 (1-2 MB per core) badly with Y and the weights.
_XT_L2_BYTES = 512 * 1024
# m-lanes accumulators per output row: enough independent FMA chains to cover the FMA latency
# (4 cycles x 2 ports), few enough to leave registers for the broadcast weight on AVX2.
_M_LANES_ACC = 8


def _use_m_lanes(m: int, block: BlockShape, isa: VectorISA) -> bool:
    """m-lanes for blocks one row tall on AVX-512 when M fills >= 4 vectors.

    Why: a 1xc block has no reuse of a loaded X value across outputs, so every FMA needs a load
    in any layout; k-lanes adds a horizontal sum per output on top, m-lanes does not. Measured on
    a Xeon with AVX-512, BERT-base shapes (M=128), 1x32 at 80%, 1 thread: 1.2-1.45x faster than
    k-lanes (1x16 at 70%: 1.1-1.3x). With 8-lane AVX2 code (znver3, timed on that Xeon) it was
    not faster (0.89-1.07x), so AVX2 (Zen 3) keeps k-lanes until measured there; NEON keeps
    k-lanes too (4-lane sums are cheap; m-lanes compiles and runs there, unmeasured).
    """
    return block.rows == 1 and isa.name == "avx512" and -(-m // isa.lanes) >= 4


def _m_lanes_schedule(m: int, block: BlockShape, isa: VectorISA, row_chunk: int) -> BSRSchedule:
    """TM tokens per task: up to _M_LANES_ACC vectors, the M tiles as even as whole vectors allow."""
    v = isa.lanes
    vecs = -(-m // v)
    tiles = -(-vecs // _M_LANES_ACC)
    tm = v * -(-vecs // tiles)
    return BSRSchedule("m-lanes", v, tm, row_chunk, isa=isa.name)


def _m_k_chunk(k: int, c: int, tm: int) -> int:
    """Largest divisor of K, a multiple of c, whose X^T slice fits _XT_SLICE_BYTES (0: one pass)."""
    if k * tm * 4 <= _XT_SLICE_BYTES:
        return 0
    limit = _XT_SLICE_BYTES // (4 * tm)
    fits = [d for d in range(c, limit + 1, c) if k % d == 0]
    return max(fits) if fits else 0


def _x_pad(k: int, tile_rows: int) -> int:
    """Padding (floats) for a packed copy of X when its rows alias in L1.

    Why: an L1 set index repeats every 4 KB (64 sets x 64 B on Zen 3 and the Cortex-A cores). With
    K = 3072 an X row is 12 KB, so the TI rows of a tile read at the same column all fall in one
    set; eight rows fill an 8-way set and every weight line evicts an X line. Measured on the
    BERT-base FFN output (768 x 3072, 1x32 at 80%): 26 GFLOP/s against 49 for the 3072 x 768 FFN
    input with the same work per row. One 64-byte pad per row spreads the rows over the sets; the
    copy (M x K floats once per call) costs a few percent of the product.
    """
    if tile_rows < 4 or (4 * k) % 4096:
        return 0
    return 16


def _k_chunk(k: int, c: int, tile_rows: int) -> int:
    """Largest divisor of K, a multiple of c, whose TI x k_chunk X slice fits _X_TILE_BYTES."""
    if tile_rows * k * 4 <= _X_TILE_BYTES:
        return 0
    limit = _X_TILE_BYTES // (4 * tile_rows)
    fits = [d for d in range(c, limit + 1, c) if k % d == 0]
    return max(fits) if fits else 0


def _n_lanes_schedule(m: int, block: BlockShape, isa: VectorISA, row_chunk: int) -> BSRSchedule:
    """Tile TI rows x P vectors: most FMAs per load, TI*P (acc) + P (weights) + 1 (X) registers.

    Per input feature the tile loads P weight vectors and broadcasts TI inputs for TI*P FMAs,
    so TI*P / (TI + P) is what to maximise; exceeding the register file makes LLVM spill an
    accumulator inside the loop (seen on AVX2 with 32x32 blocks: a 3x4 tile spilled and ran
    dense at 41 GFLOP/s, a 6x2 tile at 71-75).
    """
    r, v = block.rows, isa.lanes
    lanes = r if r < v else _pow2_divisor(r, v)
    slots = r // lanes
    best: tuple[float, int, int] = (-1.0, 1, 1)
    for p in range(1, slots + 1):
        if slots % p or p * lanes * 4 > _MAX_ACC_BYTES:
            continue
        for ti in range(1, min(m, _MAX_TILE_ROWS) + 1):
            if ti * p > isa.max_acc or ti * p + p + 1 > isa.registers:
                break
            score = ti * p / (ti + p)
            if score > best[0] + 1e-9:
                best = (score, ti, p)
    _, tile_rows, per_pass = best
    return BSRSchedule("n-lanes", lanes, tile_rows, row_chunk, per_pass, isa=isa.name)


def _k_lanes_schedule(m: int, block: BlockShape, isa: VectorISA, row_chunk: int) -> BSRSchedule:
    """Tile TI rows; TI * (accumulators per row) must fill whole reduction groups of min(c, V).

    Each X vector feeds one FMA per block row, so beyond one group (or 12 vectors) more rows
    only amortise the weight load further while their X rows crowd L1.
    """
    r, c, v = block.rows, block.cols, isa.lanes
    g = v // c if c < v else 1
    s_row = r // g
    group = min(c, v)
    weights_live = s_row if c < v else r * min(4, c // v)
    best = 1
    for ti in range(1, m + 1):
        accs = ti * s_row
        if accs > min(isa.max_acc, max(group, _MAX_TILE_ROWS)) or accs + weights_live + 1 > isa.registers:
            break
        if accs % group == 0:
            best = ti
    return BSRSchedule("k-lanes", v, best, row_chunk, isa=isa.name)


# --------------------------------------------------------------------------------------------
# The PrimFunc
# --------------------------------------------------------------------------------------------
# erf(x) ~ x * P(x^2) / Q(x^2) for |x| < 3.8, exactly +-1 beyond (erf(3.8) = 1 - 7.7e-8, below
# float32's spacing at 1). Fitted by benchmarks/fit_erf.py (reweighted least squares towards
# minimax on |x| <= 4): 1.5e-9 in float64, 3.5e-7 evaluated in float32 by Horner's rule. The exact
# tails matter: GELU's inputs are mostly large negatives, where any erf error e gives a GELU
# error x*e/2 of one sign in every neuron, and ffn_out sums 1536 of them.
ERF_P = (1.1283791820583127, 0.1847122805578801, 0.054332576534652025, 0.0038395749877996833,
         0.00038268208619091776, 4.780211476245605e-06, -1.3665194253942303e-08)
ERF_Q = (1.0, 0.4970305414313918, 0.11382686313152275, 0.015453567271951532,
         0.0013095752338932447, 6.400621294662488e-05)
ERF_CLAMP = 4.0
ERF_ONE_BEYOND = 3.8


def erf_approx_np(x: np.ndarray) -> np.ndarray:
    """The kernel's erf, in numpy float32 (for tests and documentation of its accuracy)."""
    x = np.clip(np.asarray(x, np.float32), -ERF_CLAMP, ERF_CLAMP)
    z = x * x
    p = np.float32(0)
    for c in reversed(ERF_P):
        p = p * z + np.float32(c)
    q = np.float32(0)
    for c in reversed(ERF_Q):
        q = q * z + np.float32(c)
    e = np.clip(x * p / q, -1, 1)
    return np.where(x >= ERF_ONE_BEYOND, 1, np.where(x <= -ERF_ONE_BEYOND, -1, e)).astype(np.float32)


@dataclass(frozen=True)
class BSRKernelSpec:
    """The static shape a kernel is compiled for (``nnzb`` stays symbolic)."""

    x_shape: tuple[int, ...]  # [..., K]; leading dims flatten to M
    n: int  # output features (rows of W)
    block: BlockShape
    bias: bool = False
    gelu: bool = False  # epilogue: GELU (erf form) after the bias
    residual: bool = False  # epilogue: + R[M, N] (an extra input), after the GELU if any

    @property
    def m(self) -> int:
        return int(math.prod(self.x_shape[:-1]))

    @property
    def k(self) -> int:
        return int(self.x_shape[-1])

    @property
    def y_shape(self) -> tuple[int, ...]:
        return tuple(self.x_shape[:-1]) + (self.n,)

    def check(self) -> None:
        r, c = self.block.rows, self.block.cols
        if len(self.x_shape) < 2 or any(int(d) < 1 for d in self.x_shape):
            raise BlockpruneError(
                f"input shape {self.x_shape} is not [M, K] or [B, S, K] with static sizes",
                "compile one kernel per static input shape",
            )
        if self.n % r or self.k % c:
            raise BlockpruneError(
                f"block {self.block} does not divide the weight {self.n}x{self.k} (out x in)",
                "the passes pad such a weight to whole blocks or keep the layer dense",
            )


def bsr_matmul_primfunc(spec: BSRKernelSpec, schedule: BSRSchedule, name: str = "bsr_matmul"):
    """Build the TensorIR PrimFunc ``name(X, data, indices, indptr[, bias], Y)``.

    ``data`` is the block data packed by :func:`pack_block_data` for ``schedule``.
    """
    spec.check()
    return _KernelBuilder(spec, schedule).build(name)


class _KernelBuilder:
    """Emits the loop nest with TVM's IRBuilder (Python-side unrolling of the register tile)."""

    def __init__(self, spec: BSRKernelSpec, sch: BSRSchedule) -> None:
        from tvm import tirx

        self.tirx = tirx
        self.spec, self.sch = spec, sch
        self.r, self.c = spec.block.rows, spec.block.cols
        self.nb = spec.n // self.r
        if sch.layout == "k-lanes" and not _k_lanes_fits(spec.block, sch.lanes):
            raise BlockpruneError(
                f"k-lanes layout needs the block {spec.block} to fill {sch.lanes}-lane vectors",
                "use choose_schedule(), which falls back to n-lanes for such blocks",
            )
        if self.nb % sch.row_chunk:
            raise BlockpruneError(
                f"row_chunk {sch.row_chunk} does not divide the {self.nb} block rows",
                "use choose_schedule(), which picks a divisor",
            )
        if sch.k_chunk and (sch.k_chunk % self.c or spec.k % sch.k_chunk):
            raise BlockpruneError(
                f"k_chunk {sch.k_chunk} must be a multiple of the block width {self.c} and divide K={spec.k}",
                "use choose_schedule(..., k=K), which picks a valid chunk",
            )
        self.nkc = spec.k // sch.k_chunk if sch.k_chunk else 1  # k_chunk == K: one pass
        if sch.layout == "k-lanes" and sch.row_chunk * self.r * 4 > _MAX_ACC_BYTES:
            raise BlockpruneError(
                f"row_chunk {sch.row_chunk} x {self.r} outputs overflow the 1 KB staging buffer",
                "use a smaller row_chunk (choose_schedule() respects the limit)",
            )

    # ---- small expression helpers ----------------------------------------------------------
    def f32(self, v: float):
        return self.tirx.FloatImm("float32", v)

    def zeros(self, lanes: int):
        return self.f32(0.0) if lanes == 1 else self.tirx.Broadcast(self.f32(0.0), lanes)

    def ramp(self, base, lanes: int):
        return base if lanes == 1 else self.tirx.Ramp(base, 1, lanes)

    def load(self, buf, idx: list):
        return self.tirx.BufferLoad(buf, idx)

    def const(self, v: float, lanes: int):
        return self.f32(v) if lanes == 1 else self.tirx.Broadcast(self.f32(v), lanes)

    def _gelu(self, v, lanes: int):
        """x/2 * (1 + erf(x/sqrt 2)) with :data:`ERF_P`/:data:`ERF_Q` (a Let keeps x/sqrt2 once)."""
        tirx, c = self.tirx, (lambda f: self.const(f, lanes))
        dtype = "float32" if lanes == 1 else f"float32x{lanes}"
        t = tirx.Var("gelu_t", dtype)
        z = tirx.Var("gelu_z", dtype)
        p = c(ERF_P[-1])
        for co in reversed(ERF_P[:-1]):
            p = p * z + c(co)
        q = c(ERF_Q[-1])
        for co in reversed(ERF_Q[:-1]):
            q = q * z + c(co)
        erf = tirx.Max(tirx.Min(t * p / q, c(1.0)), c(-1.0))
        erf = tirx.Select(t >= c(ERF_ONE_BEYOND), c(1.0), tirx.Select(t <= c(-ERF_ONE_BEYOND), c(-1.0), erf))
        body = tirx.Let(z, t * t, v * c(0.5) * (c(1.0) + erf))
        clamped = tirx.Max(tirx.Min(v * c(1.0 / math.sqrt(2.0)), c(ERF_CLAMP)), c(-ERF_CLAMP))
        return tirx.Let(t, clamped, body)

    def finish(self, val, row, n0, lanes: int):
        """The epilogue after the bias: GELU, then + R[row, n0:n0+lanes]."""
        if self.spec.gelu:
            val = self._gelu(val, lanes)
        if self.R is not None:
            val = val + self.load(self.R, [row, self.ramp(n0, lanes)])
        return val

    # ---- function --------------------------------------------------------------------------
    def build(self, name: str):
        from tvm.script.ir_builder import IRBuilder
        from tvm.script.ir_builder import tirx as T

        tirx, spec, sch = self.tirx, self.spec, self.sch
        self.T = T
        r, c, m, k, n = self.r, self.c, spec.m, spec.k, spec.n
        nnzb = tirx.Var("nnzb", "int32")
        data_shape = (nnzb, c, r) if sch.layout == "n-lanes" else (nnzb, r * c)
        with IRBuilder() as ib:
            with T.prim_func():
                T.func_name(name)
                T.func_attr({"tirx.noalias": True, "global_symbol": name})
                x_arg = T.arg("X", T.buffer(spec.x_shape, "float32"))
                self.D = T.arg("data", T.buffer(data_shape, "float32"))
                self.I = T.arg("indices", T.buffer((nnzb,), "int32"))
                # block pointers per row (CSR), or per row and K-chunk when K is split
                p_shape = (self.nb + 1,) if self.nkc == 1 else (self.nb, self.nkc + 1)
                if sch.layout == "m-lanes":  # one block list per chunk of block rows
                    p_shape = (self.nb // sch.row_chunk + 1,)
                self.P = T.arg("indptr", T.buffer(p_shape, "int32"))
                self.B = T.arg("bias", T.buffer((n,), "float32")) if spec.bias else None
                r_arg = T.arg("R", T.buffer(spec.y_shape, "float32")) if spec.residual else None
                y_arg = T.arg("Y", T.buffer(spec.y_shape, "float32"))
                self.R = None
                if len(spec.x_shape) == 2:
                    self.X, self.Y, self.R = x_arg, y_arg, r_arg
                else:  # [B, S, K] -> [M, K] views of the same memory
                    self.X = T.decl_buffer((m, k), "float32", data=x_arg.data)
                    self.Y = T.decl_buffer((m, n), "float32", data=y_arg.data)
                    if r_arg is not None:
                        self.R = T.decl_buffer((m, n), "float32", data=r_arg.data)
                self._body()
        return ib.get()

    def _pack_x(self) -> None:
        """Copy X into rows of K + x_pad floats (in parallel over rows) and read that instead."""
        T, m, k, pad = self.T, self.spec.m, self.spec.k, self.sch.x_pad
        v = self.sch.lanes if k % self.sch.lanes == 0 else 1
        packed = T.alloc_buffer((m, k + pad), "float32", scope="global")
        with T.parallel(0, m) as i:
            with T.serial(0, k // v) as j:
                T.buffer_store(packed, self.load(self.X, [i, self.ramp(j * v, v)]), [i, self.ramp(j * v, v)])
        self.X = packed

    def _body(self) -> None:
        T, sch, m = self.T, self.sch, self.spec.m
        if sch.layout == "m-lanes":
            self._body_m_lanes()
            return
        if sch.x_pad:
            self._pack_x()
        ti_main = min(sch.tile_rows, m)
        n_main, tail = m // ti_main, m % ti_main
        with T.parallel(0, self.nb // sch.row_chunk) as ic:
            self._alloc_tiles(ti_main)
            with T.serial(0, n_main) as mo:
                self._chunk_tile(ic, mo * ti_main, ti_main)
            if tail:
                self._chunk_tile(ic, n_main * ti_main, tail)

    def _chunk_tile(self, ic, m0, ti_count: int) -> None:
        """TI rows of X against every block row of chunk ``ic`` (X tile stays in L1).

        With K split in ``nkc`` passes, each pass re-walks the chunk's rows over one K slice and
        adds its partial sums to the outputs (Y for n-lanes, the staging rows for k-lanes).
        """
        T, chunk = self.T, self.sch.row_chunk
        k_lanes = self.sch.layout == "k-lanes"
        if self.nkc == 1:
            with T.serial(0, chunk) as ii:
                self._tile(ic * chunk + ii, ii, m0, ti_count, None)
        else:
            if k_lanes:
                self._zero_stage(ti_count)
            with T.serial(0, self.nkc) as kc:
                with T.serial(0, chunk) as ii:
                    self._tile(ic * chunk + ii, ii, m0, ti_count, kc)
        if k_lanes:
            self._flush_outputs(ic, m0, ti_count)

    def _alloc_tiles(self, ti_max: int) -> None:
        """One accumulator buffer per tile row (each well under 1024 bytes: stack, registers)."""
        T, sch = self.T, self.sch
        if sch.layout == "n-lanes":
            per_row = sch.slots_per_pass or (self.r // sch.lanes)
        else:
            per_row = self._k_geometry()["s_row"]
        self.acc = [T.alloc_buffer((per_row, sch.lanes), "float32", scope="global") for _ in range(ti_max)]
        if sch.layout == "k-lanes":
            group = self._k_geometry()["group"]
            self.red = T.alloc_buffer((max(1, group // 2), sch.lanes), "float32", scope="global")
            # Reduced sums land lane by lane on column segments of Y; staging them per chunk
            # (row_chunk * r outputs per X row) turns scattered scalar stores into vector copies.
            self.stage = [T.alloc_buffer((sch.row_chunk * self.r,), "float32", scope="global")
                          for _ in range(ti_max)]

    def _tile(self, row, ii, m0, ti_count: int, kpass) -> None:
        if self.sch.layout == "n-lanes":
            self._tile_n_lanes(row, m0, ti_count, kpass)
        else:
            self._tile_k_lanes(row, ii, m0, ti_count, kpass)

    def _block_loop(self, row, kpass):
        P = self.P
        if kpass is None:
            return self.T.serial(self.load(P, [row]), self.load(P, [row + 1]))
        return self.T.serial(self.load(P, [row, kpass]), self.load(P, [row, kpass + 1]))

    # ---- n-lanes ---------------------------------------------------------------------------
    def _tile_n_lanes(self, row, m0, ti_count: int, kpass) -> None:
        T, sch, r, c = self.T, self.sch, self.r, self.c
        L = sch.lanes
        slots = r // L
        per_pass = sch.slots_per_pass or slots
        for p in range(slots // per_pass):
            if kpass is None:
                self._init_acc_n_lanes(row, p, per_pass, ti_count, m0, from_y=False)
            else:  # first K pass starts from the bias, later passes from the partial Y
                with T.If(kpass == 0):
                    with T.Then():
                        self._init_acc_n_lanes(row, p, per_pass, ti_count, m0, from_y=False)
                    with T.Else():
                        self._init_acc_n_lanes(row, p, per_pass, ti_count, m0, from_y=True)
            with self._block_loop(row, kpass) as b:
                col = self.load(self.I, [b])
                kloop = T.unroll(0, c) if c <= 4 else T.serial(0, c)
                with kloop as kk:
                    for ti in range(ti_count):
                        xv = self.load(self.X, [m0 + ti, col * c + kk])
                        xb = xv if L == 1 else self.tirx.Broadcast(xv, L)
                        for s in range(per_pass):
                            w = self.load(self.D, [b, kk, self.ramp((p * per_pass + s) * L, L)])
                            a = self.load(self.acc[ti], [s, self.ramp(0, L)])
                            T.buffer_store(self.acc[ti], a + xb * w, [s, self.ramp(0, L)])
            has_epilogue = self.spec.gelu or self.spec.residual
            if kpass is None or not has_epilogue:
                self._store_n_lanes(row, p, per_pass, ti_count, m0, has_epilogue)
            else:  # partial sums between K passes; the epilogue once, on the last pass
                with T.If(kpass == self.nkc - 1):
                    with T.Then():
                        self._store_n_lanes(row, p, per_pass, ti_count, m0, True)
                    with T.Else():
                        self._store_n_lanes(row, p, per_pass, ti_count, m0, False)

    def _store_n_lanes(self, row, p: int, per_pass: int, ti_count: int, m0, epilogue: bool) -> None:
        L = self.sch.lanes
        for ti in range(ti_count):
            for s in range(per_pass):
                n0 = row * self.r + (p * per_pass + s) * L
                val = self.load(self.acc[ti], [s, self.ramp(0, L)])
                if epilogue:
                    val = self.finish(val, m0 + ti, n0, L)
                self.T.buffer_store(self.Y, val, [m0 + ti, self.ramp(n0, L)])

    def _init_acc_n_lanes(self, row, p: int, per_pass: int, ti_count: int, m0, from_y: bool) -> None:
        """Accumulators start at the bias (or 0), or at Y's partial sums for later K passes."""
        L = self.sch.lanes
        for ti in range(ti_count):
            for s in range(per_pass):
                n0 = row * self.r + (p * per_pass + s) * L
                if from_y:
                    val = self.load(self.Y, [m0 + ti, self.ramp(n0, L)])
                elif self.B is not None:
                    val = self.load(self.B, [self.ramp(n0, L)])
                else:
                    val = self.zeros(L)
                self.T.buffer_store(self.acc[ti], val, [s, self.ramp(0, L)])

    # ---- m-lanes ---------------------------------------------------------------------------
    def _m_geometry(self) -> tuple[int, int, int]:
        """(TM tokens per tile, MV vectors per tile, number of tiles); X^T is padded to whole tiles."""
        tm = self.sch.tile_rows
        return tm, tm // self.sch.lanes, -(-self.spec.m // tm)

    def _transpose_vectors(self, tmp, srcs: list, store) -> None:
        """Transpose a V x V matrix held as V row vectors: ``store(q, column q)`` for each q.

        log2(V) stages of zips (lanes 0..V/2-1 of a and b interleaved, then V/2..V-1) of rows i
        and i + V/2: one two-source permute each (vpermt2ps on AVX-512, zip1/zip2 on NEON).
        Between stages the vectors go through ``tmp`` (two small buffers that LLVM keeps in
        registers), so that no expression is repeated.
        """
        tirx, V = self.tirx, self.sch.lanes
        lo = [j for q in range(V // 2) for j in (q, V + q)]
        hi = [j for q in range(V // 2, V) for j in (q, V + q)]
        cur = list(srcs)
        stages = V.bit_length() - 1
        for st in range(stages):
            out = []
            for i in range(V // 2):
                out.append(tirx.Shuffle([cur[i], cur[i + V // 2]], lo))
                out.append(tirx.Shuffle([cur[i], cur[i + V // 2]], hi))
            if st == stages - 1:
                for q, val in enumerate(out):
                    store(q, val)
            else:
                buf = tmp[st % 2]
                for q, val in enumerate(out):
                    self.T.buffer_store(buf[q // (V // 2)], val, [q % (V // 2), self.ramp(0, V)])
                cur = [self.load(buf[q // (V // 2)], [q % (V // 2), self.ramp(0, V)]) for q in range(V)]

    def _alloc_transpose_tmp(self):
        V, T = self.sch.lanes, self.T
        return [[T.alloc_buffer((max(1, V // 2), V), "float32", scope="global") for _ in range(2)]
                for _ in range(2)]

    def _transpose_x(self, xt, m_pad: int) -> None:
        """Xt[k, m] = X[m, k] (0 for the padding m >= M), in parallel over slices of K.

        Whole V x V tiles are transposed in registers; the last M % V rows (and any K % V != 0)
        are copied lane by lane.
        """
        T, tirx, m, k, V = self.T, self.tirx, self.spec.m, self.spec.k, self.sch.lanes
        kv = V if k % V == 0 else 1
        m_full = (m // V) * V if kv == V else 0
        with T.parallel(0, k // kv) as kb:
            k0 = kb * kv
            if m_full:
                tmp = self._alloc_transpose_tmp()
                with T.serial(0, m_full // V) as mv:
                    rows = [self.load(self.X, [mv * V + i, self.ramp(k0, V)]) for i in range(V)]
                    self._transpose_vectors(
                        tmp, rows, lambda q, val: T.buffer_store(xt, val, [k0 + q, self.ramp(mv * V, V)]))
            if m_pad > m_full:
                with T.serial(0, m_pad - m_full) as mm:
                    for kk in range(kv):
                        src = self.load(self.X, [tirx.Min(m_full + mm, m - 1), k0 + kk])
                        T.buffer_store(xt, tirx.Select(m_full + mm < m, src, self.f32(0.0)), [k0 + kk, m_full + mm])

    def _body_m_lanes(self) -> None:
        """Vectors along M: acc[rr][mv] += bcast(W[o+rr, c0+kk]) * Xt[c0+kk, tile vector mv].

        Each X^T row is one contiguous vector load per accumulator, no horizontal sums. A task is
        a chunk of block rows x a tile of TM tokens; its finished rows are staged as ``[outputs,
        TM]`` and written to Y, transposed, by the flush with bias and epilogue. The blocks of a
        chunk are one flat list ordered by K slice (:func:`m_lanes_arrays`), so the X^T slice in
        use stays in L1.
        """
        T, tirx, sch, spec = self.T, self.tirx, self.sch, self.spec
        r, c, V = self.r, self.c, sch.lanes
        tm, mv_count, n_mt = self._m_geometry()
        m_pad = tm * n_mt
        xt = T.alloc_buffer((spec.k, m_pad), "float32", scope="global")
        self._transpose_x(xt, m_pad)
        chunk = sch.row_chunk
        width = chunk * r
        with T.parallel(0, (self.nb // chunk) * n_mt) as task:
            ic = task // n_mt if n_mt > 1 else task
            mt = task % n_mt if n_mt > 1 else 0
            acc = [T.alloc_buffer((mv_count, V), "float32", scope="global") for _ in range(r)]
            stage = T.alloc_buffer((width * tm,), "float32", scope="global")  # [outputs, TM]

            def stage_at(ii, rr, mv):
                return [self.ramp((ii * r + rr) * tm + mv * V, V)]

            # One flat loop over the chunk's blocks, in (K slice, row) order (m_lanes_arrays):
            # each block moves its row's accumulators in from the staging rows and back out, a
            # fixed cost with no data-dependent branch (per-row, per-slice loops mispredicted).
            with T.serial(0, width * tm // V) as z:
                T.buffer_store(stage, self.zeros(V), [self.ramp(z * V, V)])
            ncols = spec.k // c
            with T.serial(self.load(self.P, [ic]), self.load(self.P, [ic + 1])) as b:
                code = self.load(self.I, [b])
                ii = tirx.floordiv(code, ncols)
                col = tirx.floormod(code, ncols)
                for rr in range(r):
                    for mv in range(mv_count):
                        T.buffer_store(acc[rr], self.load(stage, stage_at(ii, rr, mv)), [mv, self.ramp(0, V)])
                kloop = T.unroll(0, c) if c <= 4 else T.serial(0, c)
                with kloop as kk:
                    xrow = col * c + kk
                    for rr in range(r):
                        w = tirx.Broadcast(self.load(self.D, [b, rr * c + kk]), V)
                        for mv in range(mv_count):
                            idx = [mv, self.ramp(0, V)]
                            xv = self.load(xt, [xrow, self.ramp(mt * tm + mv * V, V)])
                            T.buffer_store(acc[rr], self.load(acc[rr], idx) + w * xv, idx)
                for rr in range(r):
                    for mv in range(mv_count):
                        T.buffer_store(stage, self.load(acc[rr], [mv, self.ramp(0, V)]), stage_at(ii, rr, mv))
            self._flush_m_lanes(stage, ic * width, mt * tm, tm, width)

    def _flush_m_lanes(self, stage, n0, m0, tm: int, width: int) -> None:
        """Y[m0 + mm, n0 + j] = stage[j, mm] (+ bias, epilogue), as vectors along N.

        V x V tiles of the staging rows are transposed in registers; a chunk narrower than a
        whole number of vectors is read with strided (per-lane) loads instead.
        """
        T, V, m = self.T, self.sch.lanes, self.spec.m

        def put(row, j0, lanes, val):
            if self.B is not None:
                val = val + self.load(self.B, [self.ramp(n0 + j0, lanes)])
            val = self.finish(val, row, n0 + j0, lanes)
            T.buffer_store(self.Y, val, [row, self.ramp(n0 + j0, lanes)])

        def guarded(row, emit):
            if m % tm:
                with T.If(row < m):
                    with T.Then():
                        emit()
            else:
                emit()

        if width % V == 0 and V > 1:
            tmp = self._alloc_transpose_tmp()
            with T.serial(0, tm // V) as mv:
                with T.serial(0, width // V) as jv:
                    rows = [self.load(stage, [self.ramp((jv * V + i) * tm + mv * V, V)]) for i in range(V)]

                    def store(q, val):
                        row = m0 + mv * V + q
                        guarded(row, lambda: put(row, jv * V, V, val))

                    self._transpose_vectors(tmp, rows, store)
            return
        with T.serial(0, tm) as mm:
            def emit():
                for j0, lanes in self._vector_spans(width, V):
                    at = j0 * tm + mm
                    val = self.load(stage, [at if lanes == 1 else self.tirx.Ramp(at, tm, lanes)])
                    put(m0 + mm, j0, lanes, val)
            guarded(m0 + mm, emit)

    # ---- k-lanes ---------------------------------------------------------------------------
    def _k_geometry(self) -> dict[str, int]:
        r, c, v = self.r, self.c, self.sch.lanes
        g = v // c if c < v else 1  # block rows sharing one vector
        return {"g": g, "s_row": r // g, "group": min(c, v), "chunks": max(1, c // v)}

    def _tile_k_lanes(self, row, ii, m0, ti_count: int, kpass) -> None:
        T, tirx, r, c = self.T, self.tirx, self.r, self.c
        V = self.sch.lanes
        geo = self._k_geometry()
        g, s_row, group, chunks = geo["g"], geo["s_row"], geo["group"], geo["chunks"]
        for ti in range(ti_count):
            for s in range(s_row):
                T.buffer_store(self.acc[ti], self.zeros(V), [s, self.ramp(0, V)])
        with self._block_loop(row, kpass) as b:
            col = self.load(self.I, [b])
            if c >= V:  # each block row: `chunks` vectors of V consecutive input features
                kloop = T.unroll(0, chunks) if chunks <= 4 else T.serial(0, chunks)
                with kloop as kc:
                    for rr in range(r):
                        w = self.load(self.D, [b, self.ramp(rr * c + kc * V, V)])
                        for ti in range(ti_count):
                            xv = self.load(self.X, [m0 + ti, self.ramp(col * c + kc * V, V)])
                            a = self.load(self.acc[ti], [rr, self.ramp(0, V)])
                            T.buffer_store(self.acc[ti], a + xv * w, [rr, self.ramp(0, V)])
            else:  # g block rows per vector; X's c features repeated g times
                for ti in range(ti_count):
                    xs = self.load(self.X, [m0 + ti, self.ramp(col * c, c)])
                    xv = tirx.Broadcast(xs, V) if c == 1 else tirx.Shuffle([xs] * g, list(range(V)))
                    for s in range(s_row):
                        w = self.load(self.D, [b, self.ramp(s * V, V)])
                        a = self.load(self.acc[ti], [s, self.ramp(0, V)])
                        T.buffer_store(self.acc[ti], a + xv * w, [s, self.ramp(0, V)])
        # Reduce: `group` accumulators -> one vector of sums, by a shuffle tree.
        vecs = [(ti, s) for ti in range(ti_count) for s in range(s_row)]
        vecs += [None] * (-len(vecs) % group)
        for start in range(0, len(vecs), group):
            members = vecs[start:start + group]
            self._reduce_group(members)
            self._stage_group(ii, members, g, accumulate=kpass is not None)

    def _reduce_group(self, members: list) -> None:
        """red[0] lane q <- sum of lane-group (q % g) of members[q // g] (g = V / group)."""
        T, tirx, V = self.T, self.tirx, self.sch.lanes
        even = [2 * q for q in range(V)]
        odd = [2 * q + 1 for q in range(V)]

        def acc_vec(mem):
            if mem is None:
                return self.zeros(V)
            ti, s = mem
            return self.load(self.acc[ti], [s, self.ramp(0, V)])

        srcs = [acc_vec(mem) for mem in members]
        level = 0
        while len(srcs) > 1:
            out = []
            for j in range(len(srcs) // 2):
                a, b = srcs[2 * j], srcs[2 * j + 1]
                val = tirx.Shuffle([a, b], even) + tirx.Shuffle([a, b], odd)
                T.buffer_store(self.red, val, [j, self.ramp(0, V)])
                out.append(self.load(self.red, [j, self.ramp(0, V)]))
            srcs = out
            level += 1
        if level == 0:  # group of one vector (cannot happen with group >= 2, kept for safety)
            T.buffer_store(self.red, srcs[0], [0, self.ramp(0, V)])

    def _stage_group(self, ii, members: list, g: int, accumulate: bool) -> None:
        """Write red[0]'s lanes to the staging rows, as vectors where lanes are consecutive."""
        T, V = self.T, self.sch.lanes
        targets = []  # (lane, ti, output offset inside the block row)
        for q in range(V):
            mem = members[q // g]
            if mem is not None:
                ti, s = mem
                targets.append((q, ti, s * g + q % g))
        runs: list[list[tuple[int, int, int]]] = []
        for t in targets:
            last = runs[-1][-1] if runs else None
            if last and last[1] == t[1] and last[0] + 1 == t[0] and last[2] + 1 == t[2]:
                runs[-1].append(t)
            else:
                runs.append([t])
        for run in runs:
            q0, ti, off = run[0]
            idx = [self.ramp(ii * self.r + off, len(run))]
            val = self.load(self.red, [0, self.ramp(q0, len(run))])
            if accumulate:
                val = self.load(self.stage[ti], idx) + val
            T.buffer_store(self.stage[ti], val, idx)

    def _zero_stage(self, ti_count: int) -> None:
        width, V = self.sch.row_chunk * self.r, self.sch.lanes
        for ti in range(ti_count):
            for j0, lanes in self._vector_spans(width, V):
                self.T.buffer_store(self.stage[ti], self.zeros(lanes), [self.ramp(j0, lanes)])

    @staticmethod
    def _vector_spans(width: int, v: int) -> list[tuple[int, int]]:
        """(start, lanes) covering [0, width): full vectors, then single lanes."""
        full = width - width % v
        return [(j, v) for j in range(0, full, v)] + [(j, 1) for j in range(full, width)]

    def _flush_outputs(self, ic, m0, ti_count: int) -> None:
        """Copy the staged outputs of a chunk to Y (+ bias), one vector at a time."""
        T, V = self.T, self.sch.lanes
        width = self.sch.row_chunk * self.r
        n0 = ic * width
        for ti in range(ti_count):
            for j0, lanes in self._vector_spans(width, V):
                val = self.load(self.stage[ti], [self.ramp(j0, lanes)])
                if self.B is not None:
                    val = val + self.load(self.B, [self.ramp(n0 + j0, lanes)])
                val = self.finish(val, m0 + ti, n0 + j0, lanes)
                T.buffer_store(self.Y, val, [m0 + ti, self.ramp(n0 + j0, lanes)])


# --------------------------------------------------------------------------------------------
# Packing, compiling, running
# --------------------------------------------------------------------------------------------
def pack_block_data(bsr: BSRMatrix, schedule: BSRSchedule) -> np.ndarray:
    """Block data in the layout the kernel reads: ``[nnzb, c, r]`` (n-lanes) or ``[nnzb, r*c]``."""
    r, c = bsr.block.rows, bsr.block.cols
    if schedule.layout == "n-lanes":
        return np.ascontiguousarray(bsr.data.transpose(0, 2, 1), dtype=np.float32)
    return np.ascontiguousarray(bsr.data.reshape(-1, r * c), dtype=np.float32)


def chunked_indptr(bsr: BSRMatrix, k_chunk: int) -> np.ndarray:
    """Block pointers per row-block and K slice: ``[out/r, K/k_chunk + 1]``.

    Blocks are sorted by column inside a row, so the blocks of slice j of row i are
    ``ptr[i, j] : ptr[i, j + 1]``, with ``ptr[i, 0] = indptr[i]`` and ``ptr[i, -1] = indptr[i+1]``.
    """
    nkc = bsr.shape[1] // k_chunk
    rows = np.repeat(np.arange(bsr.block_rows), bsr.row_nnzb())
    slices = (bsr.indices.astype(np.int64) * bsr.block.cols) // k_chunk
    counts = np.zeros((bsr.block_rows, nkc), dtype=np.int64)
    np.add.at(counts, (rows, slices), 1)
    ptr = np.empty((bsr.block_rows, nkc + 1), dtype=np.int32)
    ptr[:, 0] = bsr.indptr[:-1]
    ptr[:, 1:] = bsr.indptr[:-1, None] + np.cumsum(counts, axis=1)
    return ptr


def m_lanes_arrays(bsr: BSRMatrix, schedule: BSRSchedule) -> list[np.ndarray]:
    """m-lanes arrays: the blocks of each chunk of ``row_chunk`` block rows as one flat list.

    Inside a chunk the blocks are ordered by K slice (``k_chunk`` input features; all of K when
    0), then row, then column, so the X^T slice of a pass stays in L1 while the chunk's rows use
    it. ``indices[b] = row_in_chunk * (K / c) + block_column``; ``indptr[i]`` is where chunk i
    starts (``[block_rows / row_chunk + 1]``); ``data`` is reordered alike, ``[nnzb, r*c]``.
    """
    r, c = bsr.block.rows, bsr.block.cols
    ncols = bsr.shape[1] // c
    chunk = schedule.row_chunk
    rows = np.repeat(np.arange(bsr.block_rows, dtype=np.int64), bsr.row_nnzb())
    cols = bsr.indices.astype(np.int64)
    kslice = (cols * c) // schedule.k_chunk if schedule.k_chunk else np.zeros_like(cols)
    order = np.lexsort((cols, rows % chunk, kslice, rows // chunk))
    counts = np.bincount(rows // chunk, minlength=bsr.block_rows // chunk)
    ptr = np.zeros(bsr.block_rows // chunk + 1, dtype=np.int32)
    ptr[1:] = np.cumsum(counts)
    codes = ((rows % chunk) * ncols + cols)[order].astype(np.int32)
    data = np.ascontiguousarray(bsr.data.reshape(-1, r * c)[order], dtype=np.float32)
    return [data, codes, ptr]


def kernel_arrays(bsr: BSRMatrix, schedule: BSRSchedule) -> list[np.ndarray]:
    """``[data, indices, indptr]`` as the kernel takes them (after X, before bias and Y).

    ``indptr`` is the CSR row pointer, or :func:`chunked_indptr` when the schedule splits K;
    m-lanes takes per-chunk block lists (:func:`m_lanes_arrays`).
    """
    if schedule.layout == "m-lanes":
        return m_lanes_arrays(bsr, schedule)
    if schedule.k_chunk and schedule.k_chunk < bsr.shape[1]:
        ptr = chunked_indptr(bsr, schedule.k_chunk)
    else:
        ptr = np.ascontiguousarray(bsr.indptr)
    return [pack_block_data(bsr, schedule), np.ascontiguousarray(bsr.indices), ptr]


@dataclass
class BSRKernel:
    """A compiled kernel for one static shape, with the schedule it was generated with."""

    spec: BSRKernelSpec
    schedule: BSRSchedule
    preset: TargetPreset
    name: str
    executable: Any  # tvm Executable from tvm.compile

    @functools.cached_property
    def _module(self):
        if self.preset.is_cross:
            raise BlockpruneError(
                f"kernel was compiled for {self.preset.name} ({self.preset.arch}) and cannot run here",
                "export it with export_library() and run it on the board (or under qemu)",
            )
        return self.executable.jit()

    def _check_bsr(self, bsr: BSRMatrix) -> None:
        if bsr.block != self.spec.block or bsr.shape != (self.spec.n, self.spec.k):
            raise BlockpruneError(
                f"BSR weight {bsr.shape[0]}x{bsr.shape[1]} with block {bsr.block} does not match the "
                f"kernel ({self.spec.n}x{self.spec.k}, block {self.spec.block})",
                "compile a kernel for this weight with build_bsr_kernel",
            )

    def _args(self, x: np.ndarray, bsr: BSRMatrix, bias: np.ndarray | None, residual: np.ndarray | None = None):
        import tvm

        self._check_bsr(bsr)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if tuple(x.shape) != self.spec.x_shape:
            raise BlockpruneError(f"input shape {x.shape} differs from the kernel's {self.spec.x_shape}",
                                  "compile a kernel per static input shape")
        if (bias is not None) != self.spec.bias:
            raise BlockpruneError("bias given to a kernel compiled without one (or vice versa)",
                                  "build the kernel with bias=True when the Linear has a bias")
        if (residual is not None) != self.spec.residual:
            raise BlockpruneError("residual given to a kernel compiled without one (or vice versa)",
                                  "build the kernel with residual=True to add a residual input")
        dev = tvm.cpu()
        arrays = [x] + kernel_arrays(bsr, self.schedule)
        if bias is not None:
            arrays.append(np.ascontiguousarray(bias, dtype=np.float32).reshape(self.spec.n))
        if residual is not None:
            arrays.append(np.ascontiguousarray(residual, dtype=np.float32).reshape(self.spec.y_shape))
        args = [tvm.runtime.tensor(a, dev) for a in arrays]
        y = tvm.runtime.tensor(np.empty(self.spec.y_shape, dtype=np.float32), dev)
        return args, y

    def __call__(self, x: np.ndarray, bsr: BSRMatrix, bias: np.ndarray | None = None,
                 residual: np.ndarray | None = None) -> np.ndarray:
        args, y = self._args(x, bsr, bias, residual)
        self._module[self.name](*args, y)
        return y.numpy()

    def prepared_call(self, x: np.ndarray, bsr: BSRMatrix, bias: np.ndarray | None = None,
                      residual: np.ndarray | None = None):
        """A no-argument callable running the kernel on tensors converted once (for timing)."""
        args, y = self._args(x, bsr, bias, residual)
        func = self._module[self.name]
        return lambda: func(*args, y)

    def time(self, x: np.ndarray, bsr: BSRMatrix, bias: np.ndarray | None = None,
             number: int = 10, repeat: int = 20, residual: np.ndarray | None = None) -> list[float]:
        """Seconds per call, ``repeat`` samples each averaging ``number`` calls (TVM's timer)."""
        import tvm

        args, y = self._args(x, bsr, bias, residual)
        timer = self._module.time_evaluator(self.name, tvm.cpu(), number=number, repeat=repeat)
        return list(timer(*args, y).results)

    def export_library(self, path: str) -> str:
        """Write a shared library for the target (cross-linked for aarch64)."""
        fcompile = export_fcompile(self.preset)
        if fcompile is None:
            self.executable.export_library(path)
        else:
            self.executable.export_library(path, fcompile=fcompile)
        return path

    def assembly(self) -> str:
        return self.executable.mod.inspect_source("asm")


def build_bsr_kernel(x_shape: Sequence[int], n: int, block: "BlockShape | str", *, bias: bool = False,
                     target: Any = "host", schedule: BSRSchedule | None = None,
                     name: str = "bsr_matmul", gelu: bool = False, residual: bool = False) -> BSRKernel:
    """Generate and compile the kernel for ``X[x_shape] @ W[n, K]^T`` (+ epilogue) on ``target``."""
    preset = resolve_target(target)
    spec = BSRKernelSpec(tuple(int(d) for d in x_shape), int(n), BlockShape.parse(block), bool(bias),
                         bool(gelu), bool(residual))
    spec.check()
    schedule = schedule or choose_schedule(spec.m, spec.n, spec.block, preset, k=spec.k)
    executable = _compile_cached(spec, schedule, preset.to_json(), name)
    return BSRKernel(spec, schedule, preset, name, executable)


@functools.lru_cache(maxsize=64)
def _compile_cached(spec: BSRKernelSpec, schedule: BSRSchedule, target_json: str, name: str):
    """Compiling takes ~0.2 s; tests and benchmarks ask for the same kernel repeatedly."""
    import json

    import tvm

    func = bsr_matmul_primfunc(spec, schedule, name)
    target = tvm.target.Target(json.loads(target_json))
    return tvm.compile(tvm.IRModule({name: func}), target=target)


def run_bsr_matmul(x: np.ndarray, bsr: BSRMatrix, bias: np.ndarray | None = None,
                   target: Any = "host", schedule: BSRSchedule | None = None) -> np.ndarray:
    """``x @ W.T (+ bias)`` through the compiled TVM kernel (host targets): for tests."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] != bsr.shape[1]:
        raise BlockpruneError(
            f"input has {x.shape[-1]} features but the weight expects {bsr.shape[1]}",
            "pass X[..., in] for a weight W[out, in]",
        )
    kernel = build_bsr_kernel(x.shape, bsr.shape[0], bsr.block, bias=bias is not None,
                              target=target, schedule=schedule)
    return kernel(x, bsr, bias)

