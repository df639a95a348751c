"""Injective loop nests (bias adds, masks, reshape + transpose, gathers) and a fallback.

An injective PrimFunc after FuseOps is a chain of spatial blocks; inlining all of them into
the last one leaves a single loop nest that reads the inputs once and writes the output once.
It is flattened, split into a vector of the target's width (where the innermost extent
allows) and a parallel outer loop (when there is enough work to pay for a thread launch).
"""

from __future__ import annotations

from tvm import s_tir, tirx

from blockprune.backends.tvm.pipeline.schedules.common import (CpuRule, MIN_PARALLEL_ELEMENTS, RuleContext, cpu_info, extent, is_spatial,
                     output_elements, root_blocks, vector_width)


def _flatten_and_split(sch: s_tir.Schedule, block, lanes: int, parallel: bool) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    inner_ext = extent(sch, loops[-1])
    width = vector_width(inner_ext, lanes)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    total = extent(sch, fused)
    if width > 1:
        outer, vec = sch.split(fused, [None, width])
        sch.vectorize(vec)
    else:
        outer = fused
    if parallel and total is not None and total >= MIN_PARALLEL_ELEMENTS and (extent(sch, outer) or 1) > 1:
        sch.parallel(outer)


class ElementwiseRule(CpuRule):
    """Spatial-only PrimFuncs: inline into the last block, flatten, vectorise, parallelise."""

    name = "elementwise"

    def schedule(self, func: tirx.PrimFunc, target, ctx: RuleContext) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        blocks = root_blocks(sch)
        if not blocks or not all(is_spatial(sch, b) for b in blocks):
            return None
        for blk in blocks[:-1]:
            try:
                sch.compute_inline(blk)
            except s_tir.ScheduleError:
                pass  # kept as its own loop nest (e.g. it feeds a gather index)
        lanes = cpu_info(target).lanes
        parallel = output_elements(func) >= MIN_PARALLEL_ELEMENTS
        for blk in root_blocks(sch):
            _flatten_and_split(sch, blk, lanes, parallel)
        return sch


class FallbackRule(CpuRule):
    """Anything else: parallel outermost spatial loop of each nest, vectorised spatial nests.

    Correct for every PrimFunc (the loops keep their order); it exists so that no PrimFunc
    reaches the build unscheduled, not to be fast.
    """

    name = "fallback"

    def schedule(self, func: tirx.PrimFunc, target, ctx: RuleContext) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        lanes = cpu_info(target).lanes
        parallel = output_elements(func) >= MIN_PARALLEL_ELEMENTS
        for blk in root_blocks(sch):
            try:
                if is_spatial(sch, blk):
                    _flatten_and_split(sch, blk, lanes, parallel)
                elif parallel:
                    loops = sch.get_loops(blk)
                    if loops and int(sch.get(blk).iter_vars[0].iter_type) == tirx.IterVar.DataPar:
                        sch.parallel(loops[0])
            except s_tir.ScheduleError:
                continue
        return sch
