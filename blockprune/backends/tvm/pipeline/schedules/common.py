"""What every CPU rule shares: target vector facts, the rule interface, small loop helpers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule

from blockprune.backends.tvm.kernels.bsr_kernel import vector_isa

# Function attribute naming the rule that scheduled a PrimFunc (tests and reports read it).
RULE_ATTR = "blockprune.schedule_rule"
# TVM turns a constant-size "global" allocation below this many bytes into a stack alloca
# (LowerTVMBuiltin's kMaxStackAlloca), which LLVM then keeps in registers; anything bigger
# becomes a heap workspace with loads/stores around every use (see tvm-notes).
MAX_STACK_BYTES = 1020
# Below this many output elements a parallel launch costs more than the work.
MIN_PARALLEL_ELEMENTS = 8192


@dataclass(frozen=True)
class CpuInfo:
    """The facts a schedule is sized from: float32 lanes, vector registers, cores."""

    lanes: int
    registers: int
    max_acc: int
    cores: int
    isa: str


def cpu_info(target: Any) -> CpuInfo:
    """Vector unit of ``target`` (AVX-512 / AVX2 / SSE / NEON) via the BSR kernel's table."""
    config = _plain_config(target)
    isa = vector_isa(config)
    return CpuInfo(isa.lanes, isa.registers, isa.max_acc, int(config.get("num-cores", 1) or 1), isa.name)


def _plain_config(target: Any) -> dict[str, Any]:
    """A tvm Target as a JSON-able dict (``targets.resolve_target`` chokes on ffi Arrays)."""
    if isinstance(target, dict):
        return target
    export = getattr(target, "export", None)
    if not callable(export):
        return {"kind": "llvm"}
    raw = dict(export())
    config: dict[str, Any] = {"kind": str(raw.get("kind", "llvm"))}
    for key in ("mtriple", "mcpu"):
        if raw.get(key):
            config[key] = str(raw[key])
    if raw.get("mattr"):
        config["mattr"] = [str(a) for a in raw["mattr"]]
    if raw.get("num-cores"):
        config["num-cores"] = int(raw["num-cores"])
    return config


@dataclass
class RuleContext:
    """Module-level facts a rule cannot see inside one PrimFunc.

    ``constant_params``: parameter indices that receive a ``relax.Constant`` at every call
    site, so the rule may change their layout (the caller re-packs the constants).
    ``packed``: filled by the rule: parameter index -> numpy packing function.
    """

    constant_params: frozenset[int] = frozenset()
    packed: dict[int, Any] = field(default_factory=dict)


class CpuRule(ScheduleRule):
    """A ScheduleRule that also receives a :class:`RuleContext` (optional weight packing)."""

    name = "cpu"

    def apply(self, func: tirx.PrimFunc, target, tunable: bool = False):  # dlight interface
        return self.schedule(func, target, RuleContext())

    def schedule(self, func: tirx.PrimFunc, target, ctx: RuleContext) -> s_tir.Schedule | None:
        raise NotImplementedError


# ---- helpers on schedules -------------------------------------------------------------------
def root_blocks(sch: s_tir.Schedule) -> list:
    """The top-level blocks of a legalized PrimFunc, in program order."""
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def is_spatial(sch: s_tir.Schedule, block) -> bool:
    return all(int(iv.iter_type) == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def vector_width(n: int | None, lanes: int) -> int:
    """Largest power of two dividing ``n``, at most ``lanes`` (1: do not vectorize)."""
    if not n:
        return 1
    return math.gcd(n, lanes) if lanes & (lanes - 1) == 0 else 1


def vectorize_innermost(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Split the innermost loop of ``block`` by the widest vector that divides it."""
    loops = sch.get_loops(block)
    if not loops:
        return
    width = vector_width(extent(sch, loops[-1]), lanes)
    if width > 1:
        _, inner = sch.split(loops[-1], [None, width])
        sch.vectorize(inner)


def output_elements(func: tirx.PrimFunc) -> int:
    """Elements written to the last parameter (the destination of ``call_tir``)."""
    total = 1
    for d in func.params[-1].ty.shape:
        total *= int(d) if isinstance(d, tirx.IntImm) else 1
    return total
