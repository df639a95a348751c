"""ONNX model (dense or block-sparse) -> OpenCL artifact for a mobile GPU preset (``mali``, ``adreno``).

Flow, and why each step:

1. **Per-layer GPU form** (:func:`gpu_forms`). The compress-time policy decided dense vs BSR with
   a *CPU* break-even. A GPU's dense matmul (dlight: shared-memory tiles, vector loads, every
   lane busy) is relatively stronger than a CPU's, and a sparse kernel pays for its irregular
   reads with idle lanes, so the GPU break-even density is lower: BSR layers denser than
   ``gpu_break_even`` are rebuilt as dense MatMuls, and (with ``dense_block``) dense weights
   with few non-zero blocks are lowered to BSR. The default is a parameter until it is
   measured on phones; the reasons go into the manifest.
2. **Import** with :func:`.importer.import_onnx`, whose BSR kernel converter is reused with
   a GPU kernel chooser: each ``BlockSparseMatMul`` becomes ``call_tir`` to the thread-bound
   kernel of :mod:`.bsr_gpu_kernel` (launch checked against the preset's limits here).
3. **Schedule** (:func:`schedule_for_gpu`): legalize and fuse as TVM's generic GPU pipeline
   does, then the dlight GPU rules on a copy (``ApplyDefaultSchedule`` updates its input).
   The unscheduled copy is what :mod:`.gpu_verify` uses as the CPU reference, so compile and
   verify see the same PrimFuncs.
4. **Build** with ``tvm.compile`` for ``opencl`` with the aarch64 host (TIR pipeline
   ``default``: the adreno default pipeline is broken in TVM 0.27), link with
   ``aarch64-linux-gnu-g++``, and write ``model.so`` + ``manifest.json`` + ``kernels.cl`` (the
   generated OpenCL C, for reading and for vendor offline compilers).

Running the artifact needs a TVM runtime built with OpenCL on the board (``docs/opencl-rpc.md``):
build ``libtvm_runtime.so`` with ``-DUSE_OPENCL=ON`` (Android: NDK toolchain file, ``-DANDROID_ABI=
arm64-v8a``, and the phone's ``libOpenCL.so`` from ``/vendor/lib64``; Linux boards: the vendor
driver or ``ocl-icd``), start ``python -m tvm.exec.rpc_server`` (or the Android RPC app) there,
then ``blockprune bench OUT --rpc HOST:PORT`` uploads the library and times it on device
``cl`` (:func:`bench_rpc_gpu`).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from blockprune.bsr import BSRMatrix, bsr_to_dense
from blockprune.errors import BlockpruneError

from blockprune.backends.tvm.runtime.artifact import LIBRARY, Manifest, atomic_dir, versions
from blockprune.backends.tvm.targets.gpu_presets import GPUPreset, check_launch, resolve_gpu_target
from blockprune.backends.tvm.onnx_import.importer import DEFAULT_BATCH, DEFAULT_SEQ, ImportResult, KernelPlan, _attr, import_onnx
from blockprune.backends.tvm.targets.presets import AARCH64_CROSS_CXX, AARCH64_CROSS_PACKAGE

KERNELS_CL = "kernels.cl"
# Block density above which a layer runs dense on a mobile GPU (see module doc, step 1). Lower
# than the CPU policy's 0.6: the dense GPU matmul is tiled and vectorized, the BSR kernel is not.
DEFAULT_GPU_BREAK_EVEN = 0.4
GPU_PREFIX = "bsr_matmul_gpu"


# ---------------------------------------------------------------------------------------------
# per-layer GPU form
# ---------------------------------------------------------------------------------------------
@dataclass
class GPUFormDecision:
    """Why one weight layer runs dense or block-sparse on the GPU (goes into the manifest)."""

    name: str
    form: str  # "bsr" or "dense"
    density: float | None
    reason: str


def gpu_forms(model: onnx.ModelProto, break_even: float = DEFAULT_GPU_BREAK_EVEN
              ) -> tuple[onnx.ModelProto, list[GPUFormDecision]]:
    """Densify ``BlockSparseMatMul`` nodes whose block density exceeds ``break_even``.

    Returns a copy (the input is untouched) and a decision per BSR node. The dense weight is
    rebuilt exactly from the BSR arrays, stored ``[in, out]`` for a plain ``MatMul``.
    """
    from blockprune.blocks import BlockShape
    from blockprune.passes.bsr_function import DOMAIN, OP

    if not 0.0 <= break_even <= 1.0:
        raise BlockpruneError(f"GPU break-even density {break_even} is outside [0, 1]",
                              "give the block density below which the BSR kernel beats dense on the GPU, e.g. 0.4")
    model = copy.deepcopy(model)
    inits = {t.name: t for t in model.graph.initializer}
    decisions: list[GPUFormDecision] = []
    for node in model.graph.node:
        if not (node.domain == DOMAIN and node.op_type == OP):
            continue
        wname = _attr(node, "weight_name", node.name)
        if any(i not in inits for i in node.input[1:4]):
            continue  # the importer names this error
        data, indices, indptr = (numpy_helper.to_array(inits[i]) for i in node.input[1:4])
        shape = tuple(int(x) for x in _attr(node, "dense_shape"))
        block = BlockShape(*[int(x) for x in _attr(node, "blocksize")])
        bsr = BSRMatrix(data.astype(np.float32), indices.astype(np.int32), indptr.astype(np.int32), shape, block)
        density = float(bsr.block_density)
        if density <= break_even:
            decisions.append(GPUFormDecision(wname, "bsr", density,
                                             f"density {density:.2f} <= GPU break-even {break_even:.2f}"))
            continue
        dense_name = f"{wname}__bp_gpu_dense"
        model.graph.initializer.append(numpy_helper.from_array(
            np.ascontiguousarray(bsr_to_dense(bsr).T.astype(np.float32)), dense_name))
        x = node.input[0]
        outputs = list(node.output)
        node.ClearField("attribute")
        del node.input[:]
        node.input.extend([x, dense_name])
        del node.output[:]
        node.output.extend(outputs)
        node.op_type, node.domain = "MatMul", ""
        decisions.append(GPUFormDecision(wname, "dense", density,
                                         f"density {density:.2f} > GPU break-even {break_even:.2f}"))
    return model, decisions


# ---------------------------------------------------------------------------------------------
# BSR kernels for the GPU (the importer's hook)
# ---------------------------------------------------------------------------------------------
@dataclass
class GPUKernelChooser:
    """``(spec, bsr) -> KernelPlan`` with the GPU kernel; remembers each kernel's spec by name.

    The launch of every kernel is checked against the preset here, so a schedule the phone
    would refuse fails at compile time naming the limit.
    """

    preset: GPUPreset
    specs: dict[str, Any] = field(default_factory=dict)  # PrimFunc name -> (spec, schedule)

    def __call__(self, spec, bsr: BSRMatrix) -> KernelPlan:
        from blockprune.backends.tvm.kernels.bsr_gpu_kernel import bsr_gpu_primfunc, choose_gpu_schedule, gpu_kernel_arrays
        from blockprune.backends.tvm.kernels.bsr_kernel import BSRKernelSpec

        # The kernel always takes X as [M, K]: flatten_bsr_calls() reshapes around the call. A
        # [B, S, K] kernel would read X through an unnamed buffer view, which the per-kernel
        # verification cannot match to its argument by name.
        spec = BSRKernelSpec((spec.m, spec.k), spec.n, spec.block, spec.bias)
        sch = choose_gpu_schedule(spec.m, spec.n, spec.block, self.preset)
        check_launch(self.preset, sch.launch(spec), f"{GPU_PREFIX} for {spec.n}x{bsr.shape[1]} {spec.block}")

        def build(name: str):
            self.specs[name] = (spec, sch)
            return bsr_gpu_primfunc(spec, sch, name)

        schedule = {"lanes": sch.lanes, "row_threads": sch.row_threads, "rows_per_thread": sch.rows_per_thread,
                    "stage_x": sch.stage_x, "launch": {"grid": list(sch.launch(spec).grid),
                                                        "block": list(sch.launch(spec).block)}}
        return KernelPlan((spec, sch), build, gpu_kernel_arrays(bsr), schedule, prefix=GPU_PREFIX)


def check_bsr_launches(model: onnx.ModelProto, preset: GPUPreset, m: int) -> None:
    """Schedule every BSR layer for ``m`` rows up front and check its launch against the preset.

    Why before import: the kernel chooser runs inside TVM's Relax mutator, where an exception
    reaches the caller as a bare RuntimeError; here it stays a BlockpruneError naming the limit.
    """
    from blockprune.blocks import BlockShape
    from blockprune.passes.bsr_function import DOMAIN, OP

    from blockprune.backends.tvm.kernels.bsr_gpu_kernel import choose_gpu_schedule
    from blockprune.backends.tvm.kernels.bsr_kernel import BSRKernelSpec

    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type == OP:
            n, k = (int(x) for x in _attr(node, "dense_shape"))
            block = BlockShape(*[int(x) for x in _attr(node, "blocksize")])
            spec = BSRKernelSpec((m, k), n, block)
            sch = choose_gpu_schedule(m, n, block, preset)
            check_launch(preset, sch.launch(spec), f"{GPU_PREFIX} of {_attr(node, 'weight_name', node.name)}")


@dataclass
class GPUImport:
    """The imported Relax module, its GPU form decisions and the BSR kernel specs."""

    imported: ImportResult
    preset: GPUPreset
    decisions: list[GPUFormDecision]
    kernel_specs: dict[str, Any]
    options: dict[str, Any]


def import_for_gpu(model: onnx.ModelProto, target: Any = "mali", batch: int = DEFAULT_BATCH,
                   seq: int = DEFAULT_SEQ, gpu_break_even: float = DEFAULT_GPU_BREAK_EVEN,
                   dense_block: str | None = None) -> GPUImport:
    """ONNX -> Relax with the GPU BSR kernels in place (steps 1-2 of the module doc)."""
    preset = resolve_gpu_target(target)
    prepared, decisions = gpu_forms(model, gpu_break_even)
    check_bsr_launches(prepared, preset, batch * seq)
    chooser = GPUKernelChooser(preset)
    imported = import_onnx(prepared, batch, seq, target=None,
                           lower_dense_below=gpu_break_even if dense_block else None,
                           dense_block=dense_block, bsr_kernel=chooser)
    if chooser.specs:
        imported.mod = flatten_bsr_calls(imported.mod, set(chooser.specs))
    options = {"gpu_break_even": gpu_break_even, "dense_block": dense_block}
    return GPUImport(imported, preset, decisions, chooser.specs, options)


def flatten_bsr_calls(mod, kernel_names: set[str]):
    """``call_tir(k, [x[B,S,K], ...])`` -> ``reshape(call_tir(k, [reshape(x, [M,K]), ...]), [B,S,N])``.

    The reshapes are views (no kernel, no copy after ``RewriteDataflowReshape``).
    """
    import math

    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    call_tir = tvm.ir.Op.get("relax.call_tir")

    @mutator
    class _Flatten(PyExprMutator):
        def visit_call_(self, call):  # noqa: N802 (TVM's visitor naming)
            call = self.visit_expr_post_order(call)
            if not (call.op.same_as(call_tir) and getattr(call.args[0], "name_hint", None) in kernel_names):
                return call
            args = list(call.args[1].fields)
            x_shape = [int(d) for d in args[0].ty.shape.values]
            if len(x_shape) == 2:
                return call
            y_shape = [int(d) for d in call.ty.shape.values]
            m = math.prod(x_shape[:-1])
            x2 = self.builder_.emit(relax.op.reshape(args[0], (m, x_shape[-1])))
            y2 = self.builder_.emit(relax.call_tir(call.args[0], relax.Tuple([x2, *args[1:]]),
                                                   out_ty=relax.TensorType((m, y_shape[-1]), "float32")))
            return relax.op.reshape(y2, y_shape)

    flat = _Flatten(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            flat.builder_.update_func(gv, flat.visit_expr(func))
    return flat.builder_.get()


# ---------------------------------------------------------------------------------------------
# scheduling and building
# ---------------------------------------------------------------------------------------------
def _legalize_passes(target, preset: GPUPreset) -> list:
    """TVM's generic GPU dispatch + legalize passes, minus its final dlight step (we schedule a copy).

    ``cumsum`` is rewritten to our row-scan kernel first: TVM's dispatch would substitute a
    scan that races between work-items (:mod:`.cumsum_gpu`, RoBERTa's position ids).
    """
    from tvm import relax
    from tvm.relax.backend.gpu_generic import pipeline as gpu_generic

    from blockprune.backends.tvm.kernels.cumsum_gpu import row_scan_pass

    return [row_scan_pass(preset)] + gpu_generic.library_dispatch_passes(target) + [
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
        relax.transform.FuseOps(), relax.transform.FuseTIR()]


def dlight_rules():
    """The dlight GPU rules, in TVM's order (first that applies wins)."""
    from tvm.s_tir import dlight as dl

    return (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())


def schedule_for_gpu(relax_mod, preset: GPUPreset):
    """``(scheduled, unscheduled)``: legalized+fused module, with and without dlight schedules.

    Both contain the same Relax ``main`` and PrimFunc names; the BSR kernels come scheduled
    (``tirx.is_scheduled``) and dlight leaves them alone.
    """
    import tvm
    from tvm.s_tir import dlight as dl

    target = preset.target()
    with target:
        unscheduled = tvm.transform.Sequential(_legalize_passes(target, preset))(relax_mod)
        scheduled = dl.ApplyDefaultSchedule(*dlight_rules())(copy_module(unscheduled))
    return scheduled, unscheduled


def copy_module(mod):
    """A structurally separate IRModule (ApplyDefaultSchedule mutates the functions it gets)."""
    import tvm

    return tvm.IRModule({gv: f for gv, f in mod.functions.items()}, attrs=mod.attrs)


def _lowering_pipeline(scheduled_hook):
    """Relax pipeline: our schedule step, then the generic GPU lowering and finalisation."""
    import tvm
    from tvm.relax.backend.gpu_generic import pipeline as gpu_generic

    @tvm.transform.module_pass(opt_level=0, name="blockprune_gpu_pipeline")
    def _pipeline(mod, _ctx):
        target = tvm.target.Target.current()
        mod = scheduled_hook(mod)
        with target:
            return tvm.transform.Sequential(gpu_generic.dataflow_lower_passes(target)
                                            + gpu_generic.finalize_passes(target))(mod)

    return _pipeline


def build_gpu(relax_mod, preset: GPUPreset):
    """Relax module -> (tvm Executable, scheduled module) for ``preset``."""
    import tvm

    target = preset.target()
    holder: dict[str, Any] = {}

    def hook(mod):
        holder["scheduled"], holder["unscheduled"] = schedule_for_gpu(mod, preset)
        return holder["scheduled"]

    with target:
        ex = tvm.compile(relax_mod, target=target, relax_pipeline=_lowering_pipeline(hook), tir_pipeline="default")
    return ex, holder["scheduled"]


def opencl_source(executable) -> str:
    """The generated OpenCL C of an executable (the device module imported by the host one)."""
    sources = []

    def visit(mod):
        for sub in mod.imports:
            if sub.kind == "opencl":
                sources.append(sub.inspect_source("cl"))
            visit(sub)

    visit(executable.mod)
    if not sources:
        raise BlockpruneError("the compiled module has no OpenCL device code",
                              "this is a bug in the GPU build; report it with the model")
    return "\n".join(sources)


def find_aarch64_compiler() -> str:
    """The aarch64 cross linker for the OpenCL module's host code."""
    import shutil

    path = shutil.which(AARCH64_CROSS_CXX)
    if path is None:
        raise BlockpruneError(f"cross compiler {AARCH64_CROSS_CXX} for the aarch64 host of the GPU target is not on PATH",
                              f"install it: apt-get install {AARCH64_CROSS_PACKAGE}")
    return path


@dataclass
class GPUCompileResult:
    directory: Path
    manifest: Manifest
    gpu: GPUImport
    kernel_count: int  # __kernel functions in kernels.cl
    sizes: dict[str, int]  # file -> bytes


def _load(model: "str | os.PathLike | onnx.ModelProto"):
    from blockprune.backends.tvm.pipeline.compile import _load as load

    return load(model)


def compile_gpu_model(model: "str | os.PathLike | onnx.ModelProto", out_dir: str | os.PathLike,
                      target: Any = "mali", batch: int = DEFAULT_BATCH, seq: int = DEFAULT_SEQ,
                      gpu_break_even: float = DEFAULT_GPU_BREAK_EVEN,
                      dense_block: str | None = None) -> GPUCompileResult:
    """Compile ``model`` for a GPU preset into ``out_dir`` (model.so, manifest.json, kernels.cl), atomically."""
    from tvm.support import cc

    preset = resolve_gpu_target(target)
    cxx = find_aarch64_compiler()  # fail before any work
    proto, source = _load(model)
    gpu = import_for_gpu(proto, preset, batch, seq, gpu_break_even, dense_block)
    executable, _ = build_gpu(gpu.imported.mod, preset)
    cl_source = opencl_source(executable)
    reasons = {d.name: d for d in gpu.decisions}
    layers = []
    for layer in gpu.imported.layers:
        d = layer.to_json()
        if layer.name in reasons:
            d["gpu_policy"] = reasons[layer.name].reason
            d["density"] = round(float(reasons[layer.name].density), 6)
        layers.append(d)
    manifest = Manifest(
        target={"name": preset.name, "arch": "aarch64", "config": preset.config, "device": "opencl",
                "gpu": dict(gpu.options)},
        inputs=[i.to_json() for i in gpu.imported.inputs],
        outputs=[o.to_json() for o in gpu.imported.outputs],
        source=source, batch=batch, seq=seq, layers=layers, versions=versions(), library=LIBRARY,
        kernels=gpu.imported.kernels,
    )
    with atomic_dir(out_dir) as tmp:
        executable.export_library(str(tmp / LIBRARY), fcompile=cc.cross_compiler(cxx))
        (tmp / KERNELS_CL).write_text(cl_source)
        manifest.write(tmp)
    out = Path(out_dir)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    return GPUCompileResult(out, manifest, gpu, count_kernels(cl_source), sizes)


def kernel_names(source: str) -> set[str]:
    """Distinct ``__kernel`` functions defined in OpenCL C source.

    TVM writes one section per kernel, each repeating every kernel's declaration, so only
    definitions (a signature followed by a body) are counted.
    """
    import re

    return set(re.findall(r"__kernel\s+void\s+(\w+)\s*\([^)]*\)\s*\{", source))


def count_kernels(source: str) -> int:
    return len(kernel_names(source))


def is_gpu_target(target: Any) -> bool:
    """True for ``mali``/``adreno`` (any case) or an OpenCL target dict/JSON (CLI dispatch)."""
    import json

    if isinstance(target, GPUPreset):
        return True
    if isinstance(target, Mapping):
        return target.get("kind") == "opencl"
    if isinstance(target, str):
        text = target.strip()
        if text.startswith("{"):
            try:
                return json.loads(text).get("kind") == "opencl"
            except (json.JSONDecodeError, AttributeError):
                return False
        from blockprune.backends.tvm.targets.gpu_presets import gpu_preset_names

        return text.lower() in gpu_preset_names()
    return False


def is_gpu_artifact(manifest: Manifest) -> bool:
    return manifest.target.get("device") == "opencl" or manifest.target.get("config", {}).get("kind") == "opencl"


def bench_rpc_gpu(directory: str | os.PathLike, host: str, port: int, number: int = 10,
                  repeat: int = 5) -> list[float]:
    """Seconds per call of ``main`` on the remote board's OpenCL device (``remote.cl(0)``).

    The remote TVM runtime must be built with OpenCL (docs/opencl-rpc.md); inputs are copied to
    the GPU first, so the timing covers the kernels and the VM, not the transfers.
    """
    import tvm
    from tvm import relax

    from blockprune.backends.tvm.runtime.rpc import connect
    from blockprune.backends.tvm.runtime.runner import check_artifact, check_inputs, default_feeds

    manifest = check_artifact(directory)
    if not is_gpu_artifact(manifest):
        raise BlockpruneError(f"{directory} is not a GPU artifact", "use bench_rpc for CPU artifacts")
    arrays = check_inputs(manifest, default_feeds(manifest))
    remote = connect(host, port)
    dev = remote.cl(0)
    if not dev.exist:  # before the upload: an x86 server or a CPU-only runtime fails here, clearly
        raise BlockpruneError(f"the TVM RPC server at {host}:{port} has no OpenCL device",
                              "run a TVM runtime built with USE_OPENCL=ON on the board (docs/opencl-rpc.md)")
    remote_name = f"blockprune_{manifest.target_name}_{os.getpid()}.so"
    remote.upload(str(Path(directory) / manifest.library), target=remote_name)
    rlib = remote.load_module(remote_name)
    vm = relax.VirtualMachine(rlib, [dev, remote.cpu()])
    vm.set_input("main", *[tvm.runtime.tensor(a, dev) for a in arrays])
    timer = vm.time_evaluator("invoke_stateful", dev, number=number, repeat=repeat)
    return list(timer("main").results)
