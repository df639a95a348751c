"""Normalise an ONNX graph before TVM's importer sees it: static shapes, shapes folded, no contrib ops.

Why: users bring plain ``torch.onnx.export`` graphs (legacy or dynamo), not only ours. Those
compute every shape at run time (``Shape -> Gather -> ConstantOfShape -> Expand`` chains, the
transformers mask built from ``Range``/``GatherND`` on dynamic sizes), and TVM's ONNX frontend
fails deep inside Relax on them (``broadcast_to expects ...``). Artifacts have static
``batch x seq`` anyway, so we fix the input dims, replace every ``Shape`` whose input shape is
then known by a constant, and let onnx-graphsurgeon fold whatever became constant (it evaluates
the sub-graphs in onnxruntime, so folding cannot change the meaning). Repeated until nothing
changes. ``Shape`` is folded here, not by graphsurgeon's ``fold_shapes``, because that ignores
``Shape``'s ``start``/``end`` attributes (opset 15+) and would fold ``[1, 16]`` where ``[16]``
is meant.

onnxruntime's contrib ops (``com.microsoft``: the fusions of its transformer optimizer) do not
exist in TVM. The elementwise ones are lowered to standard ops here (``FastGelu``, ``BiasGelu``,
``Gelu``, ``SkipLayerNormalization``, ``LayerNormalization``), and so are the fused BERT
``EmbedLayerNormalization`` and ``Attention`` in the forms the optimizer emits
(``contrib_fused``); any other contrib op, or an unsupported variant, is refused with one error
naming the node and the fix. Any other failure of the importer becomes a ``BlockpruneError``
naming the node and op type (``importer_errors``). LayerNorms that an exporter spelled out in
elementary ops are given back to TVM as one node (:mod:`.layernorm_fusion`).
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from blockprune.errors import BlockpruneError

MS_DOMAIN = "com.microsoft"
MAX_ROUNDS = 6


@dataclass
class NormalizeReport:
    """What normalisation did (for tests and the compile summary)."""

    shapes_folded: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    contrib_lowered: int = 0
    layernorms_fused: int = 0


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def refuse_unsupported_contrib(model: onnx.ModelProto) -> None:
    """One error for the first onnxruntime contrib op left after lowering, naming node and fix."""
    for node in model.graph.node:
        if node.domain == MS_DOMAIN:
            raise BlockpruneError(
                f"operator {MS_DOMAIN}::{node.op_type} (node {node.name or '<unnamed>'!r}) is an onnxruntime "
                "contrib op (transformer-optimizer fusion) that blockprune cannot lower for TVM in this form",
                "compile the model from before onnxruntime.transformers.optimizer (the plain export it was "
                "optimised from; pruning and compress work on either), or run the optimised model in onnxruntime",
            )


def _const_node(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}__const",
                            value=numpy_helper.from_array(np.asarray(value)))


def _lower_contrib(model: onnx.ModelProto, seq: int, fused: bool = False) -> int:
    """Replace com.microsoft ops by standard-op equivalents (in place); returns the count.

    ``fused=False``: the elementwise ones and EmbedLayerNormalization; ``fused=True``: Attention
    (its mask's rank is read from shape inference, which needs the embedding lowered first).
    Unsupported variants are left in place and refused afterwards by name.
    """
    from blockprune.backends.tvm.onnx_import.contrib_fused import lower_attention, lower_embed_layernorm

    shapes = _known_shapes(model) if fused else {}
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    count = 0
    used = {o for n in model.graph.node for o in n.output} | {t.name for t in model.graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)

    def fresh(base: str) -> str:
        i, name = 0, base
        while name in used:
            i += 1
            name = f"{base}_{i}"
        used.add(name)
        return name

    def gelu(x: str, out: str, tag: str, fast: bool) -> list[onnx.NodeProto]:
        if fast:  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            c = [fresh(f"{tag}/c{i}") for i in range(4)]
            t = [fresh(f"{tag}/t{i}") for i in range(8)]
            return [_const_node(c[0], np.float32(0.044715)), _const_node(c[1], np.float32(math.sqrt(2 / math.pi))),
                    _const_node(c[2], np.float32(1.0)), _const_node(c[3], np.float32(0.5)),
                    helper.make_node("Mul", [x, x], [t[0]]), helper.make_node("Mul", [t[0], x], [t[1]]),
                    helper.make_node("Mul", [t[1], c[0]], [t[2]]), helper.make_node("Add", [x, t[2]], [t[3]]),
                    helper.make_node("Mul", [t[3], c[1]], [t[4]]), helper.make_node("Tanh", [t[4]], [t[5]]),
                    helper.make_node("Add", [t[5], c[2]], [t[6]]),
                    helper.make_node("Mul", [x, t[6]], [t[7]]),
                    helper.make_node("Mul", [t[7], c[3]], [out])]
        c = [fresh(f"{tag}/c{i}") for i in range(3)]
        t = [fresh(f"{tag}/t{i}") for i in range(4)]
        return [_const_node(c[0], np.float32(math.sqrt(2.0))), _const_node(c[1], np.float32(1.0)),
                _const_node(c[2], np.float32(0.5)),
                helper.make_node("Div", [x, c[0]], [t[0]]), helper.make_node("Erf", [t[0]], [t[1]]),
                helper.make_node("Add", [t[1], c[1]], [t[2]]), helper.make_node("Mul", [x, t[2]], [t[3]]),
                helper.make_node("Mul", [t[3], c[2]], [out])]

    for node in model.graph.node:
        if node.domain != MS_DOMAIN:
            new_nodes.append(node)
            continue
        tag, a = node.name or node.output[0], _attrs(node)
        if fused:
            lowered = None
            if node.op_type == "Attention" and len(inits.get(node.input[1], [])) == 2:
                lowered = lower_attention(node, seq, inits[node.input[1]][1], fresh, shapes.get)
            if lowered is None:
                new_nodes.append(node)
                continue
            new_nodes.extend(lowered)
        elif node.op_type == "EmbedLayerNormalization":
            lowered = lower_embed_layernorm(node, seq, fresh)
            if lowered is None:
                new_nodes.append(node)
                continue
            new_nodes.extend(lowered)
        elif node.op_type in ("FastGelu", "BiasGelu", "Gelu"):
            x = node.input[0]
            if len(node.input) > 1 and node.input[1]:
                x = fresh(f"{tag}/biased")
                new_nodes.append(helper.make_node("Add", [node.input[0], node.input[1]], [x]))
            new_nodes.extend(gelu(x, node.output[0], tag, fast=node.op_type == "FastGelu"))
        elif node.op_type in ("SkipLayerNormalization", "LayerNormalization"):
            eps = float(a.get("epsilon", 1e-12))
            if node.op_type == "SkipLayerNormalization":
                if any(node.output[1:3]):  # mean / inv-std outputs: not lowered, refused by name below
                    new_nodes.append(node)
                    continue
                s = fresh(f"{tag}/sum")
                new_nodes.append(helper.make_node("Add", [node.input[0], node.input[1]], [s]))
                if len(node.input) > 4 and node.input[4]:
                    s2 = fresh(f"{tag}/sum_bias")
                    new_nodes.append(helper.make_node("Add", [s, node.input[4]], [s2]))
                    s = s2
                ins = [s, node.input[2]] + ([node.input[3]] if len(node.input) > 3 and node.input[3] else [])
                if len(node.output) > 3 and node.output[3]:  # the residual sum, reused by the next layer
                    new_nodes.append(helper.make_node("Identity", [s], [node.output[3]]))
            else:
                ins = list(node.input)
            new_nodes.append(helper.make_node("LayerNormalization", ins, [node.output[0]], name=tag,
                                              axis=int(a.get("axis", -1)), epsilon=eps))
        else:
            new_nodes.append(node)
            continue
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        if opset < 13:
            raise BlockpruneError(f"the model imports opset {opset}; lowering its onnxruntime contrib ops needs "
                                  "LayerNormalization (opset 17), too far from it to raise safely",
                                  "re-export the model at opset 14 or newer")
        if opset < 17:  # LayerNormalization is standard from opset 17; 13..16 -> 17 changes no encoder op
            for o in model.opset_import:
                if o.domain in ("", "ai.onnx"):
                    o.version = 17
    return count


def fix_input_shapes(model: onnx.ModelProto, batch: int, seq: int) -> None:
    """Symbolic input dims -> ``batch`` (first) / ``seq`` (later), in place; stale shapes dropped."""
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if not (d.HasField("dim_value") and d.dim_value > 0):
                d.Clear()
                d.dim_value = batch if i == 0 else seq
    del model.graph.value_info[:]
    for o in model.graph.output:
        for d in o.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()


def _known_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - an un-inferable graph just folds less; the importer reports
        return {}
    out: dict[str, list[int]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            out[vi.name] = [int(d.dim_value) for d in tt.shape.dim]
    for t in model.graph.initializer:
        out[t.name] = [int(d) for d in t.dims]
    return out


def fold_shape_nodes(model: onnx.ModelProto) -> int:
    """Replace ``Shape`` nodes whose input shape is static by a Constant (honouring start/end)."""
    shapes = _known_shapes(model)
    n = 0
    for node in model.graph.node:
        if node.op_type != "Shape" or node.domain not in ("", "ai.onnx") or node.input[0] not in shapes:
            continue
        dims = shapes[node.input[0]]
        a = _attrs(node)
        value = np.array(dims[slice(int(a.get("start", 0)), a.get("end"))], dtype=np.int64)
        node.op_type = "Constant"
        del node.input[:]
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value)))
        n += 1
    return n


def _fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    graph = gs.import_onnx(model)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        graph.fold_constants(fold_shapes=False, error_ok=True).cleanup().toposort()
        out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    present = {(f.domain, f.name) for f in out.functions}
    out.functions.extend(f for f in model.functions if (f.domain, f.name) not in present)
    domains = {o.domain for o in out.opset_import}
    out.opset_import.extend(o for o in model.opset_import if o.domain not in domains)
    return out


def normalize_for_tvm(model: onnx.ModelProto, batch: int, seq: int,
                      report: NormalizeReport | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with static ``batch x seq`` inputs, onnxruntime contrib ops lowered to
    standard ops (or refused by name), shapes and constants folded, spelled-out LayerNorms fused."""
    from blockprune.backends.tvm.onnx_import.layernorm_fusion import fuse_layer_norms
    from blockprune.passes.dtype_check import require_float32_weights

    require_float32_weights(model, "the TVM CPU backend (float32 kernels, verified at 1e-4)")
    report = report if report is not None else NormalizeReport()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    report.nodes_before = len(m.graph.node)
    fix_input_shapes(m, batch, seq)
    report.contrib_lowered = _lower_contrib(m, seq)
    report.contrib_lowered += _lower_contrib(m, seq, fused=True)
    refuse_unsupported_contrib(m)
    for _ in range(MAX_ROUNDS):
        folded = fold_shape_nodes(m)
        before = len(m.graph.node)
        m = _fold_constants(m)
        del m.graph.value_info[:]
        report.shapes_folded += folded
        if folded == 0 and len(m.graph.node) == before:
            break
    report.layernorms_fused = fuse_layer_norms(m, _known_shapes(m))
    report.nodes_after = len(m.graph.node)
    return m


@contextlib.contextmanager
def importer_errors() -> Iterator[None]:
    """Turn any failure inside TVM's ONNX frontend into one BlockpruneError naming the node.

    The frontend converts node by node through ``ONNXGraphImporter._convert_operator``; we record the
    op type and node name of the call in flight (and silence the frontend's own print).
    """
    from tvm.relax.frontend.onnx import onnx_frontend as fe

    current: dict[str, str] = {}
    importer_cls = getattr(fe, "ONNXGraphImporter", None)  # private TVM API: without it, no node name
    original = getattr(importer_cls, "_convert_operator", None)

    def tracking(self, op_name, inputs, attrs, opset):
        current["op"] = op_name
        current["node"] = str((attrs.get("tvm_custom") or {}).get("name", "?"))
        return original(self, op_name, inputs, attrs, opset)

    if original is not None:
        importer_cls._convert_operator = tracking
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    except BlockpruneError:
        raise
    except Exception as err:  # noqa: BLE001 - converted into the user-facing error
        text = str(err).strip().splitlines()
        detail = next((ln.strip() for ln in reversed(text) if ln.strip() and not ln.startswith(" ")), repr(err))
        where = f"node {current.get('node')!r} (op {current.get('op')})" if current else "the model"
        raise BlockpruneError(
            f"TVM's ONNX importer failed at {where}: {detail[:300]}",
            "re-export the model (blockprune export, or torch.onnx.export with a static opset >= 14), or run it "
            "in onnxruntime; report the node if the model runs there",
        ) from err
    finally:
        if original is not None:
            importer_cls._convert_operator = original
