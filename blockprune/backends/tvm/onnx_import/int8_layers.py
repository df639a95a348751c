"""Find the int8 Linears of a ``compress --quantize int8`` model, for our int8 TVM kernels.

Two forms reach the importer (:mod:`blockprune.passes.quantize`):

* block-sparse: ``ai.blockprune::BlockSparseMatMulInt8(X, values int8, indices, indptr, w_scale)``;
* dense: onnxruntime's dynamic pattern ``(xq, xs, xz) = DynamicQuantizeLinear(X)``,
  ``MatMulInteger(xq, Wq[in, out] int8, xz) -> Cast(float) -> Mul(., Mul(xs, w_scale))``.

Both compute ``Y[m, o] = xs * w_scale[o] * sum_k (xq[m, k] - xz) * Wq[o, k]`` exactly (the
contract of :mod:`blockprune.quant`), which is what :mod:`..kernels.int8_api` implements, with the
quantizer inside. TVM's own lowering of ``MatMulInteger`` is a generic integer loop nest; ours
uses ``vpmaddwd``/``smlal``/``sdot``. The ``DynamicQuantizeLinear`` left without consumers is
removed by the importer's dead-node sweep.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from blockprune.blocks import BlockShape
from blockprune.errors import BlockpruneError

from blockprune.backends.tvm.onnx_import.epilogue import GraphIndex
from blockprune.backends.tvm.kernels.int8_api import Int8BSR

_STD = ("", "ai.onnx")


@dataclass
class Int8Weight:
    """An int8 Linear's weight (``[out, in]`` dense, or BSR) and per-output-channel scales."""

    weight: "np.ndarray | Int8BSR"
    w_scale: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def block(self) -> BlockShape | None:
        return self.weight.block if isinstance(self.weight, Int8BSR) else None


def bsr_int8_weight(node: onnx.NodeProto, index: GraphIndex, shape: tuple[int, int], block: BlockShape) -> Int8Weight:
    """The constant operands of a ``BlockSparseMatMulInt8`` node."""
    arrays = [index.constant(i) for i in node.input[1:5]]
    if any(a is None for a in arrays):
        raise BlockpruneError(f"node {node.name!r}: int8 BSR arrays and scales are not initializers",
                              "the TVM backend needs constant weights (as written by compress --quantize int8)")
    values, indices, indptr, w_scale = arrays
    if values.dtype != np.int8:
        raise BlockpruneError(f"node {node.name!r}: int8 BSR values are {values.dtype}, not int8",
                              "re-run compress --quantize int8 on the float32 model")
    bsr = Int8BSR(np.ascontiguousarray(values), indices.astype(np.int32), indptr.astype(np.int32), shape, block)
    return Int8Weight(bsr, w_scale.astype(np.float32).reshape(shape[0]))


@dataclass
class DenseInt8Match:
    """One dense int8 pattern: what the kernel node reads and replaces."""

    x: str  # the float activation (DynamicQuantizeLinear's input)
    out: str  # the dequantized output (the final Mul's output)
    weight: Int8Weight
    removed: list[onnx.NodeProto]  # MatMulInteger's followers: Cast, Mul(acc, scale), Mul(xs, w_scale)


def match_dense_int8(index: GraphIndex, producers: dict[str, onnx.NodeProto], node: onnx.NodeProto) -> DenseInt8Match | None:
    """``MatMulInteger`` at the head of the dense int8 pattern, or None when it is another form."""
    if node.op_type != "MatMulInteger" or node.domain not in _STD or len(node.input) < 2:
        return None
    wq = index.constant(node.input[1])
    if wq is None or wq.dtype != np.int8 or wq.ndim != 2:
        return None
    if len(node.input) > 3 and node.input[3]:
        bz = index.constant(node.input[3])
        if bz is None or np.any(bz != 0):
            return None  # asymmetric weights are not our contract
    dql = producers.get(node.input[0])
    if dql is None or dql.op_type != "DynamicQuantizeLinear" or node.input[0] != dql.output[0]:
        return None
    if len(node.input) < 3 or node.input[2] != dql.output[2]:
        return None
    cast = index.only_consumer(node.output[0])
    if cast is None or cast.op_type != "Cast" or \
            next((a.i for a in cast.attribute if a.name == "to"), None) != TensorProto.FLOAT:
        return None
    mul = index.only_consumer(cast.output[0])
    if mul is None or mul.op_type != "Mul":
        return None
    scale_name = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
    scale = producers.get(scale_name)
    if scale is None or scale.op_type != "Mul" or dql.output[1] not in scale.input:
        return None
    ws_name = scale.input[1] if scale.input[0] == dql.output[1] else scale.input[0]
    w_scale = index.constant(ws_name)
    n = wq.shape[1]
    if w_scale is None or w_scale.size != n:
        return None
    removed = [cast, mul]
    if len(index.consumers.get(scale_name, [])) == 1 and scale_name not in index.outputs:
        removed.append(scale)
    weight = Int8Weight(np.ascontiguousarray(wq.T), w_scale.astype(np.float32).reshape(n))
    return DenseInt8Match(dql.input[0], mul.output[0], weight, removed)


def drop_dead_nodes(graph: onnx.GraphProto) -> int:
    """Remove nodes none of whose outputs is used (repeatedly); returns how many went."""
    removed = 0
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            return removed
        ids = {id(n) for n in dead}
        keep = [n for n in graph.node if id(n) not in ids]
        del graph.node[:]
        graph.node.extend(keep)
        removed += len(dead)

