"""The int8 model with its integer products computed exactly: a reference for int8 kernels.

Why: onnxruntime's x86 ``MatMulInteger`` for uint8 x int8 on AVX2 machines without VNNI (this
project's Zen 3 included) multiplies with ``vpmaddubsw``, which adds the products of each pair of
neighbouring ``k`` into a *saturating int16*: ``xq[2j] * Wq[o, 2j] + xq[2j+1] * Wq[o, 2j+1]`` is
clipped to [-32768, 32767] before the int32 sum (up to 2 * 255 * 127 = 64770 is possible). So a
few outputs of a few layers differ from the contract (``blockprune.quant``) by up to thousands of
accumulator units. The same holds for files from onnxruntime's own ``quantize_dynamic``; with VNNI
or on ARM onnxruntime is exact. The contract is the exact sum: kernels (TVM) must compute that,
and be checked against it, not against a saturating runtime.

:func:`exact_int8_model` rewrites every ``MatMulInteger`` (in the graph and in model-local
functions such as ``BlockSparseMatMulInt8``) into ``Cast(int32, MatMul(float(xq) - float(xz),
float(Wq)))``: every product is an exact float32 integer and every partial sum below 2**24 is too,
so onnxruntime then computes the contract (MiniLM's largest ``|acc|`` stays far below that).
The model keeps its inputs, outputs and every other node; it is for checking, not shipping.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto
from onnx import helper as h


def _exact_nodes(node: onnx.NodeProto, index: int) -> list[onnx.NodeProto]:
    a, b, *zps = list(node.input)
    p = f"{node.name or node.output[0]}/exact{index}/"
    out = [h.make_node("Cast", [a], [p + "a"], to=TensorProto.FLOAT)]
    lhs = p + "a"
    if zps and zps[0]:
        out += [h.make_node("Cast", [zps[0]], [p + "az"], to=TensorProto.FLOAT),
                h.make_node("Sub", [p + "a", p + "az"], [p + "ac"])]
        lhs = p + "ac"
    out.append(h.make_node("Cast", [b], [p + "b"], to=TensorProto.FLOAT))
    rhs = p + "b"
    if len(zps) > 1 and zps[1]:
        out += [h.make_node("Cast", [zps[1]], [p + "bz"], to=TensorProto.FLOAT),
                h.make_node("Sub", [p + "b", p + "bz"], [p + "bc"])]
        rhs = p + "bc"
    out += [h.make_node("MatMul", [lhs, rhs], [p + "acc"]),
            h.make_node("Cast", [p + "acc"], [node.output[0]], to=TensorProto.INT32)]
    return out


def _rewrite(nodes) -> int:
    """Replace MatMulInteger nodes in a repeated node field, in place; how many."""
    new, count = [], 0
    for n in nodes:
        if n.op_type == "MatMulInteger" and n.domain in ("", "ai.onnx"):
            new += _exact_nodes(n, count)
            count += 1
        else:
            new.append(n)
    del nodes[:]
    nodes.extend(new)
    return count


def exact_int8_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose integer matmuls are exact (see the module doc)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _rewrite(out.graph.node)
    for f in out.functions:
        _rewrite(f.node)
    return out
