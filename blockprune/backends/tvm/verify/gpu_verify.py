"""Verify every OpenCL kernel of a whole-model GPU build on PoCL against a CPU build of the same PrimFunc.

Why kernel by kernel: no TVM runtime with OpenCL exists here (tvm-notes), so the compiled
``model.so`` cannot run; what can run is the generated OpenCL C, one kernel at a time, on
PoCL through pyopencl (:mod:`.opencl_verify`). For each PrimFunc of the GPU-scheduled module
the reference is the same computation compiled for ``llvm``:

* dense ops scheduled by dlight: the *unscheduled* PrimFunc (plain loops, no schedule that
  could hide a bug);
* BSR kernels: :func:`.bsr_gpu_kernel.bsr_reference_primfunc` (same signature, serial loops),
  run with the real ``data``/``indices``/``indptr`` constants of *every* layer that calls the
  kernel (random index arrays would read out of bounds and test nothing).

Other float buffers get uniform(-1, 1) values, integer ones (token ids, masks) values in
{0, 1}: in bounds for any gather over an axis of at least 2. The module checked is rebuilt
from the artifact's source model with the options in its manifest through the very functions
compile uses (:func:`.gpu_compile.import_for_gpu`, :func:`.gpu_compile.schedule_for_gpu`), so
it is the module that was compiled.

Tolerance per kernel: ``atol + rtol * max|reference|`` (defaults ``1e-5`` and ``1e-4``): the
GPU schedules reorder float32 sums of up to a few thousand terms (a few ulps each) and PoCL's
``exp``/``erf`` differ from LLVM's by an ulp; a wrong index or a race gives errors of order 1.
PoCL timings say nothing about a phone; they are not reported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from blockprune.errors import BlockpruneError

from blockprune.backends.tvm.verify import opencl_verify as ov
from blockprune.backends.tvm.runtime.artifact import MANIFEST, Manifest
from blockprune.backends.tvm.pipeline.gpu_compile import GPU_PREFIX, KERNELS_CL, GPUImport, import_for_gpu, kernel_names, schedule_for_gpu
from blockprune.backends.tvm.targets.gpu_presets import LaunchConfig, resolve_gpu_target
from blockprune.backends.tvm.onnx_import.importer import DEFAULT_BATCH, DEFAULT_SEQ

DEFAULT_RTOL, DEFAULT_ATOL = 1e-4, 1e-5


@dataclass(frozen=True)
class KernelRow:
    """One OpenCL kernel: where it came from, how it launches, how far it is from the CPU."""

    func: str  # PrimFunc name
    kernel: str  # OpenCL kernel name
    kind: str  # "bsr" or "dense (dlight)"
    launch: LaunchConfig
    runs: int  # input sets checked (BSR: one per layer using the kernel)
    max_abs_diff: float
    tolerance: float  # the largest tolerance over the runs (scale from each run's reference)

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.tolerance)


@dataclass
class VerifyReport:
    target: str
    rows: list[KernelRow]
    missing: list[str] = field(default_factory=list)  # kernels of the artifact's kernels.cl not verified
    artifact_kernels: int | None = None  # distinct kernels in kernels.cl (artifact directories)
    model_run: Any = None  # gpu_model_run.ModelRunReport: the whole build on PoCL vs onnxruntime (if run)

    @property
    def ok(self) -> bool:
        kernels_ok = bool(self.rows) and all(r.ok for r in self.rows) and not self.missing
        return kernels_ok and (self.model_run is None or self.model_run.ok)

    @property
    def failed(self) -> list[KernelRow]:
        return [r for r in self.rows if not r.ok]

    def table(self) -> str:
        return format_rows(self.rows)


def format_rows(rows: list[KernelRow]) -> str:
    """Markdown table (no timing column: PoCL time is not a phone's)."""
    lines = ["| function | kernel | kind | grid (x,y,z) | work-group (x,y,z) | local mem | runs | max abs diff "
             "| tolerance | ok |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.func} | {r.kernel} | {r.kind} | {r.launch.grid} | {r.launch.block} | "
                     f"{r.launch.local_bytes} B | {r.runs} | {r.max_abs_diff:.2e} | {r.tolerance:.1e} "
                     f"| {'yes' if r.ok else 'NO'} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# what to verify
# ---------------------------------------------------------------------------------------------
def _from_artifact(directory: Path, target: Any) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The source model and the compile options of an artifact; refuses a mismatch clearly."""
    from blockprune.onnx_io import load_onnx

    from blockprune.backends.tvm.runtime.artifact import sha256_file

    manifest = Manifest.read(directory)
    if manifest.target.get("device") != "opencl":
        raise BlockpruneError(f"{directory} was compiled for {manifest.target_name!r}, not for an OpenCL GPU",
                              "compile it with --target mali or --target adreno first")
    if target is not None and resolve_gpu_target(target).name != manifest.target_name:
        raise BlockpruneError(f"{directory} was compiled for {manifest.target_name!r}, not "
                              f"{resolve_gpu_target(target).name!r}",
                              f"pass --target {manifest.target_name}, or recompile for the other GPU")
    path = manifest.source.get("path")
    if not path or not Path(path).is_file():
        raise BlockpruneError(f"the source model of {directory} ({path}) is not at hand",
                              "verify the ONNX model itself: blockprune verify --target "
                              f"{manifest.target_name} MODEL.onnx")
    if sha256_file(path) != manifest.source.get("sha256"):
        raise BlockpruneError(f"{path} changed since {directory} was compiled (sha256 differs)",
                              "recompile the artifact, or verify the model file itself")
    gpu = manifest.target.get("gpu", {})
    options = {"target": manifest.target.get("config") if manifest.target_name == "custom" else manifest.target_name,
               "batch": manifest.batch, "seq": manifest.seq, **gpu}
    return load_onnx(path), options


def _resolve_source(source: Any, target: Any, batch: int | None, seq: int | None):
    if isinstance(source, onnx.ModelProto):
        model, options = source, {}
    else:
        path = Path(source)
        if path.is_dir() and (path / MANIFEST).is_file():
            model, options = _from_artifact(path, target)
        elif path.is_file():
            from blockprune.onnx_io import load_onnx

            model, options = load_onnx(path), {}
        else:
            raise BlockpruneError(f"{path} is neither a GPU artifact directory nor an ONNX model",
                                  "pass the directory written by blockprune compile --target mali, or an .onnx file")
    if "target" not in options:
        if target is None:
            raise BlockpruneError("no GPU target given for a model file", "pass --target mali or --target adreno")
        options["target"] = target
    options.setdefault("batch", DEFAULT_BATCH if batch is None else batch)
    options.setdefault("seq", DEFAULT_SEQ if seq is None else seq)
    return model, options


# ---------------------------------------------------------------------------------------------
# modules and inputs
# ---------------------------------------------------------------------------------------------
def _prim_funcs(mod) -> dict[str, Any]:
    import tvm

    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def bsr_layer_arrays(relax_mod, kernel_names: set[str]) -> dict[str, list[dict[str, np.ndarray]]]:
    """``kernel -> [{"data", "indices", "indptr"[, "bias"]}]``, one per call in ``main`` (the layers).

    Read from the constants the importer bound to each ``call_tir``: the model's own arrays.
    """
    import tvm
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")
    out: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in kernel_names}
    names = ("data", "indices", "indptr", "bias")
    for gv, func in relax_mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        for block in func.body.blocks:
            for binding in block.bindings:
                value = binding.value
                if not (isinstance(value, relax.Call) and value.op.same_as(call_tir)):
                    continue
                callee = value.args[0].name_hint
                if callee not in out:
                    continue
                consts = [a for a in value.args[1].fields[1:]]
                if not all(isinstance(c, tvm.ir.expr.Constant) for c in consts):
                    raise BlockpruneError(f"the BSR arrays of a call to {callee} are not constants",
                                          "this is a bug in the GPU import; report it with the model")
                out[callee].append({n: c.value.numpy() for n, c in zip(names, consts)})
    return out


def _tir_nodes(node, visit) -> None:
    """Pre-order walk over TIR statements *and* expressions (``ov._walk`` stops at statements)."""
    import tvm

    visit(node)
    for name in ov._fields(node):
        if name == "span":
            continue
        value = getattr(node, name)
        items = value if isinstance(value, (list, tuple)) or type(value).__name__ == "Array" else [value]
        for item in items:
            if isinstance(item, (tvm.tirx.Stmt, tvm.ir.expr.Expr)):
                _tir_nodes(item, visit)


def _accessed_buffer(node):
    """The buffer a TIR load or store touches, or None (0.27 spells a load ``TensorLoad.source``)."""
    import tvm

    if isinstance(node, tvm.tirx.BufferStore):
        return node.buffer
    if isinstance(node, tvm.ir.expr.TensorLoad):
        return node.source
    return None


def gather_bounds(func) -> dict[str, int]:
    """For each buffer whose values index another buffer (a gather), the smallest extent it indexes.

    Why: random index values must stay in bounds, and ``{0, 1}`` does not for a one-row table
    (RoBERTa's token-type embedding has a single row; reading row 1 returned garbage).
    """
    from tvm import tirx

    bounds: dict[str, int] = {}

    def note(node) -> None:
        buf = _accessed_buffer(node)
        if buf is None:
            return
        for index, extent in zip(node.indices, buf.shape):
            if not isinstance(extent, (int, tirx.IntImm)):
                continue
            inner: list[str] = []
            _tir_nodes(index, lambda n: inner.append(b.name) if (b := _accessed_buffer(n)) is not None else None)
            for name in inner:
                bounds[name] = min(bounds.get(name, int(extent)), int(extent))

    _tir_nodes(func.body, note)
    return bounds


def _dense_inputs(func, rng: np.random.Generator, env: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Arrays for a PrimFunc: uniform(-1, 1) floats, integers in {0, 1}.

    {0, 1} keeps token ids and masks meaningful; an integer buffer that indexes an axis of one
    element (:func:`gather_bounds`) gets zeros, so every gather stays in bounds.
    Symbolic dims (generic kernels such as the GPU scan) take their values from ``env``, the
    static shapes at the function's call site (:func:`call_site_dims`).
    """
    env = env or {}
    arrays = {}
    bounds = gather_bounds(func)
    for name, shape, dtype in ov._param_buffers(func):
        try:
            dims = tuple(env[d.name] if hasattr(d, "name") and d.name in env else int(d) for d in shape)
        except TypeError:
            raise BlockpruneError(f"{name} of a dense PrimFunc has a symbolic shape {shape}",
                                  "the GPU backend compiles static shapes only (fix batch and seq)") from None
        dt = np.dtype(dtype)
        high = max(1, min(2, bounds.get(name, 2)))
        values = rng.uniform(-1.0, 1.0, size=dims) if dt.kind == "f" else rng.integers(0, high, size=dims)
        arrays[name] = np.asarray(values, dtype=dt)
    return arrays


def call_site_dims(relax_mod) -> dict[str, dict[str, int]]:
    """Per PrimFunc called from ``main``: its symbolic shape vars bound to the call's static shapes."""
    import tvm
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")
    funcs = _prim_funcs(relax_mod)
    out: dict[str, dict[str, int]] = {}
    for block in relax_mod["main"].body.blocks:
        for binding in block.bindings:
            call = binding.value
            if not (isinstance(call, relax.Call) and call.op.same_as(call_tir)):
                continue
            name = call.args[0].name_hint
            if name not in funcs:
                continue
            res = binding.var.ty
            shapes = [a.ty.shape for a in call.args[1].fields] + \
                ([f.shape for f in res.fields] if isinstance(res, relax.TupleType) else [res.shape])
            env = out.setdefault(name, {})
            for (_, pshape, _), shape in zip(ov._param_buffers(funcs[name]), shapes):
                values = getattr(shape, "values", None) or []
                for d, v in zip(pshape, values):
                    if isinstance(d, tvm.tirx.Var) and isinstance(v, tvm.tirx.IntImm):
                        env[d.name] = int(v)
    return out


@dataclass
class GPUModules:
    """The scheduled PrimFuncs, their CPU references and the inputs BSR kernels need."""

    gpu: Any  # tvm.IRModule of GPU-scheduled PrimFuncs
    ref: Any  # same names, CPU reference PrimFuncs
    bsr_inputs: dict[str, list[dict[str, np.ndarray]]]
    gpu_import: GPUImport
    dims: dict[str, dict[str, int]] = field(default_factory=dict)  # symbolic dims per function (call sites)
    scheduled: Any = None  # the scheduled Relax module (its main is what the model run walks)
    _built: dict[str, Any] = field(default_factory=dict, repr=False)

    def lowered(self) -> "ov.LoweredGPUModule":
        """The GPU PrimFuncs lowered to OpenCL once, shared by the kernel check and the model run."""
        if "lowered" not in self._built:
            self._built["lowered"] = ov.lower_for_opencl(self.gpu, self.gpu_import.preset)
        return self._built["lowered"]

    def cpu_reference(self):
        """The reference PrimFuncs compiled for llvm once (shared likewise)."""
        if "cpu" not in self._built:
            self._built["cpu"] = ov.compile_reference(self.ref)
        return self._built["cpu"]


def gpu_modules(model: onnx.ModelProto, target: Any = "mali", batch: int = DEFAULT_BATCH, seq: int = DEFAULT_SEQ,
                **options: Any) -> GPUModules:
    """Import and schedule ``model`` exactly as compile does; pair each PrimFunc with its reference."""
    import tvm

    from blockprune.backends.tvm.kernels.bsr_gpu_kernel import bsr_reference_primfunc

    gpu_import = import_for_gpu(model, target, batch, seq, **options)
    scheduled, unscheduled = schedule_for_gpu(gpu_import.imported.mod, gpu_import.preset)
    gpu_funcs = _prim_funcs(scheduled)
    ref_funcs = _prim_funcs(unscheduled)
    for name, (spec, _) in gpu_import.kernel_specs.items():
        ref_funcs[name] = bsr_reference_primfunc(spec, name)
    _cpu_references_for_prebound(gpu_import.imported.mod, ref_funcs, set(gpu_import.kernel_specs))
    bsr = bsr_layer_arrays(scheduled, set(gpu_import.kernel_specs))
    return GPUModules(tvm.IRModule(gpu_funcs), tvm.IRModule(ref_funcs), bsr, gpu_import, call_site_dims(scheduled),
                      scheduled)


def _cpu_references_for_prebound(relax_mod, ref_funcs: dict[str, Any], skip: set[str]) -> None:
    """Replace references that legalization already bound to GPU threads by their CPU legalization.

    Why: some ops legalize to target-specific TIR on GPU targets (``cumsum``, which RoBERTa's
    position ids use, becomes a thread-bound scan); that "unscheduled" function cannot be built
    for llvm. The same Relax module legalized and fused for llvm gives the same function names
    (fusion does not depend on the target), computed with plain loops: a reference that shares
    no code with the GPU kernel.
    """
    import tvm
    from tvm import relax

    bound = [n for n, f in ref_funcs.items() if n not in skip and ov._binds_threads(f)]
    if not bound:
        return
    with tvm.target.Target("llvm"):
        cpu = tvm.transform.Sequential([
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR()])(relax_mod)
    cpu_funcs = _prim_funcs(cpu)
    for name in bound:
        ref = cpu_funcs.get(name) or (_cumsum_reference(ref_funcs[name]) if "cumsum" in name else None)
        if ref is None or len(ref.params) != len(ref_funcs[name].params):
            raise BlockpruneError(f"no CPU reference for the GPU function {name!r} (its legalization is "
                                  "GPU-specific and the CPU legalization differs)",
                                  "report the model; the artifact itself was compiled, only this check is missing")
        ref_funcs[name] = ref


def _scan_attrs(func, rank: int) -> tuple[int, int]:
    """``(axis, exclusive)`` of a GPU scan: our row-scan kernel records them (``SCAN_ATTR``);
    TVM's ``gpu_2d_continuous_cumsum`` is an inclusive scan of the last axis."""
    from blockprune.backends.tvm.kernels.cumsum_gpu import SCAN_ATTR

    attrs = func.attrs.get(SCAN_ATTR) if func.attrs is not None else None
    if attrs is None:
        return rank - 1, 0
    return int(attrs["axis"]), int(attrs["exclusive"])


def _cumsum_reference(func):
    """CPU ``cumsum`` with ``func``'s ``(A, Out)`` buffers, axis and exclusiveness: the reference
    for the GPU scans that replace ``relax.cumsum`` (ours, :mod:`.cumsum_gpu`, or TVM's)."""
    import tvm
    from tvm import relax

    params = ov._param_buffers(func)
    if len(params) != 2:
        return None
    (_, a_shape, a_dtype), (_, _, out_dtype) = params
    shape = [int(d) if isinstance(d, (int, tvm.tirx.IntImm)) else tvm.tirx.Var(f"d{i}", "int64")
             for i, d in enumerate(a_shape)]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, a_dtype))
    with bb.function("main", [x]):
        axis, exclusive = _scan_attrs(func, len(shape))
        y = bb.emit(relax.op.cumsum(x, axis=axis, dtype=out_dtype, exclusive=exclusive))
        bb.emit_func_output(y)
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    target = tvm.target.Target("llvm")
    with target:  # the CPU dispatch turns cumsum into a PrimFunc (LegalizeOps alone leaves it)
        legal = tvm.transform.Sequential(cpu.library_dispatch_passes(target) + [relax.transform.LegalizeOps()])(bb.get())
    funcs = _prim_funcs(legal)
    return next(iter(funcs.values())) if len(funcs) == 1 else None


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
def verify_modules(mods: GPUModules, *, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
                   seed: int = 0) -> list[KernelRow]:
    """Run each PrimFunc's kernels on PoCL and its reference on llvm; one row per kernel."""
    ov._opencl_context()  # fail early, naming pocl-opencl-icd
    preset = mods.gpu_import.preset
    lowered = mods.lowered()
    cpu = mods.cpu_reference()
    rng = np.random.default_rng(seed)
    rows: list[KernelRow] = []
    for name, func in _prim_funcs(mods.gpu).items():
        is_bsr = name in mods.gpu_import.kernel_specs
        input_sets = mods.bsr_inputs.get(name, []) if is_bsr else [None]
        if is_bsr and not input_sets:
            continue  # a kernel no layer calls (cannot happen after import; nothing to run)
        if name not in lowered.launches:
            raise BlockpruneError(f"cannot derive the launch configuration of {name!r}: it launches no GPU kernel",
                                  "schedule it for the GPU; unscheduled loops would stay on the host")
        order = [p[0] for p in ov._param_buffers(func)]
        per_kernel: dict[str, dict[str, Any]] = {}
        for given in input_sets:
            if is_bsr:  # real BSR arrays; X and Y random (nnzb is symbolic: bound from them)
                given = {k: v for k, v in given.items() if k in order}
                arrays, env = ov._bind_inputs(name, func, given, rng)
            else:
                env = mods.dims.get(name, {})
                arrays = _dense_inputs(func, rng, env)
            gpu_out, launched = ov.run_on_opencl(lowered, name, arrays, env, preset)
            cpu_out = ov.run_on_cpu(cpu, name, arrays, order)
            diff, scale = _compare(gpu_out, cpu_out)
            for kernel, config, _ in launched:
                row = per_kernel.setdefault(kernel, {"launch": config, "runs": 0, "diff": 0.0, "tol": 0.0})
                row["runs"] += 1
                row["diff"] = max(row["diff"], diff)
                row["tol"] = max(row["tol"], atol + rtol * scale)
        for kernel, r in per_kernel.items():
            rows.append(KernelRow(name, kernel, "bsr" if is_bsr else "dense (dlight)", r["launch"], r["runs"],
                                  r["diff"], r["tol"]))
    return rows


def _compare(gpu_out: dict[str, np.ndarray], cpu_out: dict[str, np.ndarray]) -> tuple[float, float]:
    """Max |GPU - CPU| over every buffer, and max |reference| over the float ones."""
    diff, scale = 0.0, 0.0
    for pname, ref in cpu_out.items():
        if not ref.size:
            continue
        got = gpu_out[pname].astype(np.float64)
        d = np.abs(got - ref.astype(np.float64))
        diff = max(diff, float(np.nanmax(d)) if np.isfinite(d).all() else float("inf"))
        if ref.dtype.kind == "f":
            scale = max(scale, float(np.max(np.abs(ref))))
    return diff, scale


def verify_artifact_kernels(source: "str | os.PathLike | onnx.ModelProto", target: Any = None, *,
                            batch: int | None = None, seq: int | None = None, rtol: float = DEFAULT_RTOL,
                            atol: float = DEFAULT_ATOL, seed: int = 0, end_to_end: bool = False,
                            e2e_rtol: float | None = None, e2e_atol: float | None = None) -> VerifyReport:
    """Per-kernel PoCL-vs-CPU table for an artifact directory (its source model and options) or a model.

    ``target`` is required for a model and, for an artifact, must be the one it was built for.
    ``end_to_end`` also runs the whole build call by call on PoCL against onnxruntime
    (:mod:`.gpu_model_run`, its own per-output tolerance), sharing the lowered kernels.
    """
    from blockprune.backends.tvm.verify import gpu_model_run as gm

    ov._opencl_context()  # before any import work: no platform -> the install hint
    model, options = _resolve_source(source, target, batch, seq)
    mods = gpu_modules(model, **options)
    rows = verify_modules(mods, rtol=rtol, atol=atol, seed=seed)
    report = VerifyReport(mods.gpu_import.preset.name, rows)
    if end_to_end:
        report.model_run = gm.verify_model_run(mods, model, rtol=gm.DEFAULT_RTOL if e2e_rtol is None else e2e_rtol,
                                               atol=gm.DEFAULT_ATOL if e2e_atol is None else e2e_atol)
    if not isinstance(source, onnx.ModelProto) and (Path(source) / KERNELS_CL).is_file():
        # every kernel the artifact ships must be among those just verified (same build)
        shipped = kernel_names((Path(source) / KERNELS_CL).read_text())
        report.artifact_kernels = len(shipped)
        report.missing = sorted(shipped - {r.kernel for r in rows})
    return report


__all__ = ["KernelRow", "VerifyReport", "verify_artifact_kernels", "gpu_modules", "verify_modules",
           "bsr_layer_arrays", "format_rows", "GPU_PREFIX"]
