"""Softmax, layernorm and any chain of reductions along the last axis, one row at a time.

Legalized softmax is four loop nests over the whole tensor (max, exp, sum, divide) and
layernorm four (sum, mean, variance, normalise): each pass streams the tensor through memory.
Computing all of them per row (``compute_at`` under the fused leading loops) keeps the row in
L1 and shrinks the intermediates to one row (a small stack buffer); rows are independent, so
the row loop is the parallel loop. Spatial passes (exp, normalise) are vectorised; the
reductions stay scalar (an ordered float sum cannot be vectorised without reassociation, and
they are a small share of the time).
"""

from __future__ import annotations

from tvm import s_tir, tirx

from blockprune.backends.tvm.pipeline.schedules.common import (CpuRule, MIN_PARALLEL_ELEMENTS, RuleContext, cpu_info, extent, is_spatial,
                     output_elements, root_blocks, vectorize_innermost)


class RowReductionRule(CpuRule):
    """All blocks computed per row of the last block; requires at least one reduction block."""

    name = "row_reduction"

    def schedule(self, func: tirx.PrimFunc, target, ctx: RuleContext) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        blocks = root_blocks(sch)
        if len(blocks) < 2 or not is_spatial(sch, blocks[-1]):
            return None
        if all(is_spatial(sch, b) for b in blocks):
            return None
        if any(len(sch.get(b).iter_vars) < 2 and not is_spatial(sch, b) for b in blocks):
            return None  # a full reduction to a scalar: no rows
        lanes = cpu_info(target).lanes
        for blk in blocks[:-1]:  # x - max feeds only exp: fold it in rather than store it
            consumers = sch.get_consumers(blk)
            # ... but not a per-row value (1 / sum) into a per-element one: computed per element
            if is_spatial(sch, blk) and len(consumers) == 1 and _size(sch, blk) == _size(sch, consumers[0]):
                try:
                    sch.compute_inline(blk)
                except s_tir.ScheduleError:
                    pass
        partials = [rf for blk in root_blocks(sch) if not is_spatial(sch, blk)
                    for rf in [_rfactor_by_lanes(sch, blk, lanes)] if rf is not None]
        partial_names = {sch.get(rf).name_hint for rf in partials}
        blocks = root_blocks(sch)
        out = blocks[-1]
        loops = sch.get_loops(out)
        if len(loops) < 2:
            return None
        try:
            row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
            for blk in reversed(blocks[:-1]):
                sch.compute_at(blk, row, preserve_unit_loops=True)
        except s_tir.ScheduleError:
            return None
        rows = extent(sch, row) or 1
        if rows > 1 and output_elements(func) >= MIN_PARALLEL_ELEMENTS:
            sch.parallel(row)
        for blk in sch.get_child_blocks(row):
            try:
                if sch.get(blk).name_hint in partial_names:
                    # rfactor put the lanes axis first, the reduction last: swap and vectorise
                    loops = sch.get_loops(blk)
                    first = [sch.get(lp).same_as(sch.get(row)) for lp in loops].index(True) + 1
                    sch.reorder(loops[-1], loops[first])
                    sch.vectorize(loops[first])
                elif is_spatial(sch, blk):
                    vectorize_innermost(sch, blk, lanes)
            except s_tir.ScheduleError:
                pass  # stays scalar (correct, slower)
        return sch


def _size(sch: s_tir.Schedule, block) -> int | None:
    """Number of instances of a block (product of its iteration extents), None if symbolic."""
    total = 1
    for iv in sch.get(block).iter_vars:
        ext = iv.dom.extent
        if not isinstance(ext, tirx.IntImm):
            return None
        total *= int(ext)
    return total


def _rfactor_by_lanes(sch: s_tir.Schedule, block, lanes: int):
    """Reduce ``lanes`` partial sums (or maxima) in one vector, then those ``lanes`` scalars.

    ``rfactor`` makes the inner ``lanes`` iterations of the reduction loop a spatial axis of a
    small partial-result buffer (one row's worth after ``compute_at``), which is vectorised;
    float addition is reassociated (rounding-level differences, ~1e-7 relative).
    """
    loops = sch.get_loops(block)
    n = extent(sch, loops[-1]) if loops else None
    if not n or n % lanes or n == lanes:
        return None
    try:
        _, inner = sch.split(loops[-1], [None, lanes])
        return sch.rfactor(inner, len(sch.get(block).iter_vars) - 1)
    except s_tir.ScheduleError:
        return None
