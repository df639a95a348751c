"""CPU schedules for the dense parts of a Relax model, and the pipeline that applies them.

TVM 0.27's default CPU pipeline legalizes every op to a naive loop nest and schedules none of
them (tvm-notes: a tiny BERT ran 40x slower than onnxruntime). This module applies the hand
written rules of :mod:`.schedules` (register-tiled matmul with fused epilogue, per-row
softmax / layernorm, vectorised injective ops) to every PrimFunc.

Pipeline stage: :func:`apply_cpu_schedules` expects a Relax IRModule **after** the CPU
backend's legalize passes (``LegalizeOps -> AnnotateTIROpPattern -> FoldConstant -> FuseOps
-> FuseTIR``) and **before** ``dataflow_lower_passes`` (``RewriteDataflowReshape``,
``CallTIRRewrite``, ...): it needs the ``call_tir`` bindings with their ``relax.const``
arguments, because it re-packs constant matmul weights into the layout the kernel reads.
:func:`build_cpu_pipeline` is the whole default CPU pipeline with this step inserted at that
point and with :func:`fast_math_legalize_map` given to ``LegalizeOps`` (erf / exp as
vectorisable polynomials; LLVM otherwise calls libm's ``erff`` / ``expf`` once per element,
which made the GELU epilogue cost more than its matmul). :func:`compile_relax` runs it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import tvm
from tvm import relax, tirx

from blockprune.backends.tvm.pipeline.schedules import RULE_ATTR, CpuRule, RuleContext, default_rules

_LOG = logging.getLogger(__name__)
PRESCHEDULED = "pre-scheduled"
_Constant = tvm.ir.expr.Constant  # what relax.const builds (tvm.ir.expr.GenericConst in 0.27)

__all__ = ["apply_cpu_schedules", "build_cpu_pipeline", "compile_relax", "schedule_passes", "schedule_relax",
           "fast_math_legalize_map", "schedule_report", "contains_matmul", "ScheduleSummary", "PRESCHEDULED"]


# --------------------------------------------------------------------------------------------
# Fast math at legalization
# --------------------------------------------------------------------------------------------
def _is_f32(expr: relax.Expr) -> bool:
    return str(getattr(expr.ty, "dtype", "")) == "float32"


def fast_math_legalize_map() -> dict[str, Callable]:
    """``LegalizeOps`` overrides: erf, exp, GELU and softmax through TOPI's polynomial forms.

    ``topi.fast_erf`` / ``fast_exp`` are within ~1e-7 of libm on float32 and are plain
    arithmetic (vectorisable), unlike ``T.erf`` / ``T.exp`` which LLVM scalarises into calls.
    Other dtypes keep the default legalization.
    """
    from tvm import topi

    def erf(bb, call):
        if not _is_f32(call.args[0]):
            return bb.call_te(topi.erf, call.args[0])
        return bb.call_te(topi.fast_erf, call.args[0], primfunc_name_hint="fast_erf")

    def exp(bb, call):
        if not _is_f32(call.args[0]):
            return bb.call_te(topi.exp, call.args[0])
        return bb.call_te(topi.fast_exp, call.args[0], primfunc_name_hint="fast_exp")

    def gelu(bb, call):
        if not _is_f32(call.args[0]):
            return bb.call_te(_gelu_te(topi.erf), call.args[0])
        return bb.call_te(_gelu_te(topi.fast_erf), call.args[0], primfunc_name_hint="fast_gelu")

    def softmax(bb, call):
        axis = int(call.attrs.axis)
        if not _is_f32(call.args[0]):
            return bb.call_te(topi.nn.softmax, call.args[0], axis)
        return bb.call_te(_softmax_te, call.args[0], axis, primfunc_name_hint="fast_softmax")

    return {"relax.erf": erf, "relax.exp": exp, "relax.nn.gelu": gelu, "relax.nn.softmax": softmax}


def _gelu_te(erf_fn):
    from tvm import topi

    def compute(x):
        return topi.multiply(topi.multiply(x, 0.5), topi.add(erf_fn(topi.multiply(x, 1.0 / math.sqrt(2.0))), 1.0))

    return compute


def _softmax_te(x, axis: int):
    """max, exp(x - max), sum, scale: topi's softmax stages with fast_exp and one reciprocal
    per row (a vector divide per element costs ~4x a multiply)."""
    from tvm import topi

    axis = axis % len(x.shape)
    mx = topi.max(x, axis=axis, keepdims=True)
    e = topi.fast_exp(topi.subtract(x, mx))
    s = topi.sum(e, axis=axis, keepdims=True)
    return topi.multiply(e, topi.divide(1.0, s))


# --------------------------------------------------------------------------------------------
# Applying the rules
# --------------------------------------------------------------------------------------------
def _call_tir_sites(mod: tvm.IRModule) -> dict[str, list[relax.Call]]:
    """PrimFunc name -> every ``call_tir`` that calls it, across the Relax functions."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    sites: dict[str, list[relax.Call]] = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(call_tir):
            sites.setdefault(expr.args[0].name_hint, []).append(expr)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return sites


def _constant_params(calls: list[relax.Call]) -> frozenset[int]:
    """Parameter indices fed a ``relax.const`` at every call site (none if uncalled)."""
    if not calls:
        return frozenset()
    common: set[int] | None = None
    for call in calls:
        args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else []
        const = {n for n, a in enumerate(args) if isinstance(a, _Constant)}
        common = const if common is None else common & const
    return frozenset(common or ())


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return bool(func.attrs is not None and func.attrs.get("tirx.is_scheduled", False))


def _is_hand_written(func: tirx.PrimFunc) -> bool:
    """A loop nest with no root block (e.g. the IRBuilder BSR kernel): nothing to schedule."""
    from tvm import s_tir

    return not isinstance(func.body, s_tir.SBlockRealize)


@relax.expr_functor.mutator
class _RepackConstants(relax.PyExprMutator):
    """Points ``call_tir`` at re-laid-out PrimFuncs and packs their constant arguments.

    Packing happens per call site (a weight shared by two call sites is stored twice; the
    exported encoders have none).
    """

    def __init__(self, mod: tvm.IRModule, replaced: dict[str, tuple[tirx.PrimFunc, dict[int, Any]]]):
        super().__init__(mod)
        self.mod_ = mod
        self.replaced = replaced
        self.new_gvs: dict[str, tvm.ir.GlobalVar] = {}
        self.call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # noqa: N802 - TVM visitor name
        call = super().visit_call_(call)
        if not call.op.same_as(self.call_tir) or call.args[0].name_hint not in self.replaced:
            return call
        name = call.args[0].name_hint
        func, packers = self.replaced[name]
        if name not in self.new_gvs:
            self.new_gvs[name] = self.builder_.add_func(func, name + "_packed")
        args = list(call.args[1].fields)
        for idx, pack in packers.items():
            args[idx] = relax.const(pack(args[idx].value.numpy()))
        return relax.Call(call.op, [self.new_gvs[name], relax.Tuple(args)] + list(call.args[2:]),
                          call.attrs, call.ty_args)

    def run(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        mod = self.builder_.get()
        for name in self.new_gvs:  # the unpacked versions are no longer called
            del mod[name]
        return mod


def apply_cpu_schedules(mod: tvm.IRModule, target: tvm.target.Target,
                        rules: list[CpuRule] | None = None, pack_weights: bool = True) -> tvm.IRModule:
    """Schedule every unscheduled PrimFunc of ``mod`` with the first rule that applies.

    ``mod``: Relax module after LegalizeOps + FuseOps + FuseTIR (see the module docstring).
    Scheduled functions get ``tirx.is_scheduled`` and ``blockprune.schedule_rule`` (the rule's
    name). With ``pack_weights``, matmuls whose weight is a constant at every call site read
    it pre-packed; the constants in the Relax functions are replaced accordingly. PrimFuncs
    that are already scheduled (``tirx.is_scheduled``) or hand-written without blocks (the
    BSR kernel) are left alone. Returns a new module; ``mod`` is not modified.
    """
    rules = rules if rules is not None else default_rules()
    sites = _call_tir_sites(mod)
    updates: dict[tvm.ir.GlobalVar, tirx.PrimFunc] = {}
    repack: dict[str, tuple[tirx.PrimFunc, dict[int, Any]]] = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func) or _is_hand_written(func):
            continue  # scheduled already (MetaSchedule, dlight, BSR kernel): leave it alone
        consts = _constant_params(sites.get(gv.name_hint, [])) if pack_weights else frozenset()
        for rule in rules:
            ctx = RuleContext(constant_params=consts)
            try:
                sch = rule.schedule(func, target, ctx)
            except Exception as err:  # noqa: BLE001 - an odd PrimFunc must not stop a compile
                _LOG.warning("rule %s failed on %s (%s); trying the next rule", rule.name, gv.name_hint,
                             str(err).splitlines()[0] if str(err) else type(err).__name__)
                continue
            if sch is None:
                continue
            new = sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr(RULE_ATTR, rule.name)
            if ctx.packed:
                repack[gv.name_hint] = (new, dict(ctx.packed))
            else:
                updates[gv] = new
            break
    if updates:
        mod = mod.clone()  # the caller's module stays as it was
        for gv, func in updates.items():
            mod[gv] = func
    if repack:
        mod = _RepackConstants(mod, repack).run()
    return mod


@tvm.transform.module_pass(opt_level=0, name="BlockpruneCpuSchedules")
class ApplyCpuSchedules:
    """:func:`apply_cpu_schedules` as a module pass (for ``tvm.transform.Sequential``)."""

    def __init__(self, target: tvm.target.Target):
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return apply_cpu_schedules(mod, self.target)


def schedule_passes(target: tvm.target.Target, schedule: bool = True) -> list[tvm.transform.Pass]:
    """Library dispatch, fast-math legalization, fusion, then :func:`apply_cpu_schedules`."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    return cpu.library_dispatch_passes(target) + [
        relax.transform.LegalizeOps(fast_math_legalize_map()),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ] + ([ApplyCpuSchedules(target)] if schedule else [])


def schedule_relax(mod: tvm.IRModule, target: Any) -> tvm.IRModule:
    """An imported Relax module, legalized, fused and scheduled (not yet lowered): for
    inspection (:func:`schedule_report`) and tests."""
    tgt = _as_target(target)
    with tgt:
        return tvm.transform.Sequential(schedule_passes(tgt))(mod)


def build_cpu_pipeline(target: tvm.target.Target, schedule: bool = True) -> tvm.transform.Pass:
    """The default CPU Relax pipeline with fast-math legalization and our schedules.

    library dispatch -> LegalizeOps(fast math) -> AnnotateTIROpPattern -> FoldConstant ->
    FuseOps -> FuseTIR -> **apply_cpu_schedules** -> dataflow lowering -> finalize.
    """
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="BlockpruneCpuPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                schedule_passes(target, schedule) + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


def _as_target(target: Any) -> tvm.target.Target:
    from blockprune.backends.tvm.targets.presets import resolve_target

    return target if isinstance(target, tvm.target.Target) else resolve_target(target).target()


def compile_relax(mod: tvm.IRModule, target: Any):
    """``tvm.compile`` with :func:`build_cpu_pipeline`; ``target``: a tvm Target or preset name.

    ``blockprune compile`` (:func:`.compile.compile_relax`) runs the same pipeline."""
    tgt = _as_target(target)
    return tvm.compile(mod, target=tgt, relax_pipeline=build_cpu_pipeline(tgt))


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScheduleSummary:
    """Which rule scheduled a PrimFunc, and whether it contains a matmul."""

    name: str
    rule: str | None
    has_matmul: bool


def schedule_report(mod: tvm.IRModule) -> list[ScheduleSummary]:
    """One entry per PrimFunc: the rule recorded by :func:`apply_cpu_schedules`.

    ``rule`` is :data:`PRESCHEDULED` for functions that came scheduled (``tirx.is_scheduled``
    set by someone else, or a hand-written loop nest such as the BSR kernel) and None for a
    function nobody scheduled: the thing to look for.
    """
    out = []
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            rule = func.attrs.get(RULE_ATTR) if func.attrs is not None else None
            if rule is None and (_is_scheduled(func) or _is_hand_written(func)):
                rule = PRESCHEDULED
            has_mm = False if _is_hand_written(func) else contains_matmul(func)
            out.append(ScheduleSummary(gv.name_hint, None if rule is None else str(rule), has_mm))
    return sorted(out, key=lambda s: s.name)


def contains_matmul(func: tirx.PrimFunc) -> bool:
    """A multiply-accumulate (``C += A * B``) reduction block anywhere in ``func``."""
    from tvm import s_tir

    from blockprune.backends.tvm.pipeline.schedules.matmul import is_multiply_accumulate

    sch = s_tir.Schedule(func)

    def walk(parent) -> bool:
        for blk in sch.get_child_blocks(parent):
            if is_multiply_accumulate(sch.get(blk)) or walk(blk):
                return True
        return False

    return walk(sch.get_sblock("root"))
