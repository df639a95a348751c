"""``ai.blockprune::BlockSparseMatMul``: its definition, shipped inside each rewritten model.

    Y[..., out] = X[..., in] @ W^T,  W[out, in] stored as BSR (see ``blockprune.bsr``):
    inputs  X, values [nnzb, r, c] float32, indices [nnzb] int32, indptr [out/r + 1] int32
    attrs   blocksize [r, c], dense_shape [out, in], weight_name, weight_layout

Why a model-local ONNX function: onnxruntime (and any ONNX runtime) then runs the rewritten model
with no custom-op library: it inlines the body, which rebuilds W from the BSR arrays with
standard ops (Range/ScatterND/Transpose/Reshape, constant-folded at session start) and multiplies
densely. The TVM backend matches the node itself and lowers it to real block-sparse kernels.
The body takes every size from its inputs' shapes, so one definition serves all layers.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper

DOMAIN = "ai.blockprune"
OP = "BlockSparseMatMul"
VERSION = 1


def _const(name: str, value) -> onnx.NodeProto:
    arr = np.asarray(value, dtype=np.int64)
    return h.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name + "_v"))


def dense_weight_nodes(values: str = "values", out: str = "WT") -> list[onnx.NodeProto]:
    """Nodes that rebuild ``W^T [in, out]`` (float32) from BSR arrays named ``values`` (float32
    ``[nnzb, r, c]``), ``indices``, ``indptr`` and the activation ``X`` (for the input extent).

    Shared by every BSR function body (fp32 here, int8 in ``bsr_int8_function``): one scatter,
    constant-folded by onnxruntime at session start since its inputs are initializers.
    """
    return [
        _const("i0", [0]), _const("i1", [1]), _const("i2", [2]), _const("i3", [3]), _const("im1", [-1]),
        _const("end", [np.iinfo(np.int64).max]), _const("s0", 0), _const("s1", 1),
        h.make_node("Shape", [values], ["vshape"]),
        h.make_node("Slice", ["vshape", "i0", "i1"], ["nnzb1"]),
        h.make_node("Slice", ["vshape", "i1", "i2"], ["r1"]),
        h.make_node("Slice", ["vshape", "i2", "i3"], ["c1"]),
        h.make_node("Squeeze", ["nnzb1"], ["nnzb"]),
        # block k lies in row-block (number of row pointers after the first that are <= k)
        h.make_node("Range", ["s0", "nnzb", "s1"], ["k"]),
        h.make_node("Cast", ["indptr"], ["indptr64"], to=TensorProto.INT64),
        h.make_node("Slice", ["indptr64", "i1", "end"], ["starts"]),
        h.make_node("Unsqueeze", ["k", "i1"], ["k2"]),
        h.make_node("Unsqueeze", ["starts", "i0"], ["starts2"]),
        h.make_node("GreaterOrEqual", ["k2", "starts2"], ["ge"]),
        h.make_node("Cast", ["ge"], ["ge64"], to=TensorProto.INT64),
        h.make_node("ReduceSum", ["ge64", "i1"], ["rows"], keepdims=0),
        h.make_node("Cast", ["indices"], ["cols"], to=TensorProto.INT64),
        h.make_node("Unsqueeze", ["rows", "i1"], ["rows2"]),
        h.make_node("Unsqueeze", ["cols", "i1"], ["cols2"]),
        h.make_node("Concat", ["rows2", "cols2"], ["coords"], axis=1),
        h.make_node("Shape", ["indptr"], ["ipshape"]),
        h.make_node("Sub", ["ipshape", "i1"], ["nrows1"]),
        h.make_node("Shape", ["X"], ["xshape"]),
        h.make_node("Slice", ["xshape", "im1", "end"], ["in1"]),
        h.make_node("Div", ["in1", "c1"], ["ncols1"]),
        h.make_node("Concat", ["nrows1", "ncols1", "r1", "c1"], ["grid"], axis=0),
        h.make_node("ConstantOfShape", ["grid"], ["zeros"],
                    value=numpy_helper.from_array(np.zeros(1, dtype=np.float32), "zero")),
        h.make_node("ScatterND", ["zeros", "coords", values], ["dense4"]),
        h.make_node("Transpose", ["dense4"], ["dense4t"], perm=[0, 2, 1, 3]),
        h.make_node("Mul", ["nrows1", "r1"], ["out1"]),
        h.make_node("Concat", ["out1", "in1"], ["wshape"], axis=0),
        h.make_node("Reshape", ["dense4t", "wshape"], ["W"]),
        h.make_node("Transpose", ["W"], [out], perm=[1, 0]),
    ]


ATTRIBUTES = ["blocksize", "dense_shape", "weight_name", "weight_layout"]


def block_sparse_matmul_function(opset: int = 18) -> onnx.FunctionProto:
    nodes = dense_weight_nodes("values", "WT") + [h.make_node("MatMul", ["X", "WT"], ["Y"])]
    return h.make_function(DOMAIN, OP, ["X", "values", "indices", "indptr"], ["Y"], nodes,
                           [h.make_opsetid("", opset)], attributes=ATTRIBUTES)


def drop_block_sparse_function(model: onnx.ModelProto) -> None:
    """Remove the domain's function definitions no node uses any more, and the domain import once
    no node uses the domain (in place): densifying an int8 model keeps ``BlockSparseMatMulInt8``."""
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    keep = [f for f in model.functions if f.domain != DOMAIN or f.name in used]
    del model.functions[:]
    model.functions.extend(keep)
    if not used:
        ops = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(ops)
