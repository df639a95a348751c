"""Run a whole Mali/Adreno build on PoCL, call by call in the VM's order, and compare it with onnxruntime.

Why: the per-kernel check (:mod:`.gpu_verify`) feeds each kernel random data and compares it
with its own CPU build; it cannot see a wrong call sequence, a memory plan that reuses a buffer
too early, a reshape view with the wrong shape, a mistake shared by a kernel and its reference,
or an error hidden by a tolerance scaled to the additive mask's -3.4e38. No TVM runtime with
OpenCL exists here, so the compiled ``model.so`` cannot run; instead ``main`` is lowered with
the passes ``tvm.compile`` applies to it for the GPU (:func:`vm_main`: reshapes as views,
``call_tir`` as explicit calls on pre-allocated outputs, the static memory plan) and walked
binding by binding:

* a call of a PrimFunc runs its OpenCL kernels on PoCL (:func:`.opencl_verify.run_on_opencl`,
  the generated OpenCL C and the launch configuration the host code would use) and its outputs
  are written back into the planned storage, so reuse of storage is reproduced;
* storage (``alloc_storage``) is host bytes filled with ``0xFF`` (NaN for floats), so an element
  no kernel writes surfaces as NaN in the outputs; tensors are views into it at their offsets;
* the builtins the VM runs on the host (``reshape``, ``vm.builtin.reshape``, constants, tuples)
  are evaluated with numpy. Anything else is refused naming the op (no silent skip).

Inputs are realistic: token ids across the vocabulary and token types in range
(:func:`blockprune.sample_inputs.make_feeds`), with at least one padded position in the
attention mask even at batch 1 (:func:`model_feeds`). onnxruntime runs the source ONNX (before
the GPU form decisions, so densification is checked too) on the same feeds.

Tolerance per output: ``max|GPU - onnxruntime| <= atol + rtol * max|onnxruntime output|``
(defaults ``1e-5`` and ``1e-4``); the scale is the output's own (hidden states of order 1-10),
never an intermediate's, so a kernel off by 4e31 in a mask fails here unless that error truly
cannot reach an output. Float32 sums reordered by the GPU schedules and PoCL's ``exp``/``erf``
stay near 1e-6 relative on encoders; a wrong index, race or weight gives order-1 errors.

Each call is also traced against the CPU reference of the same PrimFunc on the *same* inputs
(the real intermediate values): when the outputs fail, the report names the first call that
departs from its reference elementwise (``|gpu - cpu| > atol + rtol * |cpu|``), to localise it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import onnx

from blockprune.errors import BlockpruneError

from blockprune.backends.tvm.verify import opencl_verify as ov

DEFAULT_RTOL, DEFAULT_ATOL = 1e-4, 1e-5
DEFAULT_SEEDS = (0,)
_HOST_PACKED = ("vm.builtin.reshape",)


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputCheck:
    """One model output: worst difference from onnxruntime over the seeds, and its tolerance."""

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    ref_max: float  # max |onnxruntime output|
    rtol: float
    atol: float

    @property
    def tolerance(self) -> float:
        return self.atol + self.rtol * self.ref_max

    @property
    def rel_diff(self) -> float:
        """max-abs difference relative to the output's scale (what ``rtol`` bounds)."""
        return self.max_abs_diff / self.ref_max if self.ref_max > 0 else self.max_abs_diff

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.tolerance)


@dataclass(frozen=True)
class CallTrace:
    """One PrimFunc call of ``main`` (first seed): kernels launched and distance to its CPU reference."""

    index: int  # position among the PrimFunc calls, in the VM's order
    func: str
    kernels: int
    max_abs_diff: float  # over every buffer, PoCL vs CPU reference on the same inputs
    worst_ratio: float  # max |gpu - cpu| / (atol + rtol * |cpu|) elementwise (> 1: departs)


@dataclass
class ModelRunReport:
    """The whole-model PoCL run against onnxruntime."""

    target: str
    outputs: list[OutputCheck]
    calls: list[CallTrace] = field(default_factory=list)
    host_ops: int = 0  # bindings evaluated on the host (views, builtins)
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    feeds: str = ""  # what the inputs were, in words

    @property
    def ok(self) -> bool:
        return bool(self.outputs) and all(o.ok for o in self.outputs)

    @property
    def max_abs_diff(self) -> float:
        return max((o.max_abs_diff for o in self.outputs), default=float("nan"))

    @property
    def max_rel_diff(self) -> float:
        return max((o.rel_diff for o in self.outputs), default=float("nan"))

    def first_departure(self) -> CallTrace | None:
        """The first call (VM order) whose PoCL result departs from its CPU reference."""
        return next((c for c in self.calls if not c.worst_ratio <= 1.0), None)

    def table(self) -> str:
        lines = ["| output | shape | max abs diff vs onnxruntime | max abs diff / max abs output | tolerance "
                 "| ok |", "|---|---|---|---|---|---|"]
        for o in self.outputs:
            lines.append(f"| {o.name} | {list(o.shape)} | {o.max_abs_diff:.2e} | {o.rel_diff:.2e} | "
                         f"{o.tolerance:.1e} ({o.atol:g} + {o.rtol:g} x {o.ref_max:.3g}) | {'yes' if o.ok else 'NO'} |")
        return "\n".join(lines)

    def summary(self) -> str:
        kernels = sum(c.kernels for c in self.calls)
        return (f"whole model on PoCL ({self.target}, {len(self.calls)} PrimFunc calls, {kernels} kernel launches, "
                f"{self.host_ops} host ops) vs onnxruntime on {self.feeds}: max abs diff {self.max_abs_diff:.2e}, "
                f"relative {self.max_rel_diff:.2e}")

    def check(self) -> "ModelRunReport":
        """Raise a BlockpruneError naming the outputs off and the first departing call; else self."""
        if self.ok:
            return self
        bad = ", ".join(f"{o.name}: {o.max_abs_diff:.3g} > {o.tolerance:.3g}" for o in self.outputs if not o.ok)
        first = self.first_departure()
        where = (f"; first call departing from its CPU reference: #{first.index} {first.func} "
                 f"(max |diff| {first.max_abs_diff:.3g})" if first else "")
        raise BlockpruneError(f"the GPU build run on PoCL differs from onnxruntime ({bad}){where}",
                              "report it with the model; blockprune verify prints the per-kernel table")


# ---------------------------------------------------------------------------------------------
# inputs and reference
# ---------------------------------------------------------------------------------------------
def model_feeds(model: onnx.ModelProto, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Vocabulary-wide token ids and a mask with padding in its last row (even at batch 1).

    Why the extra padding: the shared sample feeds pad every other row, so batch 1 (what GPU
    builds use) would never exercise the masked path of the attention.
    """
    from blockprune.sample_inputs import make_feeds, with_padding

    return with_padding(make_feeds(model, batch, seq, seed=seed))


def _describe(feeds: Mapping[str, np.ndarray]) -> str:
    parts = []
    for name, a in feeds.items():
        if name == "attention_mask":
            parts.append(f"{name} with {int((a == 0).sum())}/{a.size} padded")
        elif a.dtype.kind in "iu":
            parts.append(f"{name} in [{int(a.min())}, {int(a.max())}]")
    return ", ".join(parts)


def onnxruntime_outputs(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of ``model`` (exact-integer reference for int8) in onnxruntime, by name."""
    from blockprune.passes.verify import _session

    from blockprune.backends.tvm.verify.artifact_check import reference_model

    sess = _session(reference_model(model))
    wanted = {i.name for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {k: v for k, v in feeds.items() if k in wanted})))


# ---------------------------------------------------------------------------------------------
# the VM's main
# ---------------------------------------------------------------------------------------------
def vm_main(scheduled, preset):
    """``main`` after the Relax passes ``tvm.compile`` runs for the GPU up to the memory plan.

    Same passes as :func:`.gpu_compile.build_gpu` (generic GPU dataflow lowering, then
    ``StaticPlanBlockMemory``); the later ones only turn this into VM instructions.
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.gpu_generic import pipeline as gpu_generic

    target = preset.target()
    with target:
        mod = tvm.transform.Sequential(gpu_generic.dataflow_lower_passes(target)
                                       + [relax.transform.StaticPlanBlockMemory()])(scheduled)
    return mod["main"]


@dataclass
class _Machine:
    """What a walk over ``main`` needs: lowered kernels, CPU references, bound values."""

    lowered: Any  # ov.LoweredGPUModule
    prim_funcs: dict[str, Any]
    preset: Any
    cpu: Any = None  # compiled CPU references (None: no trace)
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    values: dict[Any, Any] = field(default_factory=dict)  # relax.Var -> np.ndarray | tuple | bytes
    calls: list[CallTrace] = field(default_factory=list)
    host_ops: int = 0
    corrupt: Any = None  # test hook: (index, func, {param: array}) -> None, after the PoCL run


def _shape(expr) -> tuple[int, ...]:
    values = getattr(expr, "values", None)
    if values is None:
        raise BlockpruneError(f"a shape in main is not static: {expr}", "compile with a fixed batch and seq")
    return tuple(int(v) for v in values)


def _scalar(expr) -> int:
    value = getattr(expr, "value", expr)
    return int(getattr(value, "value", value))


def _eval(m: _Machine, expr):
    """Value of an argument expression: bound var, constant, tuple (item), shape or scalar."""
    import tvm
    from tvm import relax

    if isinstance(expr, relax.Var):
        if expr not in m.values:
            raise BlockpruneError(f"main uses {expr.name} before it is bound", "this is a bug; report it")
        return m.values[expr]
    if isinstance(expr, tvm.ir.expr.Constant):
        return expr.value.numpy()
    if isinstance(expr, relax.Tuple):
        return tuple(_eval(m, f) for f in expr.fields)
    if isinstance(expr, relax.TupleGetItem):
        return _eval(m, expr.tuple_value)[int(expr.index)]
    if isinstance(expr, relax.ShapeExpr):
        return _shape(expr)
    if hasattr(expr, "value") and isinstance(getattr(expr.value, "value", expr.value), (int, np.integer)):
        return _scalar(expr)
    raise BlockpruneError(f"cannot evaluate {type(expr).__name__} in main on the host",
                          "this build uses a construct the PoCL model run does not know; verify kernels only")


def _view(storage: np.ndarray, offset: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A tensor allocated in ``storage`` at ``offset`` bytes (shares its memory, as on the device)."""
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if offset + nbytes > storage.nbytes:
        raise BlockpruneError(f"a {list(shape)} {dtype} tensor at offset {offset} overruns its storage "
                              f"of {storage.nbytes} bytes", "this is a memory-planning bug; report it with the model")
    return storage[offset:offset + nbytes].view(dt).reshape(shape)


def _binding(m: _Machine, var, value) -> None:
    """Evaluate one binding of ``main`` (VM order) and bind its result."""
    from tvm import relax

    if isinstance(value, relax.Call) and isinstance(value.op, relax.GlobalVar):
        m.values[var] = _call_prim_func(m, value.op.name_hint, [_eval(m, a) for a in value.args])
        return
    m.host_ops += 1
    if not isinstance(value, relax.Call):
        m.values[var] = _eval(m, value)
        return
    op = value.op
    name = op.global_symbol if isinstance(op, relax.ExternFunc) else getattr(op, "name", str(op))
    args = value.args
    if name == "relax.memory.alloc_storage":
        nbytes = int(np.prod(_shape(args[0])))  # the size is in bytes whatever the dtype
        m.values[var] = np.full(nbytes, 0xFF, dtype=np.uint8)  # NaN floats: unwritten elements show
    elif name == "relax.memory.alloc_tensor":
        m.values[var] = _view(_eval(m, args[0]), _scalar(args[1]), _shape(args[2]), str(args[3].value))
    elif name == "relax.builtin.alloc_tensor":
        shape, dtype = _shape(args[0]), str(args[1].value)
        m.values[var] = _view(np.full(int(np.prod(shape)) * np.dtype(dtype).itemsize, 0xFF, np.uint8), 0, shape, dtype)
    elif name == "relax.reshape" or (name == "relax.call_packed" and isinstance(args[0], relax.ExternFunc)
                                     and args[0].global_symbol in _HOST_PACKED):
        src, shape = (args[0], args[1]) if name == "relax.reshape" else (args[1], args[2])
        m.values[var] = _eval(m, src).reshape(_shape(shape))  # a view, as the VM's reshape
    elif name in _HOST_PACKED:
        m.values[var] = _eval(m, args[0]).reshape(_shape(args[1]))
    elif name == "relax.null_value":
        m.values[var] = None
    else:
        packed = f" {args[0].global_symbol!r}" if args and isinstance(args[0], relax.ExternFunc) else ""
        raise BlockpruneError(f"main calls {name}{packed}, which the PoCL model run has no host version of",
                              "verify the kernels only (blockprune verify --no-end-to-end) and report the model")


def _call_prim_func(m: _Machine, name: str, args: list) -> None:
    """Run ``name``'s kernels on PoCL on ``args`` (inputs then outputs); write outputs in place."""
    from tvm import tirx

    func = m.prim_funcs.get(name)
    if func is None or name not in m.lowered.launches:
        raise BlockpruneError(f"main calls {name!r}, which has no OpenCL kernel in the GPU build",
                              "this is a bug in the GPU build; report it with the model")
    params = ov._param_buffers(func)
    if len(params) != len(args):
        raise BlockpruneError(f"{name} takes {len(params)} buffers, main passes {len(args)}",
                              "this is a bug in the GPU build; report it with the model")
    arrays, env = {}, {}
    for (pname, pshape, dtype), value in zip(params, args):
        arr = np.asarray(value)
        if arr.dtype != np.dtype(dtype) or arr.ndim != len(pshape):
            raise BlockpruneError(f"{name}: argument {pname!r} is {arr.dtype}{list(arr.shape)}, the kernel takes "
                                  f"{dtype} with {len(pshape)} dims", "this is a bug in the GPU build; report it")
        for dim, size in zip(pshape, arr.shape):
            if isinstance(dim, tirx.Var):
                env.setdefault(dim.name, int(size))
        arrays[pname] = np.array(arr, order="C", copy=True)  # ascontiguousarray would make 0-d 1-d
    gpu_out, launched = ov.run_on_opencl(m.lowered, name, arrays, env, m.preset)
    index = len(m.calls)
    if m.corrupt is not None:
        m.corrupt(index, name, gpu_out)
    diff, ratio = (_departure(gpu_out, ov.run_on_cpu(m.cpu, name, arrays, [p[0] for p in params]), m)
                   if m.cpu is not None else (float("nan"), float("nan")))
    m.calls.append(CallTrace(index, name, len(launched), diff, ratio))
    for (pname, _, _), value in zip(params, args):
        if isinstance(value, np.ndarray) and value.flags.writeable:
            value[...] = gpu_out[pname]  # every buffer as the device leaves it (inputs unchanged)


def _departure(gpu_out: Mapping[str, np.ndarray], cpu_out: Mapping[str, np.ndarray], m: _Machine) -> tuple[float, float]:
    """Max |gpu - cpu| and max elementwise ``|gpu - cpu| / (atol + rtol |cpu|)`` (inf for a NaN on one side)."""
    diff, ratio = 0.0, 0.0
    for pname, ref in cpu_out.items():
        if not ref.size:
            continue
        g, c = gpu_out[pname].astype(np.float64), ref.astype(np.float64)
        same_nonfinite = (~np.isfinite(c)) & ((g == c) | (np.isnan(g) & np.isnan(c)))
        d = np.where(same_nonfinite, 0.0, np.abs(g - c))
        if not np.isfinite(d).all():
            return float("inf"), float("inf")
        diff = max(diff, float(d.max()))
        ratio = max(ratio, float((d / (m.atol + m.rtol * np.abs(np.where(same_nonfinite, 0.0, c)))).max()))
    return diff, ratio


def run_main_on_pocl(mods, feeds: Mapping[str, np.ndarray], *, trace: bool = True, rtol: float = DEFAULT_RTOL,
                     atol: float = DEFAULT_ATOL, corrupt=None) -> tuple[list[np.ndarray], _Machine]:
    """Walk the VM's ``main`` of ``mods`` (:class:`.gpu_verify.GPUModules`) on ``feeds``; its outputs in order."""
    from tvm import relax

    if mods.scheduled is None:
        raise BlockpruneError("these GPU modules carry no Relax main", "build them with gpu_verify.gpu_modules")
    preset = mods.gpu_import.preset
    main = vm_main(mods.scheduled, preset)
    m = _Machine(mods.lowered(), {gv.name_hint: f for gv, f in mods.gpu.functions.items()}, preset,
                 mods.cpu_reference() if trace else None, rtol, atol, corrupt=corrupt)
    for param in main.params:
        name = param.name
        if name not in feeds:
            raise BlockpruneError(f"the GPU build takes input {name!r}, which the feeds lack",
                                  f"give every input: {[p.name for p in main.params]}")
        want = param.ty
        arr = np.asarray(feeds[name])
        if tuple(arr.shape) != _shape(want.shape):
            raise BlockpruneError(f"input {name!r} has shape {list(arr.shape)}, the build takes "
                                  f"{list(_shape(want.shape))}", "feed the batch and seq it was compiled for")
        m.values[param] = np.ascontiguousarray(arr, dtype=str(want.dtype))
    body = main.body
    for block in body.blocks:
        for b in block.bindings:
            _binding(m, b.var, b.value)
    out = _eval(m, body.body)
    outputs = list(out) if isinstance(out, tuple) else [out]
    return [np.array(o, copy=True) for o in outputs], m


# ---------------------------------------------------------------------------------------------
# against onnxruntime
# ---------------------------------------------------------------------------------------------
def verify_model_run(mods, model: onnx.ModelProto, *, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
                     seeds: tuple[int, ...] = DEFAULT_SEEDS, trace: bool = True, corrupt=None) -> ModelRunReport:
    """Whole build of ``mods`` on PoCL vs onnxruntime on ``model``, per output, on realistic feeds.

    ``mods`` must come from ``model`` (:func:`.gpu_verify.gpu_modules`); ``corrupt`` is a test
    hook called after each PoCL call with ``(index, func, buffers)`` to alter its results.
    """
    imported = mods.gpu_import.imported
    batch, seq = imported.inputs[0].shape[:2] if imported.inputs and len(imported.inputs[0].shape) >= 2 else (1, 1)
    worst: dict[str, list] = {}
    calls: list[CallTrace] = []
    host_ops, described = 0, []
    for i, seed in enumerate(seeds):
        feeds = model_feeds(model, int(batch), int(seq), seed)
        refs = onnxruntime_outputs(model, feeds)
        got, machine = run_main_on_pocl(mods, feeds, trace=trace and i == 0, rtol=rtol, atol=atol, corrupt=corrupt)
        if i == 0:
            calls, host_ops = machine.calls, machine.host_ops
        described.append(_describe(feeds))
        if len(got) != len(refs):
            raise BlockpruneError(f"the GPU build returns {len(got)} output(s), onnxruntime {len(refs)}",
                                  "compare against the model the build was compiled from")
        for (name, ref), g in zip(refs.items(), got):
            if g.shape != ref.shape:
                raise BlockpruneError(f"output {name!r}: the GPU build gives {list(g.shape)}, onnxruntime "
                                      f"{list(ref.shape)}", "compare against the model the build was compiled from")
            d = np.abs(g.astype(np.float64) - ref.astype(np.float64))
            diff = float(d.max()) if np.isfinite(d).all() else float("inf")
            scale = float(np.abs(ref).max()) if ref.size else 0.0
            old = worst.setdefault(name, [ref.shape, 0.0, 0.0])
            old[1], old[2] = max(old[1], diff), max(old[2], scale)
    outputs = [OutputCheck(n, tuple(s), d, r, rtol, atol) for n, (s, d, r) in worst.items()]
    return ModelRunReport(mods.gpu_import.preset.name, outputs, calls, host_ops, tuple(seeds),
                          f"seeds {list(seeds)}: {described[0]}")


def verify_model_end_to_end(source: "str | os.PathLike | onnx.ModelProto", target: Any = None, *,
                            batch: int | None = None, seq: int | None = None, rtol: float = DEFAULT_RTOL,
                            atol: float = DEFAULT_ATOL, seeds: tuple[int, ...] = DEFAULT_SEEDS) -> ModelRunReport:
    """Artifact directory (its source model and options) or ONNX model -> whole-model PoCL report."""
    from blockprune.backends.tvm.verify.gpu_verify import _resolve_source, gpu_modules

    ov._opencl_context()  # no platform -> the install hint, before any import work
    model, options = _resolve_source(source, target, batch, seq)
    return verify_model_run(gpu_modules(model, **options), model, rtol=rtol, atol=atol, seeds=seeds)


__all__ = ["OutputCheck", "CallTrace", "ModelRunReport", "model_feeds", "vm_main", "run_main_on_pocl",
           "verify_model_run", "verify_model_end_to_end", "DEFAULT_RTOL", "DEFAULT_ATOL"]
