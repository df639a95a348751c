"""``ai.blockprune::BlockSparseMatMulInt8``: the int8 block-sparse op, shipped inside the model.

    (xq, xs, xz) = DynamicQuantizeLinear(X)                         uint8, per tensor
    Y[..., o]    = xs * w_scale[o] * sum_k (int(xq[..., k]) - int(xz)) * Wq[o, k]
    inputs  X float32, values int8 [nnzb, r, c], indices int32 [nnzb], indptr int32 [out/r + 1],
            w_scale float32 [out]
    attrs   blocksize [r, c], dense_shape [out, in], weight_name, weight_layout (as the fp32 op)

``Wq`` is the BSR weight of ``blockprune.bsr`` with int8 values: symmetric per output channel,
``w_scale[o] = max_k |W[o, k]| / 127`` (1.0 for an all-zero row), ``Wq = clip(round(W / w_scale),
-127, 127)``. The scales are those of the *dense* row, so a block-sparse int8 layer computes
exactly what the dense int8 layer of the same pruned weight computes.

Why a model-local function again (see ``bsr_function``): onnxruntime runs the file with no
custom-op library. The body rebuilds the dense weight with the fp32 op's scatter (in float:
the int8 values are small integers, so the round trip through float and the final Cast to int8
are exact), then uses the standard integer ops onnxruntime's own dynamic quantizer emits
(DynamicQuantizeLinear, MatMulInteger, Cast, Mul). The TVM backend matches the node itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h

from blockprune.passes.bsr_function import ATTRIBUTES, DOMAIN, dense_weight_nodes

OP_INT8 = "BlockSparseMatMulInt8"
INPUTS = ["X", "values", "indices", "indptr", "w_scale"]


@dataclass(frozen=True)
class NodeSpec:
    """One node of the int8 pattern, independent of how it is built (onnx.helper or graphsurgeon)."""

    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict = field(default_factory=dict)


# dtype of every intermediate tensor of the pattern, by its name without prefix (after the last "/")
PATTERN_DTYPES = {"xq": np.uint8, "xs": np.float32, "xz": np.uint8, "acc": np.int32, "accf": np.float32,
                  "scale": np.float32}


def int8_matmul_pattern(x: str, wq: str, w_scale: str, y: str, prefix: str = "",
                        x_prefix: str | None = None) -> list[NodeSpec]:
    """``Y = Cast(MatMulInteger(xq, Wq, xz)) * (xs * w_scale)``, ``(xq, xs, xz) = DynamicQuantizeLinear(X)``.

    The one place the int8 dense pattern is spelled out (the one onnxruntime's
    ``quantize_dynamic(per_channel=True)`` emits): the quantize pass puts it in the graph for
    dense layers, the function body below ends with it. ``wq`` is ``[in, out]`` int8,
    ``w_scale`` ``[out]`` float32; ``prefix`` keeps the intermediate names unique in a graph,
    ``x_prefix`` (default ``prefix``) those of the quantized activation, so that Linears reading
    the same ``X`` (q, k, v) can share one DynamicQuantizeLinear as onnxruntime's quantizer does.
    """
    p, px = prefix, prefix if x_prefix is None else x_prefix
    return [
        NodeSpec("DynamicQuantizeLinear", (x,), (px + "xq", px + "xs", px + "xz")),
        NodeSpec("MatMulInteger", (px + "xq", wq, px + "xz"), (p + "acc",)),
        NodeSpec("Cast", (p + "acc",), (p + "accf",), {"to": TensorProto.FLOAT}),
        NodeSpec("Mul", (px + "xs", w_scale), (p + "scale",)),
        NodeSpec("Mul", (p + "accf", p + "scale"), (y,)),
    ]


def block_sparse_matmul_int8_function(opset: int = 18) -> onnx.FunctionProto:
    """The op's definition: rebuild ``Wq^T`` exactly, then the dense int8 pattern."""
    nodes = [h.make_node("Cast", ["values"], ["values_f"], to=TensorProto.FLOAT)]
    nodes += dense_weight_nodes("values_f", "WTf")
    nodes += [h.make_node("Cast", ["WTf"], ["WTq"], to=TensorProto.INT8)]
    nodes += [h.make_node(n.op, list(n.inputs), list(n.outputs), **n.attrs)
              for n in int8_matmul_pattern("X", "WTq", "w_scale", "Y")]
    return h.make_function(DOMAIN, OP_INT8, INPUTS, ["Y"], nodes, [h.make_opsetid("", opset)],
                           attributes=ATTRIBUTES)
