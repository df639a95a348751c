"""Hand-written CPU schedule rules for the dense parts of a transformer (one rule per module).

Each rule is a ``tvm.s_tir.dlight`` ``ScheduleRule``: it gets one legalized (and fused)
PrimFunc and returns a ``Schedule`` or ``None`` (not applicable). :func:`default_rules` lists
them in the order they are tried; :mod:`blockprune.backends.tvm.pipeline.cpu_schedules` runs them over
a whole Relax module. Why not MetaSchedule: tuning a BERT takes ~10 minutes on 2 cores and
nothing can be measured for a cross-compiled aarch64 target, while these rules are instant
and sized from the target's vector unit (:func:`..bsr_kernel.vector_isa`).
"""

from __future__ import annotations

from blockprune.backends.tvm.pipeline.schedules.common import RULE_ATTR, CpuInfo, CpuRule, RuleContext, cpu_info
from blockprune.backends.tvm.pipeline.schedules.elementwise import ElementwiseRule, FallbackRule
from blockprune.backends.tvm.pipeline.schedules.matmul import MatmulRule, MatmulTile, choose_matmul_tile, match_matmul
from blockprune.backends.tvm.pipeline.schedules.row_reduction import RowReductionRule


def default_rules() -> list[CpuRule]:
    """Most specific first: matmul, row reductions (softmax / layernorm), injective, fallback."""
    return [MatmulRule(), RowReductionRule(), ElementwiseRule(), FallbackRule()]


__all__ = [
    "RULE_ATTR", "CpuInfo", "CpuRule", "RuleContext", "cpu_info", "default_rules",
    "ElementwiseRule", "FallbackRule", "MatmulRule", "MatmulTile", "RowReductionRule",
    "choose_matmul_tile", "match_matmul",
]
