"""QuantizeInt8: int8 weights and dynamic uint8 activations for every selected Linear.

Runs last in ``compress --quantize int8`` (after the block-sparse rewrite), so it sees the final
form of each layer and keeps it:

* a dense (or compacted) ``MatMul`` / plain ``Gemm`` with a constant weight becomes the standard
  pattern onnxruntime's ``quantize_dynamic(per_channel=True)`` emits
  (``bsr_int8_function.int8_matmul_pattern``: DynamicQuantizeLinear -> MatMulInteger -> Cast ->
  Mul by ``xs * w_scale``); the bias Add that followed stays where it was;
* an ``ai.blockprune::BlockSparseMatMul`` becomes ``BlockSparseMatMulInt8`` with the same BSR
  structure, int8 values and the per-output-channel scales (its definition ships in the model).

The arithmetic (scales, rounding) is :mod:`blockprune.quant`. Which layers: the same head rule
as pruning (``prune_config.selects_role``): encoder Linears always, pooler/classifier only with
``include_heads``, since a head's few outputs are where quantization error shows first. Layer
roles are read on the densified graph, so block-sparse layers and the heads of plain exports
are recognised exactly as pruning recognised them. Every decision goes into the layer metadata
(``quant``, ``quant_op`` or ``quant_reason``) and a summary into ``blockprune.quantization``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from blockprune.blocks import BlockShape
from blockprune.bsr import BSRMatrix
from blockprune.errors import BlockpruneError
from blockprune.passes.base import Pass, PassContext, PassReport
from blockprune.passes.block_sparse import DensifyBlockSparse, _default_opset, uses_block_sparse
from blockprune.passes.bsr_function import DOMAIN, OP, VERSION, drop_block_sparse_function
from blockprune.passes.bsr_int8_function import (OP_INT8, PATTERN_DTYPES, NodeSpec,
                                                  block_sparse_matmul_int8_function, int8_matmul_pattern)
from blockprune.passes.find_weights import LinearWeight, find_weights, find_weights_in_graph
from blockprune.passes.layers_meta import record_layers
from blockprune.passes.prune_config import selects_role
from blockprune.quant import quantize_bsr_values, quantize_weight

SCHEME = {
    "scheme": "int8",
    "weights": "int8, symmetric per output channel: w_scale[o] = max|W[o,:]|/127 (1.0 for a zero row), "
               "Wq = clip(round(W / w_scale), -127, 127)",
    "activations": "uint8, dynamic per tensor (ONNX DynamicQuantizeLinear)",
    "dense_op": "DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(xs * w_scale)",
    "block_sparse_op": f"{DOMAIN}::{OP_INT8}",
}
_QUANTIZED_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul",
                  "MatMulIntegerToFloat", "QuantizeLinear", OP_INT8}


class QuantizeInt8(Pass):
    name = "quantize-int8"

    def __init__(self, include_heads: bool = False) -> None:
        self.include_heads = include_heads

    def validate(self, ctx: PassContext) -> None:
        refuse_quantized(ctx.source)

    def transform(self, ctx: PassContext) -> PassReport:
        roles = _roles(ctx.source)
        report = PassReport(self.name)
        updates: dict[str, dict[str, Any]] = {}
        made: dict[str, tuple[Any, Any]] = {}  # weight initializer -> (Wq [in, out], w_scale) constants
        tensors: dict[str, Any] = {}  # the int8 patterns' tensors by name (shared quantized activations)
        nodes = {n.name: n for n in ctx.graph.nodes}
        weights = find_weights_in_graph(ctx.graph, {"param_map": ctx.meta("param_map", {}),
                                                    "architecture": ctx.meta("architecture")})
        for w in weights:
            report.matched += 1
            why = self._skip_reason(roles.get(w.initializer, w.role), nodes[w.node])
            if why is None:
                _quantize_dense(ctx, nodes[w.node], w, made, tensors)
                updates[w.initializer] = {"quant": "int8", "quant_op": "MatMulInteger"}
                report.changed += 1
            else:
                updates[w.initializer] = {"quant": "float32", "quant_reason": why}
        bsr_changed = 0
        for node in [n for n in ctx.graph.nodes if n.domain == DOMAIN and n.op == OP]:
            report.matched += 1
            name = _attr_str(node, "weight_name", node.name)
            why = self._skip_reason(roles.get(name), None)
            if why is None:
                _quantize_block_sparse(ctx, node, name)
                updates[name] = {"quant": "int8", "quant_op": OP_INT8}
                report.changed += 1
                bsr_changed += 1
            else:
                updates[name] = {"quant": "float32", "quant_reason": why}
        if bsr_changed:
            ctx.add_function(block_sparse_matmul_int8_function(_default_opset(ctx)), DOMAIN, VERSION)
        record_layers(ctx, updates)
        kept = {k: v["quant_reason"] for k, v in updates.items() if v["quant"] != "int8"}
        ctx.set_meta("quantization", {**SCHEME, "layers_int8": report.changed, "layers_float32": len(kept),
                                      "include_heads": self.include_heads})
        report.details["layers"] = {k: v.get("quant_op", "float32") for k, v in updates.items()}
        report.notes = [f"{k}: stays float32 ({v})" for k, v in kept.items()]
        return report

    def run(self, model: onnx.ModelProto):
        out, report = super().run(model)
        drop_block_sparse_function(out)  # the float32 BSR definition, once every BSR layer is int8
        return out, report

    def _skip_reason(self, role: str | None, node: Any) -> str | None:
        """Why a layer stays float32, or None to quantize it."""
        if not selects_role(role, self.include_heads):
            return f"{role} head; pass include_heads (--include-heads) to quantize it"
        if node is not None and node.op == "Gemm" and not _plain_gemm(node):
            return "Gemm with alpha/beta/transA: no int8 form"
        return None


def refuse_quantized(model: onnx.ModelProto) -> None:
    """One clear error for a model that holds quantized ops already (ours or onnxruntime's):
    pruning, compression and quantization all start from the float32 model."""
    done = next((n for n in model.graph.node if n.op_type in _QUANTIZED_OPS), None)
    if done is not None:
        raise BlockpruneError(
            f"the model is already quantized (node {done.name or done.output[0]!r} is {done.op_type})",
            "start from the float32 model: compress it with --quantize int8 instead of quantizing first",
        )


def _roles(model: onnx.ModelProto) -> dict[str, str | None]:
    """Role of every Linear by weight initializer, block-sparse layers included (read densified)."""
    if uses_block_sparse(model):
        model, _ = DensifyBlockSparse().run(model)
    return {w.initializer: w.role for w in find_weights(model)}


def _plain_gemm(node: Any) -> bool:
    a = node.attrs
    return float(a.get("alpha", 1.0)) == 1.0 and not a.get("transA", 0) and \
        (len(node.inputs) < 3 or float(a.get("beta", 1.0)) == 1.0)


def _attr_str(node: Any, key: str, default: str) -> str:
    v = node.attrs.get(key, default)
    return v.decode() if isinstance(v, bytes) else str(v)


def _emit(ctx: PassContext, specs: list[NodeSpec], known: dict[str, Any], created: dict[str, Any]) -> None:
    """Add the pattern's nodes as graphsurgeon nodes: ``known`` tensors by name (graph tensors,
    constants), new ones typed and collected in ``created`` across calls; a node whose outputs
    were all created before (the DynamicQuantizeLinear of an activation already quantized for
    another Linear) is not added twice."""
    import onnx_graphsurgeon as gs

    for spec in specs:
        if all(o in created for o in spec.outputs):
            continue
        for name in spec.outputs:
            if name not in known and name not in created:
                created[name] = gs.Variable(name, dtype=PATTERN_DTYPES[name.rsplit("/", 1)[-1]])
        pick = lambda n: known[n] if n in known else created[n]  # noqa: E731
        ctx.add_node(gs.Node(spec.op, name=spec.outputs[0], attrs=dict(spec.attrs),
                             inputs=[pick(i) for i in spec.inputs], outputs=[pick(o) for o in spec.outputs]))


def _quantize_dense(ctx: PassContext, node: Any, w: LinearWeight, made: dict[str, tuple[Any, Any]],
                    tensors: dict[str, Any]) -> None:
    """Replace one MatMul/Gemm by the int8 pattern (a Gemm's bias C is added after it)."""
    import onnx_graphsurgeon as gs

    if w.initializer not in made:
        values = np.asarray(ctx.constants()[w.initializer].values)
        if values.dtype != np.float32:
            raise BlockpruneError(f"weight {w.display_name!r} is {values.dtype.name}; int8 quantization "
                                  "starts from float32 weights", "export or convert the model in float32")
        q = quantize_weight(w.to_out_in(values))
        made[w.initializer] = (gs.Constant(f"{w.initializer}.int8", np.ascontiguousarray(q.wq.T)),
                               gs.Constant(f"{w.initializer}.w_scale", q.w_scale))
    wq, ws = made[w.initializer]
    x, y = node.inputs[0], node.outputs[0]
    prefix = f"{node.name or w.initializer}/int8/"
    bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 else None
    product = y if bias is None else gs.Variable(prefix + "y", dtype=np.float32)
    known = {x.name: x, product.name: product, wq.name: wq, ws.name: ws}
    _emit(ctx, int8_matmul_pattern(x.name, wq.name, ws.name, product.name, prefix, f"{x.name}/int8/"), known,
          tensors)
    if bias is not None:
        ctx.add_node(gs.Node("Add", name=prefix + "bias", inputs=[product, bias], outputs=[y]))
    ctx.remove_node(node)


def _quantize_block_sparse(ctx: PassContext, node: Any, name: str) -> None:
    """Replace one BlockSparseMatMul by BlockSparseMatMulInt8 with the same structure."""
    import onnx_graphsurgeon as gs

    values, indices, indptr = (np.asarray(t.values) for t in node.inputs[1:4])
    bsr = BSRMatrix(values, indices, indptr, tuple(int(v) for v in node.attrs["dense_shape"]),
                    BlockShape(*[int(v) for v in node.attrs["blocksize"]]))
    vq, scale = quantize_bsr_values(bsr)
    ins = [node.inputs[0], gs.Constant(f"{name}.bsr_values_int8", vq), node.inputs[2], node.inputs[3],
           gs.Constant(f"{name}.w_scale", scale)]
    ctx.add_node(gs.Node(OP_INT8, name=f"{node.name}/int8", domain=DOMAIN, inputs=ins,
                         outputs=list(node.outputs), attrs=dict(node.attrs)))
    ctx.remove_node(node)
