"""ONNX (dense, compacted or block-sparse) -> Relax, with BSR layers lowered to our TensorIR kernel.

How: each ``ai.blockprune::BlockSparseMatMul`` (and, on request, each dense MatMul whose weight
is mostly zero blocks) becomes, before import, one node of our kernel op (``KERNEL_OP``) that
also absorbs the bias add, GELU and residual add after it (:mod:`.epilogue`). A converter for that
op is registered with TVM's ONNX importer for the duration of the import
(:func:`registered_converters`); it emits ``call_tir`` to the kernel chosen for the layer, with
the BSR arrays as constants. The frontend does all the shape/broadcast work around it.

Shapes are static (``batch x seq``): the kernels are compiled per static M.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from blockprune.blocks import BlockShape
from blockprune.bsr import BSRMatrix, dense_to_bsr
from blockprune.errors import BlockpruneError
from blockprune.passes.bsr_function import DOMAIN, OP, drop_block_sparse_function
from blockprune.passes.bsr_int8_function import OP_INT8

from blockprune.backends.tvm.kernels import bsr_kernel as bk
from blockprune.backends.tvm.onnx_import.epilogue import Epilogue, GraphIndex, absorb_epilogue
from blockprune.backends.tvm.onnx_import.int8_layers import (Int8Weight, bsr_int8_weight, drop_dead_nodes,
                                                             match_dense_int8)
from blockprune.backends.tvm.onnx_import.layernorm_fusion import LAYERNORM_SUFFIX
from blockprune.backends.tvm.onnx_import.normalize import normalize_for_tvm
from blockprune.backends.tvm.targets.presets import TargetPreset, resolve_target

KERNEL_OP = "BlockSparseKernel"  # node op (in DOMAIN) that the registered converter lowers
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
        if self.form != "dense":  # bsr, bsr-int8, dense-int8: our kernels
            if self.block is not None:
                d.update(block=self.block, density=round(float(self.density), 6))
            d.update(kernel=self.kernel, schedule=self.schedule, epilogue=self.epilogue or "none")
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
    """A layer turned into a ``KERNEL_OP`` node, waiting for the converter to emit its call_tir."""

    index: int
    layer: LayerForm
    bsr: BSRMatrix | None  # float32 block-sparse weight (None for an int8 layer)
    epilogue: Epilogue = field(default_factory=Epilogue)
    int8: Int8Weight | None = None  # int8 weight and scales (dense or BSR)

    @property
    def n(self) -> int:
        return (self.int8 or self.bsr).shape[0]


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


def _block_density(w_oi: np.ndarray, block: BlockShape) -> float:
    n, k = w_oi.shape
    g = w_oi.reshape(n // block.rows, block.rows, k // block.cols, block.cols)
    return float((g != 0).any(axis=(1, 3)).mean())


def check_supported(model: onnx.ModelProto) -> None:
    """Every node must be importable: name the first op (and node) the frontend lacks."""
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    known = set(fe._get_convert_map()) | {"Constant", "If"}
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type == KERNEL_OP:
            continue
        if node.domain not in ("", "ai.onnx") or node.op_type not in known:
            op = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            raise BlockpruneError(
                f"operator {op} (node {node.name or '<unnamed>'!r}) is not supported by TVM's ONNX importer",
                "re-export the model without it (e.g. another opset or exporter), or run it in onnxruntime",
            )


def _topological(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after its producers (stable; in place).

    Why: a kernel node that absorbed a residual add takes the skip tensor as an input, and an
    exporter may have computed that tensor after the matmul.
    """
    produced_by = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    nodes = list(graph.node)
    state = [0] * len(nodes)  # 0 new, 1 on the stack, 2 placed
    order: list[onnx.NodeProto] = []
    for root in range(len(nodes)):
        stack = [(root, iter(nodes[root].input))] if state[root] == 0 else []
        if stack:
            state[root] = 1
        while stack:
            i, inputs = stack[-1]
            dep = next((produced_by[t] for t in inputs if produced_by.get(t, i) != i), None)
            if dep is not None:
                if state[dep] == 0:
                    state[dep] = 1
                    stack.append((dep, iter(nodes[dep].input)))
                continue
            stack.pop()
            state[i] = 2
            order.append(nodes[i])
    del graph.node[:]
    graph.node.extend(order)


def _kernel_node(node: onnx.NodeProto, x: str, index: int) -> None:
    """Turn ``node`` (in place) into the kernel op for layer ``index``, reading ``x``."""
    node.ClearField("attribute")
    del node.input[:]
    node.input.append(x)
    node.op_type, node.domain = KERNEL_OP, DOMAIN
    node.attribute.append(onnx.helper.make_attribute("layer", index))


def prepare_onnx(model: onnx.ModelProto, lower_dense_below: float | None = None,
                 dense_block: str | BlockShape | None = None,
                 fuse_epilogues: bool = False) -> tuple[onnx.ModelProto, list[_Pending], list[LayerForm]]:
    """Turn BSR nodes (and sparse-enough dense MatMuls) into ``KERNEL_OP`` nodes, one per layer.

    With ``fuse_epilogues``, the bias add, GELU and residual add after each of them are removed
    from the graph and done by its kernel (:mod:`.epilogue`); the residual tensor becomes the
    node's second input. Returns the rewritten copy, the layers awaiting a kernel, and the layers
    staying dense.
    """
    model = copy.deepcopy(model)
    g = model.graph
    graph_index = GraphIndex(g)
    index = graph_index if fuse_epilogues else None
    producers = {o: n for n in g.node for o in n.output}
    absorbed: set[int] = set()
    inits = {t.name: t for t in g.initializer}
    pending: list[_Pending] = []
    dense: list[LayerForm] = []
    block = BlockShape.parse(dense_block) if dense_block else None

    def add_kernel(node: onnx.NodeProto, layer: LayerForm, bsr: BSRMatrix | None,
                   int8: Int8Weight | None = None, x: str | None = None) -> None:
        item = _Pending(len(pending), layer, bsr, int8=int8)
        pending.append(item)
        _kernel_node(node, x or node.input[0], item.index)
        if index is None:
            return
        item.epilogue, removed = absorb_epilogue(index, node, item.n)
        absorbed.update(id(n) for n in removed)
        if item.epilogue.residual is not None:
            node.input.append(item.epilogue.residual)
        layer.epilogue = item.epilogue.describe()

    for node in list(g.node):
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
            add_kernel(node, LayerForm(wname, node.name, "bsr", shape, str(blk), bsr.block_density), bsr)
        elif node.domain == DOMAIN and node.op_type == OP_INT8:
            shape = tuple(int(x) for x in _attr(node, "dense_shape"))
            blk = BlockShape(*[int(x) for x in _attr(node, "blocksize")])
            w8 = bsr_int8_weight(node, graph_index, shape, blk)
            wname = _attr(node, "weight_name", node.name)
            density = w8.weight.nnzb / max(1, (shape[0] // blk.rows) * (shape[1] // blk.cols))
            add_kernel(node, LayerForm(wname, node.name, "bsr-int8", shape, str(blk), density), None, w8)
        elif (match := match_dense_int8(graph_index, producers, node)) is not None:
            absorbed.update(id(n) for n in match.removed)
            node.output[0] = match.out
            add_kernel(node, LayerForm(node.input[1], node.name, "dense-int8", match.weight.shape), None,
                       match.weight, x=match.x)
        elif node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            if w.ndim != 2 or w.dtype != np.float32:
                continue
            w_oi = w.T
            if lower_dense_below is not None and block is not None and \
                    w_oi.shape[0] % block.rows == 0 and w_oi.shape[1] % block.cols == 0:
                density = _block_density(w_oi, block)
                if density <= lower_dense_below:
                    bsr = dense_to_bsr(np.ascontiguousarray(w_oi), block)
                    add_kernel(node, LayerForm(node.input[1], node.name, "bsr", w_oi.shape, str(block), density), bsr)
                    continue
            dense.append(LayerForm(node.input[1], node.name, "dense", tuple(w_oi.shape)))
    if absorbed:
        kept = [n for n in g.node if id(n) not in absorbed]
        del g.node[:]
        g.node.extend(kept)
        _topological(g)
    if any(p.int8 is not None for p in pending):
        drop_dead_nodes(g)  # the DynamicQuantizeLinear nodes whose consumers became kernels
    drop_block_sparse_function(model)  # the function body is no longer referenced
    if pending and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
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

    Why a hook: the CPU and the GPU kernels share the kernel converter but not the kernel,
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
             "row_chunk": sch.row_chunk, "k_chunk": sch.k_chunk, "x_pad": sch.x_pad, "isa": sch.isa})

    return choose


def _static_shape(expr) -> tuple[int, ...] | None:
    """The static shape of a Relax tensor expression, None if unknown or symbolic."""
    import tvm

    shape = getattr(getattr(expr, "ty", None), "shape", None)
    values = getattr(shape, "values", None)
    if values is None or any(not isinstance(d, tvm.tirx.IntImm) for d in values):
        return None
    return tuple(int(d) for d in values)


@contextmanager
def registered_converters(converters: dict[str, Any]):
    """Make TVM's ONNX importer convert extra op types while the block runs.

    Why a scoped patch: the frontend has no public registry for custom ops; it reads its op
    table from ``_get_convert_map()`` on every use, so extending that function's result for the
    duration of one import registers our converters without touching any other import.
    """
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    original = fe._get_convert_map

    def extended():
        table = original()
        table.update(converters)
        return table

    fe._get_convert_map = extended
    try:
        yield
    finally:
        fe._get_convert_map = original


class _KernelEmitter:
    """Emits one layer's ``call_tir`` for the importer; kernels with equal plan keys are shared.

    A failure to choose or build a kernel becomes one ``BlockpruneError`` naming the layer.
    """

    def __init__(self, pending: list[_Pending], choose: BSRKernelChooser, preset: TargetPreset | None) -> None:
        self.by_id = {p.index: p for p in pending}
        self.choose = choose
        self.preset = preset  # None: a GPU chooser (no int8 kernels there)
        self.quantized: list[tuple[tuple[Any, Any], list]] = []  # (x, quantize spec) -> (xp, xs, xz)
        self.kernels: dict[Any, tuple[Any, str]] = {}
        self.done: set[int] = set()

    def converter(self):
        from tvm.relax.frontend.onnx import onnx_frontend as fe

        emit = self.emit

        class BlockSparseKernel(fe.OnnxOpConverter):
            """``ai.blockprune::BlockSparseKernel(x[, residual])`` -> call_tir to the layer's kernel."""

            @classmethod
            def _impl_v1(cls, bb, inputs, attr, params):  # noqa: ARG003 - the frontend's signature
                return emit(bb, inputs, int(attr["layer"]))

        return BlockSparseKernel

    def emit(self, bb, inputs, layer: int):
        from tvm import relax

        item = self.by_id.get(layer)
        if item is None:
            raise BlockpruneError(f"kernel node for unknown layer {layer}", "this is a bug in the TVM importer")
        x = inputs[0]
        x_shape = _static_shape(x)
        if x_shape is None or str(x.ty.dtype) != "float32":
            raise BlockpruneError(
                f"layer {item.layer.name}: its input has no static float32 shape ({x.ty})",
                "compile with static shapes (--batch/--seq) from a float32 model",
            )
        n = item.n
        ep = item.epilogue
        residual = inputs[1] if len(inputs) > 1 else None
        y_shape = x_shape[:-1] + (n,)
        fuse_residual = residual is not None and _static_shape(residual) == y_shape and \
            str(residual.ty.dtype) == "float32"
        if item.int8 is not None:
            y = self._emit_int8(bb, item, x, x_shape, residual if fuse_residual else None)
        else:
            y = self._emit_bsr(bb, item, x, x_shape, residual if fuse_residual else None)
        item.layer.epilogue = ep.describe(residual=fuse_residual)
        self.done.add(layer)
        if residual is not None and not fuse_residual:  # a broadcasting skip: add it separately
            y = relax.op.add(bb.emit(y), residual)
        return y

    def _kernel(self, bb, key, build, prefix: str):
        """The GlobalVar of the kernel for ``key`` (built and added on first use)."""
        if key not in self.kernels:
            name = f"{prefix}{len(self.kernels)}"
            func = build(name).with_attr("tirx.is_scheduled", True)
            self.kernels[key] = (bb.add_func(func, name), name)
        return self.kernels[key]

    def _emit_int8(self, bb, item: _Pending, x, x_shape, residual):
        """The quantizer (shared by the layers that read the same ``x``) and the int8 matmul."""
        from tvm import relax

        from blockprune.backends.tvm.kernels.int8_api import int8_layer

        if self.preset is None:
            raise BlockpruneError(f"layer {item.layer.name} is int8: the GPU backends have no int8 kernels",
                                  "compile the float32 model (compress without --quantize) for GPU targets")
        ep = item.epilogue
        weight, note = item.int8.weight, None
        block = item.int8.block
        if block is not None and block.cols % 4:  # the int8 dot products take 4 inputs at a time
            weight = weight.to_dense()
            note = f"block {block} has no int8 BSR kernel (input extent not a multiple of 4): int8 dense"
            item.layer.form = "dense-int8"
        try:
            lay = int8_layer(weight, item.int8.w_scale, x_shape, bias=ep.bias, gelu=ep.gelu,
                             residual=residual is not None, target=self.preset)
        except BlockpruneError:
            raise
        except Exception as err:  # noqa: BLE001 - one user-facing error naming the layer
            raise BlockpruneError(f"building the int8 kernel of layer {item.layer.name} failed: {err!r}",
                                  "compile the float32 model meanwhile (compress without --quantize)") from err
        gq, _ = self._kernel(bb, ("q", lay.quantize_spec), lambda name: lay.quantize_func.with_attr("global_symbol", name),
                             "int8_quantize")
        gm, name = self._kernel(bb, ("mm", lay.spec, lay.schedule),
                                lambda name: lay.matmul_func.with_attr("global_symbol", name), "int8_matmul")
        q = next((v for key, v in self.quantized if key[0].same_as(x) and key[1] == lay.quantize_spec), None)
        if q is None:
            call = relax.call_tir(gq, relax.Tuple([x]),
                                  out_ty=[relax.TensorType(sh, dt) for sh, dt in lay.quantize_outputs])
            tup = bb.emit(call)
            q = [bb.emit(relax.TupleGetItem(tup, i)) for i in range(3)]
            self.quantized.append(((x, lay.quantize_spec), q))
        item.layer.kernel = name
        item.layer.schedule = {"isa": lay.schedule.isa, "m_vecs": lay.schedule.m_vecs,
                               "r_pass": lay.schedule.r_pass, "row_chunk": lay.schedule.row_chunk}
        if note:
            item.layer.schedule["note"] = note
        args = [*q, *[relax.const(c) for c in lay.constants]] + ([residual] if residual is not None else [])
        return relax.call_tir(gm, relax.Tuple(args), out_ty=relax.TensorType(lay.spec.y_shape, "float32"))

    def _emit_bsr(self, bb, item: _Pending, x, x_shape, residual):
        from tvm import relax

        ep = item.epilogue
        fuse_residual = residual is not None
        spec = bk.BSRKernelSpec(x_shape, item.n, item.bsr.block, ep.bias is not None, ep.gelu, fuse_residual)
        try:
            plan = self.choose(spec, item.bsr)
            gv, name = self._kernel(bb, plan.key, plan.build, plan.prefix)
        except BlockpruneError:
            raise
        except Exception as err:  # noqa: BLE001 - one user-facing error naming the layer
            raise BlockpruneError(f"lowering layer {item.layer.name} to a TVM kernel failed: {err!r}",
                                  "compile the densified model meanwhile (blockprune compress --form dense) and "
                                  "report the error") from err
        item.layer.kernel = name
        item.layer.schedule = plan.schedule
        args = [x, *[relax.const(a) for a in plan.arrays]]
        if ep.bias is not None:
            args.append(relax.const(ep.bias))
        if fuse_residual:
            args.append(residual)
        return relax.call_tir(gv, relax.Tuple(args), out_ty=relax.TensorType(spec.y_shape, "float32"))


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
    emitter = _KernelEmitter(pending, bsr_kernel or cpu_kernel_chooser(preset), preset)
    try:
        with registered_converters({KERNEL_OP: emitter.converter()}), warnings.catch_warnings():
            # the frontend runs onnx's checker and warns about LayerNormalization nodes that
            # normalisation fused into a graph whose opset predates it; TVM converts them anyway
            warnings.filterwarnings("ignore", message=f"(?s).*{LAYERNORM_SUFFIX}")
            mod = from_onnx(prepared, shape_dict={i.name: list(i.shape) for i in inputs},
                            dtype_dict={i.name: i.dtype for i in inputs}, keep_params_in_input=False)
    except tvm.error.OpNotImplemented as err:  # pragma: no cover - check_supported comes first
        raise BlockpruneError(f"TVM's ONNX importer refused the model: {err}",
                              "re-export the model without the operator") from None
    missing = sorted(set(emitter.by_id) - emitter.done)
    if missing:
        names = ", ".join(emitter.by_id[i].layer.name for i in missing)
        raise BlockpruneError(f"block-sparse layers {names} were not converted by the importer",
                              "this is a bug in the TVM importer; compile the densified model meanwhile")
    nkernels = len(emitter.kernels)
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
