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
  sets (N = 3072: 12 KB stride) and the panel thrashes L1 and L2;
* sizes that are not a multiple of the tile (a compacted Linear: N = 77, 307) are padded
  (:func:`choose_padded_tile`, ``pad_einsum``): the product runs over ``M_pad x N_pad`` in
  full vector tiles and only the epilogue store is clipped to ``M x N``. A constant weight is
  packed with zero columns up to ``N_pad``; any other operand gets a zero-padded copy
  (``O(K (M + N))``, next to the ``O(M N K)`` product). Without this, ``N = 77`` picked a
  1-lane tile and ran ~8x slower per FLOP than ``N = 96``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import s_tir, tirx

from blockprune.backends.tvm.pipeline.schedules.common import (CpuInfo, CpuRule, MAX_STACK_BYTES, RuleContext, cpu_info, extent, root_blocks,
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


def _tile_score(rows: int, vectors: int) -> float:
    return rows * vectors / (rows + vectors)


# Padding M costs a copy of A per call and clipped epilogue rows: a padded-M tile must beat the
# exact one by this factor (padding N of a constant weight is free: done once at packing).
_M_PAD_PENALTY = 0.9
# A padded tile replaces an exact one only when it scores this much higher (keeps the tiles
# of the shapes that already tile well, e.g. head_dim 64 with 4 x 2 vectors on AVX2).
_PAD_GAIN = 1.2


def choose_padded_tile(m: int, n: int, info: CpuInfo) -> tuple[MatmulTile, int, int]:
    """The tile to run ``M x N`` with when both may be padded up: ``(tile, M_pad, N_pad)``.

    Candidates: the exact tile of :func:`choose_matmul_tile` (no padding; its FMAs per load
    scaled by ``lanes / info.lanes``, so a 1-lane tile for an odd N scores low) and every
    full-width tile within the same register / stack limits, its score scaled by the useful
    fraction ``M N / (M_pad N_pad)`` (and :data:`_M_PAD_PENALTY` when M is padded); padding
    must beat the exact tile by :data:`_PAD_GAIN`. Shapes that tile exactly at full width
    keep their tile.
    """
    exact = choose_matmul_tile(m, n, info)
    exact_score = _tile_score(exact.rows, exact.vectors) * exact.lanes / info.lanes
    best = (exact_score * _PAD_GAIN, exact, m, n)
    lanes = info.lanes
    for nv in range(1, info.max_acc + 1):
        cols = nv * lanes
        n_pad = -(-n // cols) * cols
        for mr in range(1, _MAX_TILE_ROWS + 1):
            if mr * nv > info.max_acc or mr * nv + nv + 1 > info.registers or mr * cols * 4 > MAX_STACK_BYTES:
                break
            m_pad = -(-m // mr) * mr
            score = _tile_score(mr, nv) * (m * n) / (m_pad * n_pad)
            if m_pad != m:
                score *= _M_PAD_PENALTY
            if score > best[0] + 1e-9:
                best = (score, MatmulTile(mr, nv, lanes), m_pad, n_pad)
    return best[1], best[2], best[3]


def pack_weight(w: np.ndarray, cols: int) -> np.ndarray:
    """``W[K, N] -> W[N_pad / cols, K, cols]``: the layout :class:`MatmulRule` reads a constant in.

    ``N_pad`` is N rounded up to a multiple of ``cols``; the added columns are zeros.
    """
    k, n = w.shape
    n_pad = -(-n // cols) * cols
    if n_pad != n:
        w = np.concatenate([w, np.zeros((k, n_pad - n), w.dtype)], axis=1)
    return np.ascontiguousarray(w.reshape(k, n_pad // cols, cols).transpose(1, 0, 2))


class MatmulRule(CpuRule):
    """Register-tiled (batched) matmul, epilogue fused per tile, constant weights packed.

    M / N that no full-width tile divides are padded (:func:`choose_padded_tile`); if the
    padded schedule cannot be built, the exact tile of :func:`choose_matmul_tile` is used.
    """

    name = "matmul"

    def schedule(self, func: tirx.PrimFunc, target, ctx: RuleContext) -> s_tir.Schedule | None:
        try:
            return self._schedule(func, target, ctx, pad=True)
        except s_tir.ScheduleError:
            ctx.packed.clear()
            return self._schedule(func, target, ctx, pad=False)

    def _schedule(self, func: tirx.PrimFunc, target, ctx: RuleContext, pad: bool) -> s_tir.Schedule | None:
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
        loops = sch.get_loops(mm)
        if len(loops) != match.batch_dims + 3:
            return None
        *batch, i, j, k = loops
        m, n = extent(sch, i), extent(sch, j)
        if m is None or n is None or extent(sch, k) is None:
            return None
        if pad:
            tile, m_pad, n_pad = choose_padded_tile(m, n, info)
        else:
            tile, m_pad, n_pad = choose_matmul_tile(m, n, info), m, n
        padded_weight = None
        if (m_pad, n_pad) != (m, n):
            out, padded_weight = self._pad(sch, mm, func, match, tile, m_pad != m, n_pad != n, bool(epilogue), ctx)
        else:
            out = epilogue[-1] if epilogue else sch.cache_write(mm, 0, "global")
            self._pack_constant_weight(sch, mm, func, match, tile, ctx)
        *batch, i, j, k = sch.get_loops(mm)
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
        if padded_weight is not None:  # last: its layout transform adds a T.assume block at the root
            self._pack_padded_weight(sch, mm, padded_weight, tile, ctx)
        return sch

    def _pad(self, sch, mm, func, match: MatmulMatch, tile: MatmulTile, pad_m: bool, pad_n: bool,
             has_epilogue: bool, ctx: RuleContext):
        """Pad the product to whole tiles: ``(block storing the unpadded result, index of a
        constant B left for :meth:`_pack_padded_weight` or None)``.

        ``pad_einsum`` makes the product read zero-padded copies of A (rows) / B (columns) and
        write a padded C, copied back to the real C. The copies of non-constant operands stay
        (vectorised); a constant B is read straight from its packed, zero-padded layout.
        """
        block = sch.get(mm)
        row_var, col_var = block.body.indices[-2], block.body.indices[-1]
        padding = [tile.rows if pad_m and iv.var.same_as(row_var)
                   else tile.cols if pad_n and iv.var.same_as(col_var) else 1 for iv in block.iter_vars]
        b_idx = self._constant_weight_index(func, match, ctx)
        sch.pad_einsum(mm, padding)
        for blk in sch.get_producers(mm):
            reads_b = any(r.source.same_as(match.b) for r in sch.get(blk).reads)
            if pad_n and b_idx is not None and reads_b:
                sch.compute_inline(blk)  # replaced by the zero columns of the packed weight below
            else:
                vectorize_innermost(sch, blk, tile.lanes)
        copy_back = sch.get_consumers(mm)
        if len(copy_back) != 1:
            raise s_tir.ScheduleError("pad_einsum: expected one consumer of the padded product")
        out = copy_back[0]
        if has_epilogue:
            consumers = sch.get_consumers(out)
            sch.compute_inline(out)  # the epilogue reads the padded product directly
            out = consumers[0]
        if not pad_n:
            self._pack_constant_weight(sch, mm, func, match, tile, ctx)
            return out, None
        return out, b_idx

    @staticmethod
    def _pack_padded_weight(sch, mm, b_idx: int, tile: MatmulTile, ctx: RuleContext) -> None:
        """Constant B read as ``[N_pad / NR, K, NR]`` with zero columns, without the pad guard."""
        cols = tile.cols
        weight = sch.mod["main"].params[b_idx]
        read_idx = next(n for n, r in enumerate(sch.get(mm).reads) if r.source.same_as(weight))
        sch.transform_layout(mm, ("read", read_idx), lambda kk, nn: (nn // cols, kk, nn % cols), pad_value=0.0)
        _drop_padding_guard(sch, mm, sch.mod["main"].params[b_idx])
        ctx.packed[b_idx] = lambda w, cols=cols: pack_weight(w, cols)

    @staticmethod
    def _constant_weight_index(func, match: MatmulMatch, ctx: RuleContext) -> int | None:
        """Parameter index of B when it is a 2-D constant (packable), else None."""
        idx = next((n for n, p in enumerate(func.params) if p.same_as(match.b)), None)
        if idx is None or idx not in ctx.constant_params or len(match.b.ty.shape) != 2:
            return None
        return idx

    @staticmethod
    def _pack_constant_weight(sch, mm, func, match: MatmulMatch, tile: MatmulTile, ctx: RuleContext) -> None:
        """Re-lay a 2-D constant B parameter out as contiguous ``[N/NR, K, NR]`` panels."""
        idx = MatmulRule._constant_weight_index(func, match, ctx)
        if idx is None:
            return
        cols = tile.cols
        if int(match.b.ty.shape[1]) <= cols:
            return  # a single panel is already contiguous
        read_idx = next(n for n, r in enumerate(sch.get(mm).reads) if r.source.same_as(match.b))
        sch.transform_layout(mm, ("read", read_idx), lambda kk, nn: (nn // cols, kk, nn % cols))
        ctx.packed[idx] = lambda w, cols=cols: pack_weight(w, cols)


_IF_THEN_ELSE = "prim.if_then_else"


def _drop_padding_guard(sch: s_tir.Schedule, mm, weight: tirx.Var) -> None:
    """``acc += a * if_then_else(j < N, W[..], 0)`` -> ``acc += a * W[..]`` in block ``mm``.

    Exact because the packed weight holds zeros in its padding columns (``pack_weight``; the
    ``pad_value`` of the layout transform states it). The guard would otherwise be evaluated
    per vector of B in the innermost loop.
    """
    block = sch.get(mm)
    store = block.body
    value = store.value
    if not (isinstance(store, tirx.BufferStore) and isinstance(value, tirx.Add) and isinstance(value.b, tirx.Mul)):
        raise s_tir.ScheduleError("padded product is not acc + a * b")

    def strip(e):
        op = getattr(e, "op", None)
        if (op is not None and getattr(op, "name", None) == _IF_THEN_ELSE and isinstance(e.args[1], _LOAD)
                and e.args[1].source.same_as(weight) and isinstance(e.args[2], tirx.FloatImm)
                and float(e.args[2].value) == 0.0):
            return e.args[1], True
        return e, False

    (fa, sa), (fb, sb) = strip(value.b.a), strip(value.b.b)
    if not (sa or sb):
        raise s_tir.ScheduleError("padded product: no guarded weight load found")
    new_store = tirx.BufferStore(store.buffer, tirx.Add(value.a, tirx.Mul(fa, fb)), list(store.indices))
    new_block = s_tir.SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, new_store, block.init,
                             block.alloc_buffers, block.match_buffers, block.annotations)
    sch.state.replace(sch.get_sref(mm), new_block, {block: new_block})
