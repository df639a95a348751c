"""BlockSparseRewrite and its inverse, DensifyBlockSparse.

Rewrite: ``MatMul(x, W)`` (W constant, directly or through Transpose) becomes
``ai.blockprune::BlockSparseMatMul(x, values, indices, indptr)`` with the BSR arrays as
initializers named ``<weight>.bsr_values|bsr_indices|bsr_indptr`` and attributes ``blocksize``,
``dense_shape`` (PyTorch ``[out, in]``), ``weight_name`` and ``weight_layout`` (how the dense
weight was stored, so the inverse restores it exactly). On disk a layer then costs
``density * dense bytes + index bytes``.

Which layers: those the Policy pass marked ``bsr`` (metadata ``blockprune.layers[*].form``), or,
without a policy, every pruned MatMul weight whose block divides its shape. A Gemm (the heads of
some exports) stays dense. The block comes from the layer's recorded block shape (or ``block``).
"""

from __future__ import annotations

import numpy as np
import onnx

from blockprune.blocks import BlockShape
from blockprune.bsr import bsr_to_dense, dense_to_bsr, BSRMatrix
from blockprune.errors import BlockpruneError
from blockprune.passes.base import Pass, PassContext, PassReport
from blockprune.passes.bsr_function import (DOMAIN, OP, VERSION, block_sparse_matmul_function,
                                             drop_block_sparse_function)
from blockprune.passes.find_weights import find_weights_in_graph, require_weights
from blockprune.passes.layers_meta import record_layers


def uses_block_sparse(model_or_graph) -> bool:
    if isinstance(model_or_graph, onnx.ModelProto):
        return any(o.domain == DOMAIN for o in model_or_graph.opset_import) or \
            any(n.domain == DOMAIN for n in model_or_graph.graph.node)
    return any(n.domain == DOMAIN for n in model_or_graph.nodes)


class BlockSparseRewrite(Pass):
    name = "block-sparse"

    def __init__(self, block: str | BlockShape | None = None, only_policy: bool = True) -> None:
        self.block = BlockShape.parse(block) if block else None
        self.only_policy = only_policy

    def validate(self, ctx: PassContext) -> None:
        if any(o.domain == DOMAIN for o in ctx.source.opset_import) or uses_block_sparse(ctx.graph):
            raise BlockpruneError(
                f"the model already uses the custom op domain {DOMAIN!r} (it was rewritten before)",
                "run compress on the model before its block-sparse rewrite, or densify it first "
                "(blockprune.passes.block_sparse.DensifyBlockSparse)",
            )

    def transform(self, ctx: PassContext) -> PassReport:
        import onnx_graphsurgeon as gs

        weights = require_weights(find_weights_in_graph(ctx.graph, {
            "param_map": ctx.meta("param_map", {}), "architecture": ctx.meta("architecture")}))
        layers = ctx.meta("layers", {}) or {}
        nodes = {n.name: n for n in ctx.graph.nodes}
        consts = ctx.constants()
        report = PassReport(self.name)
        notes, updates = [], {}
        for w in weights:
            info = layers.get(w.initializer, {})
            if self.only_policy and info.get("form") is not None and "bsr" not in info["form"]:
                continue
            const = consts[w.initializer]
            values = np.asarray(const.values)
            if w.op_type != "MatMul":
                notes.append(f"{w.display_name}: {w.op_type} stays dense")
                continue
            if values.dtype != np.float32:
                raise BlockpruneError(
                    f"weight {w.display_name!r} is {values.dtype.name}; block-sparse rewriting supports float32",
                    "export or convert the model in float32, then quantise after compression",
                )
            oi = w.to_out_in(values)
            if np.count_nonzero(oi) == oi.size and info.get("form") is None:
                continue  # dense layer, nothing to gain
            block = BlockShape.parse(info["block"]) if info.get("block") else self.block
            if block is None:
                notes.append(f"{w.display_name}: no block shape recorded; pass one")
                continue
            if oi.shape[0] % block.rows or oi.shape[1] % block.cols:
                notes.append(f"{w.display_name}: block {block} does not divide {oi.shape[0]}x{oi.shape[1]}; stays dense")
                continue
            report.matched += 1
            bsr = dense_to_bsr(oi, block)
            node = nodes[w.node]
            base = w.initializer
            ins = [node.inputs[0],
                   gs.Constant(f"{base}.bsr_values", bsr.data),
                   gs.Constant(f"{base}.bsr_indices", bsr.indices),
                   gs.Constant(f"{base}.bsr_indptr", bsr.indptr)]
            new = gs.Node(OP, name=f"{node.name}/bsr", domain=DOMAIN, inputs=ins, outputs=list(node.outputs),
                          attrs={"blocksize": [block.rows, block.cols], "dense_shape": list(oi.shape),
                                 "weight_name": base, "weight_layout": w.layout})
            ctx.remove_node(node)
            ctx.add_node(new)
            updates[base] = {"stored": "bsr", "bsr_bytes": bsr.nbytes, "nnz_blocks": bsr.nnzb,
                             "block": str(block)}
            report.changed += 1
        if report.changed:
            ctx.add_function(block_sparse_matmul_function(_default_opset(ctx)), DOMAIN, VERSION)
            record_layers(ctx, updates)
        report.notes = notes
        return report


def _default_opset(ctx: PassContext) -> int:
    for o in ctx.source.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 18


class DensifyBlockSparse(Pass):
    """Turn every BlockSparseMatMul back into the exact dense MatMul it came from."""

    name = "densify"

    def transform(self, ctx: PassContext) -> PassReport:
        import onnx_graphsurgeon as gs

        report = PassReport(self.name)
        for node in list(ctx.graph.nodes):
            if node.domain != DOMAIN or node.op != OP:
                continue
            report.matched += 1
            v, ix, ip = (np.asarray(t.values) for t in node.inputs[1:4])
            bsr = BSRMatrix(v, ix, ip, tuple(int(x) for x in node.attrs["dense_shape"]),
                            BlockShape(*[int(x) for x in node.attrs["blocksize"]]))
            oi = bsr_to_dense(bsr)
            name = node.attrs.get("weight_name", node.name + ".weight")
            name = name.decode() if isinstance(name, bytes) else name
            layout = node.attrs.get("weight_layout", "in_out")
            layout = layout.decode() if isinstance(layout, bytes) else layout
            if layout == "in_out":
                w = gs.Constant(name, np.ascontiguousarray(oi.T))
                new = [gs.Node("MatMul", name=node.name.removesuffix("/bsr"), inputs=[node.inputs[0], w],
                               outputs=list(node.outputs))]
            else:
                w = gs.Constant(name, np.ascontiguousarray(oi))
                wt = gs.Variable(name + "_transposed", dtype=np.float32)
                new = [gs.Node("Transpose", inputs=[w], outputs=[wt], attrs={"perm": [1, 0]}),
                       gs.Node("MatMul", name=node.name.removesuffix("/bsr"), inputs=[node.inputs[0], wt],
                               outputs=list(node.outputs))]
            ctx.remove_node(node)
            for n in new:
                ctx.add_node(n)
            report.changed += 1
        return report

    def run(self, model: onnx.ModelProto):
        out, report = super().run(model)
        drop_block_sparse_function(out)  # no node uses it any more
        return out, report
