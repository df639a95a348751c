"""TensorIR int8 matmul ``Y = dequant(Xq @ Wq^T) (+ bias, GELU, + R)``, dense or block-sparse.

The contract (issue #15, shared with the ONNX side)::

    Y[m, o] = xs * w_scale[o] * sum_k (xq[m, k] - xz) * Wq[o, k]   (+ bias[o], GELU, + R[m, o])

with ``xq, xs, xz`` from ``DynamicQuantizeLinear`` (uint8, per tensor) and ``Wq`` symmetric int8
per output channel in [-127, 127]. The float epilogue is ``float32(acc) * (xs * w_scale[o])``.

Exactness: every product and sum is formed in int32, never int16, so the accumulator is the
exact integer (|acc| <= K * 255 * 127 < 2^31 for K < 66000):

* ``avx2``: X packed as int16 ``xq - xz`` (in [-255, 255]) times int16 weights with
  ``vpmaddwd`` (two int16 x int16 products summed *into int32*; |pair| <= 64770). We do not use
  ``vpmaddubsw``: its int16 pair sum saturates for u8 x s8 (255 * 127 * 2 = 64770 > 32767).
  No zero-point correction term is needed because X is centred before the multiply.
* ``neon`` (ARMv8.0, e.g. Cortex-A72/A53): the same int16 data, a plain widening
  multiply-accumulate into int32 that LLVM lowers to ``smlal``/``smlal2``.
* ``sdot`` (ARMv8.2 dot product, e.g. Cortex-A55/A76): X packed as int8 ``xq - 128``, int8
  weights, ``sdot`` (four int8 x int8 products summed into int32); since
  ``xq - xz = (xq - 128) - (xz - 128)``, the epilogue subtracts ``(xz - 128) * rowsum(Wq)[o]``
  (a packed per-output constant), still in int32.

Layout (why it is fast): X comes packed by :mod:`.int8_quantize` as ``xp[Mp/8, K/4, 32]``, four
consecutive input features of one row side by side, 8 rows after each other. One vector load then
holds 4 rows x 4 features, and the four weights ``Wq[o, 4g:4g+4]`` (dense row or one row of a
block; stored as is, no re-layout) broadcast to every row. The register tile is ``R`` outputs x
``4P`` rows; each accumulator lane belongs to one (row, feature subset) and the subsets are
summed once per tile when it is written to a small per-row staging buffer. This works the same
for every block whose input extent is a multiple of 4 (1x4, 4x4, 16x4, 32x32) and for dense
weights, and needs no gather of X: a block's four features are one packed group.

Parallel over chunks of block rows (as the fp32 kernel); inside a task, a tile of rows of X is
reused while the chunk's rows stream by, and the staged int32 sums of the chunk are finished
(dequantize, bias, GELU, residual) as ``out_lanes``-wide vectors along the outputs. Buffers
are ``global`` scope and < 1024 bytes each (stack, registers; see tvm-notes).

``vnni`` (x86 with AVX512-VNNI or AVX-VNNI) is a kernel of its own with lanes along the outputs
(:mod:`.int8_vnni`); blocks whose height is not a multiple of its vector stay on ``avx2``.

Signature: ``name(xp, xs, xz, W[, indices, indptr], w_scale[, wsum][, bias][, R], Y)``:
``W`` is ``[N, K]`` (dense) or ``[nnzb, r, c]`` (BSR) in int16 (``avx2``/``neon``) or int8
(``sdot``); ``wsum`` (int32 row sums) only for ``sdot``. :mod:`.int8_api` packs these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from blockprune.blocks import BlockShape
from blockprune.errors import BlockpruneError

from blockprune.backends.tvm.kernels.bsr_kernel import ERF_CLAMP, ERF_ONE_BEYOND, ERF_P, ERF_Q
from blockprune.backends.tvm.kernels.int8_quantize import ROW_ALIGN, ROW_BLOCK, padded_rows
from blockprune.backends.tvm.targets.presets import resolve_target

_MAX_STAGE_BYTES = 1020  # each staging buffer stays below TVM's 1024-byte stack limit
ISAS = ("avx2", "neon", "sdot", "vnni")
_ACC_LANES = {"avx2": 8, "neon": 16, "sdot": 4}  # int32 lanes of one accumulator (4 rows)


@dataclass(frozen=True)
class Int8Schedule:
    """The register tile and task split; :func:`choose_int8_schedule` picks one."""

    isa: str  # "avx2" (vpmaddwd), "neon" (smlal), "sdot" (ARMv8.2 dot product), "vnni" (vpdpbusd)
    m_vecs: int  # P: vectors of 4 rows in a tile (tile = 4P rows; 4P divides ROW_ALIGN); vnni: X rows
    r_pass: int  # R: outputs accumulated at once (divides the block's rows; dense: a row group);
    # vnni: output vectors
    row_chunk: int  # block rows (dense: groups of R outputs) per parallel task (vnni: 1)
    out_lanes: int  # float32 lanes of the epilogue vectors (vnni: int32 lanes of a vpdpbusd, 16 or 8)

    def __post_init__(self) -> None:
        if self.isa not in ISAS:
            raise BlockpruneError(f"unknown int8 kernel ISA {self.isa!r}", f"use one of {ISAS}")
        if self.isa == "vnni":
            self.vnni_tile().check()
        elif self.m_vecs < 1 or ROW_ALIGN % (4 * self.m_vecs) or self.r_pass < 1 or self.row_chunk < 1:
            raise BlockpruneError(f"invalid int8 schedule {self}",
                                  f"m_vecs in (1, 2, 4, 8); r_pass and row_chunk >= 1")

    @property
    def x_format(self) -> str:
        """Packed-X form this schedule reads (see :mod:`.int8_quantize`)."""
        return {"sdot": "s8", "vnni": "u8p"}.get(self.isa, "i16")

    def vnni_tile(self):
        from blockprune.backends.tvm.kernels.int8_vnni import VnniTile

        return VnniTile(self.out_lanes, self.m_vecs, self.r_pass)

    @property
    def acc_lanes(self) -> int:
        return self.out_lanes if self.isa == "vnni" else _ACC_LANES[self.isa]

    @property
    def lanes_per_row(self) -> int:
        """Accumulator lanes per X row (summed when staged): 2, 4 or 1."""
        return self.acc_lanes // 4

    @property
    def w_dtype(self) -> str:
        """Element type of the weights as the kernel reads them (vnni: int32 words of 4 int8)."""
        return {"sdot": "int8", "vnni": "int32"}.get(self.isa, "int16")

    @property
    def needs_wsum(self) -> bool:
        """Whether the kernel takes the per-output weight sums (X not centred before the products)."""
        return self.isa in ("sdot", "vnni")


@dataclass(frozen=True)
class Int8KernelSpec:
    """Static shape and epilogue of one int8 layer (``nnzb`` stays symbolic for BSR)."""

    x_shape: tuple[int, ...]  # [..., K]; leading dims flatten to M
    n: int  # output features
    block: BlockShape | None = None  # None: dense weight
    bias: bool = False
    gelu: bool = False
    residual: bool = False
    out_dtype: str = "float32"  # "int32": the exact sums sum_k (xq - xz) Wq (no epilogue; tests)

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
        if len(self.x_shape) < 2 or any(int(d) < 1 for d in self.x_shape):
            raise BlockpruneError(f"input shape {self.x_shape} is not [M, K] or [B, S, K] with static sizes",
                                  "compile one kernel per static input shape")
        if self.k % 4:
            raise BlockpruneError(f"K={self.k} is not a multiple of 4", "keep this layer in float32")
        if self.out_dtype not in ("float32", "int32"):
            raise BlockpruneError(f"out_dtype {self.out_dtype!r}", "use float32 or int32")
        if self.out_dtype == "int32" and (self.bias or self.gelu or self.residual):
            raise BlockpruneError("an int32 output has no epilogue", "use out_dtype='float32' with bias/GELU/residual")
        if self.block is not None:
            r, c = self.block.rows, self.block.cols
            if c % 4:
                raise BlockpruneError(
                    f"block {self.block}: the int8 kernels need an input extent (columns) that is a multiple of 4",
                    "prune with 1x4, 4x4, 16x4 or 32x32 blocks, or keep the layer dense",
                )
            if self.n % r or self.k % c:
                raise BlockpruneError(f"block {self.block} does not divide the weight {self.n}x{self.k} (out x in)",
                                      "pad the weight to whole blocks or keep the layer dense")


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------
def vnni_lanes(target) -> int:
    """int32 lanes of ``vpdpbusd`` on ``target``: 16 (AVX512-VNNI), 8 (AVX-VNNI), 0 (none)."""
    from tvm.target import codegen

    t = resolve_target(target).target()
    if codegen.llvm_cpu_has_features(["avx512vnni", "avx512vl", "avx512bw"], t):
        return 16
    return 8 if codegen.llvm_cpu_has_features(["avxvnni"], t) else 0


def int8_isa(target) -> str:
    """``sdot`` on aarch64 cores with the dot product, ``neon`` on other aarch64; on x86 ``vnni``
    where the CPU has AVX512-VNNI or AVX-VNNI, else ``avx2``."""
    preset = resolve_target(target)
    if preset.arch != "aarch64":
        from tvm.target import codegen

        if not codegen.llvm_cpu_has_features(["avx2"], preset.target()):
            raise BlockpruneError(f"target {preset.name} has no AVX2", "the x86 int8 kernels need AVX2")
        return "vnni" if vnni_lanes(preset) else "avx2"
    from tvm.target import codegen

    return "sdot" if codegen.llvm_cpu_has_features(["dotprod"], preset.target()) else "neon"


def choose_int8_schedule(spec: Int8KernelSpec, target="host", isa: str | None = None) -> Int8Schedule:
    """Tile sizes per ISA and block height, from the register files.

    AVX2 has 16 ymm registers: R x P accumulators + P X vectors + a broadcast + a product;
    4 x 2 (12) for tall blocks and dense, 1 x 8 (X read straight from memory) for 1-row blocks.
    NEON has 32 q registers, an ``neon`` accumulator takes 4 (int32x16), an ``sdot`` one 1.
    """
    isa = isa or int8_isa(target)
    if isa == "vnni":
        vnni = _vnni_schedule(spec, target)
        if vnni is not None:
            return vnni
        isa = "avx2"  # a block height the output vectors do not divide
    cores = int(resolve_target(target).config.get("num-cores", 1) or 1)
    r = spec.block.rows if spec.block is not None else None
    tall = {"avx2": (4, 2), "neon": (4, 1), "sdot": (4, 4)}[isa]
    flat = {"avx2": (1, 8), "neon": (1, 4), "sdot": (1, 8)}[isa]
    if r is None:
        rr, p = tall
        unit = rr  # outputs per "block row" of the dense kernel
        units = spec.n // rr if spec.n % rr == 0 else 0
        if not units:
            rr, unit, units = 1, 1, spec.n
    else:
        rr, p = flat if r < 4 else tall
        rr = math.gcd(rr, r)
        unit, units = r, spec.n // r
    while p > 1 and 4 * p > max(4, spec.m):  # small M: don't compute mostly padding
        p //= 2
    j = _ACC_LANES[isa] // 4
    max_width = (_MAX_STAGE_BYTES // 4) // j
    out_lanes = 8 if isa == "avx2" else 4
    target_chunk = max(1, min(max_width // unit, units // (4 * cores) or 1))
    divisors = [d for d in range(1, target_chunk + 1) if units % d == 0]
    # prefer chunks whose width fills whole epilogue vectors
    full = [d for d in divisors if (d * unit) % out_lanes == 0]
    chunk = max(full or divisors)
    return Int8Schedule(isa, p, rr, chunk, out_lanes)


def _vnni_schedule(spec: Int8KernelSpec, target) -> Int8Schedule | None:
    """The VNNI tile, or None when the block height is not whole output vectors."""
    from blockprune.backends.tvm.kernels.int8_vnni import vnni_tile

    lanes = vnni_lanes(target)
    rows = spec.n if spec.block is None else spec.block.rows
    if not lanes or rows % lanes:
        return None
    # dense: two vectors per task (8 x 2 tile; N/32 tasks); BSR: the vectors of one block row
    tile = vnni_tile(spec.m, 2 if spec.block is None and (spec.n // lanes) % 2 == 0 else rows // lanes, lanes)
    return Int8Schedule("vnni", tile.rows, tile.vecs, 1, lanes)


# --------------------------------------------------------------------------------------------
# The PrimFunc
# --------------------------------------------------------------------------------------------
def int8_matmul_primfunc(spec: Int8KernelSpec, schedule: Int8Schedule, name: str = "int8_matmul"):
    """Build ``name(xp, xs, xz, W[, indices, indptr], w_scale[, wsum][, bias][, R], Y)``."""
    spec.check()
    if schedule.isa == "vnni":
        from blockprune.backends.tvm.kernels.int8_vnni import VnniBuilder

        return VnniBuilder(spec, schedule.vnni_tile()).build(name)
    return _Int8Builder(spec, schedule).build(name)


def gelu_expr(tirx, v, lanes: int):
    """``x/2 (1 + erf(x/sqrt 2))`` with the fp32 kernels' erf fit (same numbers as theirs)."""
    def c(f):
        f = tirx.FloatImm("float32", f)
        return f if lanes == 1 else tirx.Broadcast(f, lanes)

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


class _Int8Builder:
    """Emits the loop nest with TVM's IRBuilder; the register tile is unrolled in Python."""

    def __init__(self, spec: Int8KernelSpec, sch: Int8Schedule) -> None:
        from tvm import tirx

        self.tirx, self.spec, self.sch = tirx, spec, sch
        self.dense = spec.block is None
        if self.dense:
            self.r, self.c = sch.r_pass, spec.k  # a "block row" is R outputs over all of K
        else:
            self.r, self.c = spec.block.rows, spec.block.cols
        if self.r % sch.r_pass:
            raise BlockpruneError(f"r_pass {sch.r_pass} does not divide the block height {self.r}",
                                  "use choose_int8_schedule()")
        if spec.n % self.r:
            raise BlockpruneError(f"{spec.n} outputs are not whole groups of {self.r}", "use choose_int8_schedule()")
        self.nb = spec.n // self.r
        if self.nb % sch.row_chunk:
            raise BlockpruneError(f"row_chunk {sch.row_chunk} does not divide the {self.nb} block rows",
                                  "use choose_int8_schedule(), which picks a divisor")
        self.width = sch.row_chunk * self.r  # outputs per task
        if self.width * sch.lanes_per_row * 4 > _MAX_STAGE_BYTES:
            raise BlockpruneError(f"row_chunk {sch.row_chunk} x {self.r} outputs overflow the 1 KB staging buffer",
                                  "use a smaller row_chunk (choose_int8_schedule() respects the limit)")

    # ---- helpers ---------------------------------------------------------------------------
    def ramp(self, base, lanes: int):
        return base if lanes == 1 else self.tirx.Ramp(base, 1, lanes)

    def load(self, buf, idx):
        return self.tirx.BufferLoad(buf, idx)

    def bcast(self, v, lanes: int):
        return v if lanes == 1 else self.tirx.Broadcast(v, lanes)

    def shuffle(self, vec, idx: list[int]):
        return self.tirx.Shuffle([vec], idx)

    def mac(self, acc, xv, w):
        """acc + the exact int32 products of one packed group (4 rows x 4 features)."""
        tirx, isa = self.tirx, self.sch.isa
        if isa == "avx2":
            return acc + tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", xv, w)
        if isa == "sdot":
            return tirx.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot", acc, xv, w)
        return acc + tirx.Cast("int32x16", xv) * tirx.Cast("int32x16", w)

    # ---- function --------------------------------------------------------------------------
    def build(self, name: str):
        from tvm.script.ir_builder import IRBuilder
        from tvm.script.ir_builder import tirx as T

        tirx, spec, sch = self.tirx, self.spec, self.sch
        self.T = T
        m, k, n = spec.m, spec.k, spec.n
        with IRBuilder() as ib:
            with T.prim_func():
                T.func_name(name)
                T.func_attr({"tirx.noalias": True, "global_symbol": name})
                self.XP = T.arg("xp", T.buffer((padded_rows(m) // ROW_BLOCK, k // 4, ROW_BLOCK * 4), sch.w_dtype))
                self.XS = T.arg("xs", T.buffer((1,), "float32"))
                self.XZ = T.arg("xz", T.buffer((1,), "uint8"))
                if self.dense:
                    self.W = T.arg("W", T.buffer((n, k), sch.w_dtype))
                    self.I = self.P = None
                else:
                    nnzb = tirx.Var("nnzb", "int32")
                    self.W = T.arg("data", T.buffer((nnzb, self.r, self.c), sch.w_dtype))
                    self.I = T.arg("indices", T.buffer((nnzb,), "int32"))
                    self.P = T.arg("indptr", T.buffer((self.nb + 1,), "int32"))
                self.WS = T.arg("w_scale", T.buffer((n,), "float32"))
                self.WSUM = T.arg("wsum", T.buffer((n,), "int32")) if sch.isa == "sdot" else None
                self.B = T.arg("bias", T.buffer((n,), "float32")) if spec.bias else None
                r_arg = T.arg("R", T.buffer(spec.y_shape, "float32")) if spec.residual else None
                y_arg = T.arg("Y", T.buffer(spec.y_shape, spec.out_dtype))
                self.Y = T.decl_buffer((m, n), spec.out_dtype, data=y_arg.data)
                self.R = T.decl_buffer((m, n), "float32", data=r_arg.data) if r_arg is not None else None
                self._body()
        return ib.get()

    def _body(self) -> None:
        T, sch, m = self.T, self.sch, self.spec.m
        rows = 4 * sch.m_vecs
        n_full, tail = m // rows, m % rows
        with T.parallel(0, self.nb // sch.row_chunk) as ic:
            self.acc = [T.alloc_buffer((sch.m_vecs, sch.acc_lanes), "int32", scope="global")
                        for _ in range(sch.r_pass)]
            self.stage = [T.alloc_buffer((self.width * sch.lanes_per_row,), "int32", scope="global")
                          for _ in range(rows)]
            if n_full:
                with T.serial(0, n_full) as mt:
                    self._tile(ic, mt * rows, rows)
            if tail:
                self._tile(ic, n_full * rows, tail)

    def _tile(self, ic, m0, rows_valid: int) -> None:
        """All 4P rows (padding included) against every block row of the chunk, then the epilogue."""
        T, sch = self.T, self.sch
        with T.serial(0, sch.row_chunk) as ii:
            row = ic * sch.row_chunk + ii
            for ps in range(self.r // sch.r_pass):
                self._accumulate(row, ps, m0)
                self._stage(ii, ps)
        self._flush(ic, m0, rows_valid)

    def _accumulate(self, row, ps: int, m0) -> None:
        T, tirx, sch = self.T, self.tirx, self.sch
        P, R, AL = sch.m_vecs, sch.r_pass, sch.acc_lanes
        zero = tirx.Broadcast(tirx.IntImm("int32", 0), AL)
        for rr in range(R):
            for p in range(P):
                T.buffer_store(self.acc[rr], zero, [p, self.ramp(0, AL)])

        def group(xgrp, wrow, wcol):
            """One packed group: P X vectors x R broadcast weight quads."""
            xv = []
            for p in range(P):
                mr = m0 + 4 * p  # a multiple of 4: the 4 rows lie in one row block
                xv.append(self.load(self.XP, [mr // ROW_BLOCK, xgrp, self.ramp((mr % ROW_BLOCK) * 4, 16)]))
            for rr in range(R):
                quad = self.load(self.W, wrow(rr) + [self.ramp(wcol, 4)])
                w = tirx.Shuffle([quad] * 4, list(range(16)))
                for p in range(P):
                    a = self.load(self.acc[rr], [p, self.ramp(0, AL)])
                    T.buffer_store(self.acc[rr], self.mac(a, xv[p], w), [p, self.ramp(0, AL)])

        if self.dense:
            n0 = row * self.r + ps * R
            with T.serial(0, self.spec.k // 4) as g:
                group(g, lambda rr: [n0 + rr], g * 4)
        else:
            with T.serial(self.load(self.P, [row]), self.load(self.P, [row + 1])) as b:
                col = self.load(self.I, [b])
                ngrp = self.c // 4
                loop = T.unroll(0, ngrp) if ngrp <= 4 else T.serial(0, ngrp)
                with loop as g:
                    group(col * ngrp + g, lambda rr: [b, ps * R + rr], g * 4)

    def _stage(self, ii, ps: int) -> None:
        """Accumulator lanes (row, subset) -> per-row staging, J lanes per output."""
        T, sch = self.T, self.sch
        J, AL = sch.lanes_per_row, sch.acc_lanes
        for rr in range(sch.r_pass):
            out = ii * self.r + ps * sch.r_pass + rr
            for p in range(sch.m_vecs):
                accv = self.load(self.acc[rr], [p, self.ramp(0, AL)])
                for q in range(4):
                    part = self.shuffle(accv, [q * J + j for j in range(J)])
                    T.buffer_store(self.stage[4 * p + q], part, [self.ramp(out * J, J)])

    def _flush(self, ic, m0, rows_valid: int) -> None:
        """Sum the J subsets, dequantize, bias, GELU, residual; one vector of outputs at a time."""
        T, tirx, sch, spec = self.T, self.tirx, self.sch, self.spec
        J, V = sch.lanes_per_row, sch.out_lanes
        full = self.width - self.width % V
        spans = [(j, V) for j in range(0, full, V)] + [(j, 1) for j in range(full, self.width)]
        xs = self.load(self.XS, [0])
        zc = tirx.Cast("int32", self.load(self.XZ, [0])) - tirx.IntImm("int32", 128)
        for ml in range(rows_valid):
            for j0, L in spans:
                raw = self.load(self.stage[ml], [self.ramp(j0 * J, L * J)])
                s = None
                for j in range(J):
                    part = raw if J == 1 else self.shuffle(raw, [l * J + j for l in range(L)])
                    s = part if s is None else s + part
                n0 = ic * self.width + j0
                if self.WSUM is not None:
                    s = s - self.bcast(zc, L) * self.load(self.WSUM, [self.ramp(n0, L)])
                row = m0 + ml
                if spec.out_dtype == "int32":
                    T.buffer_store(self.Y, s, [row, self.ramp(n0, L)])
                    continue
                fdt = "float32" if L == 1 else f"float32x{L}"
                y = tirx.Cast(fdt, s) * (self.bcast(xs, L) * self.load(self.WS, [self.ramp(n0, L)]))
                if self.B is not None:
                    y = y + self.load(self.B, [self.ramp(n0, L)])
                if spec.gelu:
                    y = gelu_expr(tirx, y, L)
                if self.R is not None:
                    y = y + self.load(self.R, [row, self.ramp(n0, L)])
                T.buffer_store(self.Y, y, [row, self.ramp(n0, L)])
