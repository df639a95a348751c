"""ONNX (dense, compacted or block-sparse) -> Relax, with BSR layers lowered to our TensorIR kernel.

Why a placeholder round trip: TVM's ONNX frontend has no hook for custom ops, so each
``ai.blockprune::BlockSparseMatMul`` (and, on request, each dense MatMul whose weight is mostly
zero blocks) is replaced *before* import by ``MatMul(X, P)`` with ``P`` a dense ``[in, out]``
placeholder initializer carrying a marker (``P[0, 0] = MAGIC``, ``P[0, 1] = layer id``). After
import, a Relax mutator finds ``matmul(x, Constant)`` whose constant carries a marker and emits
``call_tir`` to the BSR kernel with the BSR arrays as constants. The frontend then does all the
shape/broadcast work for us, and the placeholder never reaches the compiled library.

Shapes are static (``batch x seq``): the kernels are compiled per static M.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from blockprune.blocks import BlockShape
from blockprune.bsr import BSRMatrix, dense_to_bsr
from blockprune.errors import BlockpruneError
from blockprune.passes.bsr_function import DOMAIN, OP, drop_block_sparse_function

from blockprune.backends.tvm.kernels import bsr_kernel as bk
from blockprune.backends.tvm.onnx_import.epilogue import Epilogue, GraphIndex, absorb_epilogue
from blockprune.backends.tvm.onnx_import.normalize import normalize_for_tvm
from blockprune.backends.tvm.targets.presets import TargetPreset, resolve_target

MAGIC = 1234567.0  # exactly representable in float32; a real weight never starts with it
DEFAULT_BATCH, DEFAULT_SEQ = 1, 128

_ONNX_TO_NP = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64",
               onnx.TensorProto.INT32: "int32", onnx.TensorProto.BOOL: "bool",
               onnx.TensorProto.FLOAT16: "float16"}


@dataclass
class LayerForm:
    """How one weight layer is computed in the compiled model (goes into the manifest)."""

    name: str  # weight / initializer name
    node: str  # ONNX node name
    form: str  # "bsr" or "dense"
    shape: tuple[int, int]  # [out, in]
    block: str | None = None
    density: float | None = None  # fraction of blocks kept (bsr)
    kernel: str | None = None  # PrimFunc name (bsr)
    schedule: dict[str, Any] | None = None
    epilogue: str | None = None  # what the kernel fuses after the product (bsr), e.g. "bias+gelu"

    def to_json(self) -> dict[str, Any]:
        d = {"name": self.name, "node": self.node, "form": self.form, "shape": list(self.shape)}
        if self.form == "bsr":
            d.update(block=self.block, density=round(float(self.density), 6), kernel=self.kernel,
                     schedule=self.schedule, epilogue=self.epilogue or "none")
        return d


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class ImportResult:
    """The Relax module plus what the manifest must say about it."""

    mod: Any  # tvm.IRModule
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    layers: list[LayerForm] = field(default_factory=list)
    kernels: int = 0  # unique BSR PrimFuncs


@dataclass
class _Pending:
    """A layer replaced by a placeholder, waiting for its call_tir."""

    index: int
    layer: LayerForm
    bsr: BSRMatrix
    epilogue: Epilogue = field(default_factory=Epilogue)


# ---------------------------------------------------------------------------------------------
# ONNX side
# ---------------------------------------------------------------------------------------------
def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def static_inputs(model: onnx.ModelProto, batch: int, seq: int) -> list[TensorSpec]:
    """Graph inputs with symbolic dims fixed: first dim -> batch, later ones -> seq."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (batch if i == 0 else seq)
                     for i, d in enumerate(tt.shape.dim))
        out.append(TensorSpec(vi.name, dims, _ONNX_TO_NP.get(tt.elem_type, "float32")))
    return out


def _placeholder(name: str, index: int, in_out: tuple[int, int]) -> onnx.TensorProto:
    p = np.zeros(in_out, dtype=np.float32)
    flat = p.reshape(-1)
    flat[0] = MAGIC
    if flat.size > 1:
        flat[1] = float(index)
    return numpy_helper.from_array(p, name)


def _block_density(w_oi: np.ndarray, block: BlockShape) -> float:
    n, k = w_oi.shape
    g = w_oi.reshape(n // block.rows, block.rows, k // block.cols, block.cols)
    return float((g != 0).any(axis=(1, 3)).mean())


def check_supported(model: onnx.ModelProto) -> None:
    """Every node must be importable: name the first op (and node) the frontend lacks."""
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    known = set(fe._get_convert_map()) | {"Constant", "If"}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in known:
            op = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            raise BlockpruneError(
                f"operator {op} (node {node.name or '<unnamed>'!r}) is not supported by TVM's ONNX importer",
                "re-export the model without it (e.g. another opset or exporter), or run it in onnxruntime",
            )


def prepare_onnx(model: onnx.ModelProto, lower_dense_below: float | None = None,
                 dense_block: str | BlockShape | None = None,
                 fuse_epilogues: bool = False) -> tuple[onnx.ModelProto, list[_Pending], list[LayerForm]]:
    """Replace BSR nodes (and sparse-enough dense MatMuls) by marked placeholder MatMuls.

    With ``fuse_epilogues``, the bias add and GELU after each such MatMul are removed from the
    graph and done by its kernel, and a residual add is flagged for the Relax lowering to fold
    (:mod:`.epilogue`). Returns the rewritten copy, the layers awaiting a kernel, and the layers
    staying dense.
    """
    model = copy.deepcopy(model)
    g = model.graph
    index = GraphIndex(g) if fuse_epilogues else None
    absorbed: set[int] = set()

    def take_epilogue(node: onnx.NodeProto, item: _Pending) -> None:
        if index is None:
            return
        item.epilogue, removed = absorb_epilogue(index, node, item.bsr.shape[0])
        absorbed.update(id(n) for n in removed)
        item.layer.epilogue = item.epilogue.describe(residual=False)
    inits = {t.name: t for t in g.initializer}
    used_names = set(inits) | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    pending: list[_Pending] = []
    dense: list[LayerForm] = []
    block = BlockShape.parse(dense_block) if dense_block else None
    new_inits: list[onnx.TensorProto] = []

    def fresh(base: str) -> str:
        name, i = f"{base}__bp_placeholder", 0
        while name in used_names:
            i += 1
            name = f"{base}__bp_placeholder{i}"
        used_names.add(name)
        return name

    for node in g.node:
        if node.domain == DOMAIN and node.op_type == OP:
            arrays = [numpy_helper.to_array(inits[i]) if i in inits else None for i in node.input[1:4]]
            if any(a is None for a in arrays):
                raise BlockpruneError(
                    f"node {node.name!r}: BSR arrays are not initializers",
                    "the TVM backend needs constant block-sparse weights (as written by compress)",
                )
            shape = tuple(int(x) for x in _attr(node, "dense_shape"))
            blk = BlockShape(*[int(x) for x in _attr(node, "blocksize")])
            bsr = BSRMatrix(arrays[0].astype(np.float32), arrays[1].astype(np.int32),
                            arrays[2].astype(np.int32), shape, blk)
            wname = _attr(node, "weight_name", node.name)
            layer = LayerForm(wname, node.name, "bsr", shape, str(blk), bsr.block_density)
            idx = len(pending)
            pname = fresh(wname)
            new_inits.append(_placeholder(pname, idx, (shape[1], shape[0])))
            x = node.input[0]
            node.ClearField("attribute")
            del node.input[:]
            node.input.extend([x, pname])
            node.op_type, node.domain = "MatMul", ""
            pending.append(_Pending(idx, layer, bsr))
            take_epilogue(node, pending[-1])
        elif node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            if w.ndim != 2 or w.dtype != np.float32:
                continue
            w_oi = w.T
            lowered = False
            if lower_dense_below is not None and block is not None and \
                    w_oi.shape[0] % block.rows == 0 and w_oi.shape[1] % block.cols == 0:
                density = _block_density(w_oi, block)
                if density <= lower_dense_below:
                    bsr = dense_to_bsr(np.ascontiguousarray(w_oi), block)
                    idx = len(pending)
                    pname = fresh(node.input[1])
                    new_inits.append(_placeholder(pname, idx, w.shape))
                    pending.append(_Pending(idx, LayerForm(node.input[1], node.name, "bsr", w_oi.shape,
                                                           str(block), density), bsr))
                    node.input[1] = pname
                    lowered = True
                    take_epilogue(node, pending[-1])
            if not lowered:
                dense.append(LayerForm(node.input[1], node.name, "dense", tuple(w_oi.shape)))
    if absorbed:
        kept = [n for n in g.node if id(n) not in absorbed]
        del g.node[:]
        g.node.extend(kept)
    g.initializer.extend(new_inits)
    drop_block_sparse_function(model)  # the custom function and its domain are no longer referenced
    # drop initializers only the replaced nodes used (the BSR arrays, lowered dense weights)
    live = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep_inits = [t for t in g.initializer if t.name in live]
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    return model, pending, dense


# ---------------------------------------------------------------------------------------------
# Relax side
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelPlan:
    """What one BSR layer becomes: a (shared) PrimFunc and the constant arrays passed to it.

    Why a hook: the CPU and the GPU kernels share the placeholder mechanism but not the kernel,
    its schedule or its array layout; a chooser ``(spec, bsr) -> KernelPlan`` picks them per
    target. Layers whose ``key`` is equal share one PrimFunc.
    """

    key: Any  # hashable: equal keys share a PrimFunc
    build: Any  # name -> tvm PrimFunc
    arrays: list  # numpy arrays passed after X
    schedule: dict[str, Any]  # goes into the manifest
    prefix: str = "bsr_matmul"  # PrimFunc name prefix


BSRKernelChooser = Any  # Callable[[bk.BSRKernelSpec, BSRMatrix], KernelPlan]


def cpu_kernel_chooser(preset: TargetPreset):
    """The CPU BSR kernel of :mod:`.bsr_kernel`, scheduled for ``preset``."""

    def choose(spec: bk.BSRKernelSpec, bsr: BSRMatrix) -> KernelPlan:
        sch = bk.choose_schedule(spec.m, spec.n, bsr.block, preset, k=bsr.shape[1])
        return KernelPlan(
            (spec, sch), lambda name: bk.bsr_matmul_primfunc(spec, sch, name), bk.kernel_arrays(bsr, sch),
            {"layout": sch.layout, "lanes": sch.lanes, "tile_rows": sch.tile_rows,
             "row_chunk": sch.row_chunk, "k_chunk": sch.k_chunk, "isa": sch.isa})

    return choose


def _marker(const) -> int | None:
    """Layer id of a placeholder constant, None for a real weight (reads two floats)."""
    value = const.value
    if len(value.shape) != 2 or str(value.dtype) != "float32":
        return None
    flat = value.numpy().reshape(-1)
    if flat[0] != MAGIC:
        return None
    return int(flat[1]) if flat.size > 1 else 0


def _static_shape(expr) -> tuple[int, ...] | None:
    """The static shape of a Relax tensor expression, None if unknown or symbolic."""
    import tvm

    shape = getattr(getattr(expr, "ty", None), "shape", None)
    values = getattr(shape, "values", None)
    if values is None or any(not isinstance(d, tvm.tirx.IntImm) for d in values):
        return None
    return tuple(int(d) for d in values)


def _substitute(mod, pending: list[_Pending], preset: TargetPreset | None,
                bsr_kernel: "BSRKernelChooser | None" = None):
    """Rewrite each marked ``matmul(x, P)`` into ``call_tir(bsr_kernel, x, data, indices, indptr)``."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    choose = bsr_kernel or cpu_kernel_chooser(preset)
    by_id = {p.index: p for p in pending}
    kernels: dict[tuple, Any] = {}
    done: set[int] = set()
    matmul_op = tvm.ir.Op.get("relax.matmul")
    add_op = tvm.ir.Op.get("relax.add")
    candidates: list[tuple] = []  # (lowered call, item, x): kernels whose residual add may follow

    # An exception raised inside a Python visitor crosses TVM's FFI and comes back as a bare
    # RuntimeError with a C++ backtrace; keep the first one here and raise it as itself.
    errors: list[BaseException] = []

    @mutator
    class _BSRLowering(PyExprMutator):
        def visit_call_(self, call):  # noqa: N802 (TVM's visitor naming)
            call = self.visit_expr_post_order(call)
            if errors:
                return call
            try:
                return self._lower(call)
            except Exception as err:  # noqa: BLE001 - re-raised below, outside the FFI
                errors.append(err)
                return call

        def _lower(self, call):
            if call.op.same_as(add_op):
                return self._fold_residual(call)
            if not call.op.same_as(matmul_op):
                return call
            w = call.args[1]
            if not isinstance(w, tvm.ir.expr.Constant):
                return call
            idx = _marker(w)
            if idx is None or idx not in by_id:
                return call
            item = by_id[idx]
            x = call.args[0]
            done.add(idx)
            lowered = self._emit(item, x, None)
            if item.epilogue.residual_add:
                candidates.append((lowered, item, x))
            return lowered

        def _emit(self, item: _Pending, x, residual):
            x_shape = tuple(int(d) for d in x.ty.shape.values)
            n, _ = item.bsr.shape
            ep = item.epilogue
            spec = bk.BSRKernelSpec(x_shape, n, item.bsr.block, ep.bias is not None, ep.gelu, residual is not None)
            plan = choose(spec, item.bsr)
            if plan.key not in kernels:
                name = f"{plan.prefix}{len(kernels)}"
                func = plan.build(name).with_attr("tirx.is_scheduled", True)
                kernels[plan.key] = (self.builder_.add_func(func, name), name)
            gv, name = kernels[plan.key]
            item.layer.kernel = name
            item.layer.schedule = plan.schedule
            args = [x, *[relax.const(a) for a in plan.arrays]]
            if ep.bias is not None:
                args.append(relax.const(ep.bias))
            if residual is not None:
                args.append(residual)
            return relax.call_tir(gv, relax.Tuple(args), out_ty=relax.TensorType(spec.y_shape, "float32"))

        def _fold_residual(self, call):
            """``add(kernel_out, r)`` -> the kernel with ``r`` as its residual input."""
            for mine, other in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
                if not isinstance(mine, relax.Var):
                    continue
                bound = self.lookup_binding(mine)
                match = next((c for c in candidates if bound is not None and bound.same_as(c[0])), None)
                if match is None:
                    continue
                _, item, x = match
                if _static_shape(other) is None or str(other.ty.dtype) != "float32" or \
                        _static_shape(other) != _static_shape(mine):
                    continue
                item.layer.epilogue = item.epilogue.describe()
                return self._emit(item, x, other)
            return call

    lowering = _BSRLowering(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            lowering.builder_.update_func(gv, lowering.visit_expr(func))
    if errors:
        err = errors[0]
        if isinstance(err, BlockpruneError):
            raise err
        raise BlockpruneError(f"lowering the block-sparse layers to TVM kernels failed: {err!r}",
                              "compile the densified model meanwhile (blockprune compress --form dense) and "
                              "report the error") from err
    out = lowering.builder_.get()
    if candidates:  # a kernel call whose residual add took it over is now unused
        out = relax.transform.DeadCodeElimination()(out)
    missing = sorted(set(by_id) - done)
    if missing:
        names = ", ".join(by_id[i].layer.name for i in missing)
        raise BlockpruneError(
            f"block-sparse layers {names} were not found as a matmul after import",
            "this is a bug in the TVM importer; compile the densified model meanwhile",
        )
    return out, len(kernels)


def import_onnx(model: onnx.ModelProto, batch: int = DEFAULT_BATCH, seq: int = DEFAULT_SEQ,
                target: Any = "host", lower_dense_below: float | None = None,
                dense_block: str | BlockShape | None = None,
                bsr_kernel: BSRKernelChooser | None = None) -> ImportResult:
    """ONNX model -> Relax IRModule with static ``batch x seq`` inputs and BSR kernels in place.

    ``lower_dense_below``: dense MatMul weights whose fraction of non-zero ``dense_block`` blocks
    is at most this are lowered to BSR kernels too (pruned but not rewritten models).
    ``bsr_kernel``: a chooser ``(spec, bsr) -> KernelPlan`` replacing the CPU kernel (the GPU
    backend passes its own; ``target`` is then not interpreted here).
    """
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    if batch < 1 or seq < 1:
        raise BlockpruneError(f"batch {batch} and seq {seq} must be positive", "pass e.g. --batch 1 --seq 128")
    if lower_dense_below is not None and dense_block is None:
        raise BlockpruneError("lowering sparse dense weights needs a block shape",
                              "pass dense_block (e.g. --bsr-block 16x1) with the density threshold")
    preset = resolve_target(target) if bsr_kernel is None else None
    model = normalize_for_tvm(model, batch, seq)  # static shapes folded, contrib ops lowered/refused
    # epilogue fusion needs the CPU kernel; the GPU choosers take the bias at most
    prepared, pending, dense = prepare_onnx(model, lower_dense_below, dense_block, fuse_epilogues=bsr_kernel is None)
    check_supported(prepared)
    inputs = static_inputs(prepared, batch, seq)
    try:
        mod = from_onnx(prepared, shape_dict={i.name: list(i.shape) for i in inputs},
                        dtype_dict={i.name: i.dtype for i in inputs}, keep_params_in_input=False)
    except tvm.error.OpNotImplemented as err:  # pragma: no cover - check_supported comes first
        raise BlockpruneError(f"TVM's ONNX importer refused the model: {err}",
                              "re-export the model without the operator") from None
    nkernels = 0
    if pending:
        mod, nkernels = _substitute(mod, pending, preset, bsr_kernel)
    outputs = _outputs(mod, [o.name for o in prepared.graph.output])
    layers = [p.layer for p in pending] + dense
    return ImportResult(mod, inputs, outputs, layers, nkernels)


def _outputs(mod, names: list[str]) -> list[TensorSpec]:
    """Names from the ONNX graph; static shapes and dtypes from ``main``'s result type."""
    import tvm
    from tvm import relax

    sinfo = mod["main"].ret_ty
    infos = list(sinfo.fields) if isinstance(sinfo, relax.TupleType) else [sinfo]
    out = []
    for i, s in enumerate(infos):
        if s.shape is None or any(not isinstance(d, tvm.tirx.IntImm) for d in s.shape.values):
            raise BlockpruneError(f"output {i} has no static shape after import ({s})",
                                  "the model must have static shapes once batch and seq are fixed")
        name = names[i] if i < len(names) else f"output{i}"
        out.append(TensorSpec(name, tuple(int(d) for d in s.shape.values), str(s.dtype)))
    return out
