"""Dense and batched matmul with fused epilogues: ``C[..., i, j] = sum_k A[..., i, k] B[..., k, j]``.

This covers every Linear of an ONNX-imported transformer (``A[B, S, K] x W[K, N]`` with ``W`` a
constant, then bias / GELU / residual add fused by FuseOps) and both attention products
(``Q K^T`` and ``P V``, batched over ``[B, H]``; the transpose of K is a separate op, so both
read ``B[..., k, j]`` with ``j`` contiguous).

Schedule (the loop nest a hand-written GEMM micro-kernel has):

* register tile of ``MR`` rows x ``NV`` vectors: per ``k`` it loads ``NV`` vectors of B,
  broadcasts ``MR`` values of A and issues ``MR * NV`` FMAs; the tile is the compacted
  ``global`` intermediate, < 1024 bytes, so it lives on the stack and LLVM keeps it in
  registers (tvm-notes). ``MR``/``NV`` maximise FMAs per load within the register file
  of the target (:func:`choose_matmul_tile`);
* loop order ``[batch, N-panel] (parallel) -> M-tile -> k -> tile``: a K x NR panel of B is
  reused by every M tile of a task;
* the epilogue (bias, GELU, residual add, scale + mask) is inlined into one block computed
  per tile, straight from the registers, vectorised;
* a constant weight ``W[K, N]`` is re-laid out as ``[N / NR, K, NR]`` (``RuleContext``):
  each panel is contiguous. Unpacked, rows ``N * 4`` bytes apart map to a handful of cache
  sets (N = 3072: 12 KB stride) and the panel thrashes L1 and L2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import s_tir, tirx

from .common import (CpuInfo, CpuRule, MAX_STACK_BYTES, RuleContext, cpu_info, extent, root_blocks,
                     vector_width, vectorize_innermost)

_MAX_TILE_ROWS = 12
# tirx.BufferLoad is a factory function in TVM 0.27; the node class lives in tvm.ir.expr.
_LOAD = type(tirx.BufferLoad(tirx.decl_buffer((1,), "float32"), [tirx.IntImm("int32", 0)]))


@dataclass(frozen=True)
class MatmulMatch:
    """Which block computes the product and how its buffers are indexed."""

    block_name: str
    # TVM 0.27 buffers are Vars typed by a BufferType (shape in ``.ty.shape``)
    a: tirx.Var
    b: tirx.Var
    c: tirx.Var
    batch_dims: int  # leading spatial dims of C before (i, j)


@dataclass(frozen=True)
class MatmulTile:
    """Register tile: ``rows`` rows of A x ``vectors`` vectors of ``lanes`` floats."""

    rows: int
    vectors: int
    lanes: int

    @property
    def cols(self) -> int:
        return self.vectors * self.lanes


def _var(e) -> tirx.Var | None:
    return e if isinstance(e, tirx.Var) else None


def match_matmul(block: "s_tir.SBlock") -> MatmulMatch | None:
    """``C[.., i, j] = C[.., i, j] + A[.., i, k] * B[.., k, j]`` with one reduction var, or None."""
    reduce = [iv.var for iv in block.iter_vars if int(iv.iter_type) == tirx.IterVar.CommReduce]
    if len(reduce) != 1 or len(block.iter_vars) < 3:
        return None
    k = reduce[0]
    store = block.body
    if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, tirx.Add):
        return None
    lhs, rhs = store.value.a, store.value.b
    if not (isinstance(lhs, _LOAD) and lhs.source.same_as(store.buffer)):
        return None
    if not isinstance(rhs, tirx.Mul) or not all(isinstance(x, _LOAD) for x in (rhs.a, rhs.b)):
        return None
    c_idx = [_var(e) for e in store.indices]
    if len(c_idx) < 2 or any(v is None for v in c_idx):
        return None
    i, j = c_idx[-2], c_idx[-1]
    for a, b in ((rhs.a, rhs.b), (rhs.b, rhs.a)):
        ai, bi = [_var(e) for e in a.indices], [_var(e) for e in b.indices]
        if len(ai) < 2 or len(bi) < 2:
            continue
        if (ai[-1] is not None and ai[-1].same_as(k) and ai[-2] is not None and ai[-2].same_as(i)
                and bi[-2] is not None and bi[-2].same_as(k) and bi[-1] is not None and bi[-1].same_as(j)):
            return MatmulMatch(block.name_hint, a.source, b.source, store.buffer, len(c_idx) - 2)
    return None


def is_multiply_accumulate(block: "s_tir.SBlock") -> bool:
    """``C[..] = C[..] + A[..] * B[..]`` with any indexing (also after layout rewrites)."""
    store = block.body
    if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, tirx.Add):
        return False
    lhs, rhs = store.value.a, store.value.b
    return (isinstance(lhs, _LOAD) and lhs.source.same_as(store.buffer) and isinstance(rhs, tirx.Mul)
            and all(isinstance(x, _LOAD) for x in (rhs.a, rhs.b)))


def choose_matmul_tile(m: int, n: int, info: CpuInfo) -> MatmulTile:
    """Largest ``MR x NV`` tile dividing ``M x N`` that fits the registers and the stack limit.

    Score ``MR * NV / (MR + NV)``: FMAs per vector load. Registers: ``MR * NV`` accumulators
    + ``NV`` B vectors + 1 broadcast (BERT shapes: AVX2 4 x 3 vectors of 8 lanes; NEON 4 x 6 of 4).
    """
    lanes = vector_width(n, info.lanes)
    best = (0.0, 1, 1)
    for nv in range(1, info.max_acc + 1):
        if n % (nv * lanes):
            continue
        for mr in range(1, min(m, _MAX_TILE_ROWS) + 1):
            if m % mr:
                continue
            if mr * nv > info.max_acc or mr * nv + nv + 1 > info.registers:
                break
            if mr * nv * lanes * 4 > MAX_STACK_BYTES:
                break
            score = mr * nv / (mr + nv)
            if score > best[0] + 1e-9:
                best = (score, mr, nv)
    return MatmulTile(best[1], best[2], lanes)


def pack_weight(w: np.ndarray, cols: int) -> np.ndarray:
    """``W[K, N] -> W[N / cols, K, cols]``: the layout :class:`MatmulRule` reads a constant in."""
    k, n = w.shape
    return np.ascontiguousarray(w.reshape(k, n // cols, cols).transpose(1, 0, 2))


class MatmulRule(CpuRule):
    """Register-tiled (batched) matmul, epilogue fused per tile, constant weights packed."""

    name = "matmul"

    def schedule(self, func: tirx.PrimFunc, target, ctx: RuleContext) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        blocks = root_blocks(sch)
        found = [(blk, match_matmul(sch.get(blk))) for blk in blocks]
        found = [(blk, mt) for blk, mt in found if mt is not None]
        if len(found) != 1:
            return None
        mm, match = found[0]
        pos = [sch.get(b).name_hint for b in blocks].index(match.block_name)
        info = cpu_info(target)
        try:
            for blk in blocks[:pos]:  # prologue (e.g. a cast): computed inside the product
                sch.compute_inline(blk)
            epilogue = blocks[pos + 1:]
            for blk in epilogue[:-1]:  # bias, GELU, ... collapse into the last epilogue block
                sch.compute_inline(blk)
        except s_tir.ScheduleError:
            return None
        out = epilogue[-1] if epilogue else sch.cache_write(mm, 0, "global")
        loops = sch.get_loops(mm)
        if len(loops) != match.batch_dims + 3:
            return None
        *batch, i, j, k = loops
        m, n = extent(sch, i), extent(sch, j)
        if m is None or n is None or extent(sch, k) is None:
            return None
        tile = choose_matmul_tile(m, n, info)
        self._pack_constant_weight(sch, mm, func, match, tile, ctx)
        io, ii = sch.split(i, [None, tile.rows])
        jo, ji, jv = sch.split(j, [None, tile.vectors, tile.lanes])
        sch.reorder(*batch, jo, io, k, ii, ji, jv)
        outer = sch.fuse(*batch, jo) if batch else jo
        if (extent(sch, outer) or 1) > 1 and m * n * (extent(sch, k) or 1) >= 32768:
            sch.parallel(outer)
        try:
            sch.reverse_compute_at(out, io, preserve_unit_loops=True)
            vectorize_innermost(sch, out, tile.lanes)
        except s_tir.ScheduleError:  # epilogue that does not map onto tiles: its own loop nest
            vectorize_innermost(sch, out, tile.lanes)
        sch.unroll(ii)
        sch.unroll(ji)
        if tile.lanes > 1:
            sch.vectorize(jv)
        sch.decompose_reduction(mm, k)
        return sch

    @staticmethod
    def _pack_constant_weight(sch, mm, func, match: MatmulMatch, tile: MatmulTile, ctx: RuleContext) -> None:
        """Re-lay a 2-D constant B parameter out as contiguous ``[N/NR, K, NR]`` panels."""
        idx = next((n for n, p in enumerate(func.params) if p.same_as(match.b)), None)
        shape = match.b.ty.shape
        if idx is None or idx not in ctx.constant_params or len(shape) != 2:
            return
        cols = tile.cols
        if int(shape[1]) <= cols:
            return  # a single panel is already contiguous
        read_idx = next(n for n, r in enumerate(sch.get(mm).reads) if r.source.same_as(match.b))
        sch.transform_layout(mm, ("read", read_idx), lambda kk, nn: (nn // cols, kk, nn % cols))
        ctx.packed[idx] = lambda w, cols=cols: pack_weight(w, cols)
