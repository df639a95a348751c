"""Standard-op equivalents of onnxruntime's fused BERT ops, for static ``batch x seq`` graphs.

Why: a graph from ``onnxruntime.transformers.optimizer`` holds ``com.microsoft::Attention`` and
``EmbedLayerNormalization``, which TVM's importer does not know. Both are compositions of
standard ops; with the shapes fixed at compile time they unfold into MatMul/Split/Reshape/
Transpose/Softmax and Gather/Add/LayerNormalization. Only the variants the optimizer emits for
BERT-style encoders are lowered (no past state, no unidirectional mask, equal q/k/v sizes, mask
as 1-D valid lengths or 2-D 0/1); anything else returns ``None`` and the caller refuses the node
by name. The result is checked end to end: ``compile`` verifies the artifact against
onnxruntime running the original fused graph.

Semantics followed (onnxruntime contrib op docs): Attention's ``mask_index`` of shape ``[B]`` is
the number of valid (left-aligned) tokens per sequence, shape ``[B, S]`` a 0/1 mask; masked
scores get ``mask_filter_value`` (default -10000) added; scale ``1/sqrt(head_size)`` unless
given. EmbedLayerNormalization adds word, position (``position_ids`` or ``0..S-1``) and segment
embeddings, layer-normalises, and returns ``mask_index = sum(mask, axis=1)`` as int32.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Fresh = Callable[[str], str]


def _const(fresh: Fresh, tag: str, value: np.ndarray) -> tuple[str, onnx.NodeProto]:
    name = fresh(tag)
    return name, helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value)))


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def lower_attention(node: onnx.NodeProto, seq: int, hidden: int | None, fresh: Fresh,
                    shape_of: Callable[[str], list[int] | None]) -> list[onnx.NodeProto] | None:
    """``Attention(x, W[H, 3H], b[3H], mask_index?)`` -> standard ops, or None if unsupported."""
    a = _attrs(node)
    ins = list(node.input) + [""] * (6 - len(node.input))
    if a.get("unidirectional", 0) or a.get("qkv_hidden_sizes") or any(ins[4:]) or len(node.output) > 1 \
            or hidden is None or hidden % 3:
        return None
    h = hidden // 3
    n_heads = int(a["num_heads"])
    if h % n_heads:
        return None
    d = h // n_heads
    scale = float(a.get("scale", 0.0) or 1.0 / math.sqrt(d))
    filt = float(a.get("mask_filter_value", -10000.0))
    tag = node.name or node.output[0]
    t = {k: fresh(f"{tag}/{k}") for k in ("mm", "qkv", "q", "k", "v", "q4", "k4", "v4", "qt", "kt", "vt",
                                           "s", "ss", "p", "c", "ct")}
    out: list[onnx.NodeProto] = []
    split, n1 = _const(fresh, f"{tag}/split", np.array([h, h, h], np.int64))
    shape4, n2 = _const(fresh, f"{tag}/shape4", np.array([0, 0, n_heads, d], np.int64))
    shape3, n3 = _const(fresh, f"{tag}/shape3", np.array([0, 0, h], np.int64))
    sc, n4 = _const(fresh, f"{tag}/scale", np.float32(scale))
    out += [n1, n2, n3, n4,
            helper.make_node("MatMul", [ins[0], ins[1]], [t["mm"]]),
            helper.make_node("Add", [t["mm"], ins[2]], [t["qkv"]]),
            helper.make_node("Split", [t["qkv"], split], [t["q"], t["k"], t["v"]], axis=-1)]
    for x in ("q", "k", "v"):
        out.append(helper.make_node("Reshape", [t[x], shape4], [t[x + "4"]]))
    out += [helper.make_node("Transpose", [t["q4"]], [t["qt"]], perm=[0, 2, 1, 3]),
            helper.make_node("Transpose", [t["k4"]], [t["kt"]], perm=[0, 2, 3, 1]),
            helper.make_node("Transpose", [t["v4"]], [t["vt"]], perm=[0, 2, 1, 3]),
            helper.make_node("MatMul", [t["qt"], t["kt"]], [t["s"]]),
            helper.make_node("Mul", [t["s"], sc], [t["ss"]])]
    scores = t["ss"]
    if ins[3]:
        dims = shape_of(ins[3])
        if dims is None or len(dims) not in (1, 2):
            return None
        keep = fresh(f"{tag}/keep")
        if len(dims) == 1:  # valid lengths: key j is kept when j < mask_index[b]
            ar, n5 = _const(fresh, f"{tag}/arange", np.arange(seq, dtype=np.int32).reshape(1, seq))
            ax, n6 = _const(fresh, f"{tag}/axes1", np.array([1], np.int64))
            lens = fresh(f"{tag}/lens")
            out += [n5, n6, helper.make_node("Unsqueeze", [ins[3], ax], [lens]),
                    helper.make_node("Less", [ar, lens], [fresh(f"{tag}/lt")])]
            out.append(helper.make_node("Cast", [out[-1].output[0]], [keep], to=TensorProto.FLOAT))
        else:
            out.append(helper.make_node("Cast", [ins[3]], [keep], to=TensorProto.FLOAT))
        one, n7 = _const(fresh, f"{tag}/one", np.float32(1.0))
        fv, n8 = _const(fresh, f"{tag}/filter", np.float32(filt))
        ax12, n9 = _const(fresh, f"{tag}/axes12", np.array([1, 2], np.int64))
        inv, add, add4, masked = (fresh(f"{tag}/{k}") for k in ("inv", "add", "add4", "masked"))
        out += [n7, n8, n9, helper.make_node("Sub", [one, keep], [inv]),
                helper.make_node("Mul", [inv, fv], [add]),
                helper.make_node("Unsqueeze", [add, ax12], [add4]),
                helper.make_node("Add", [scores, add4], [masked])]
        scores = masked
    out += [helper.make_node("Softmax", [scores], [t["p"]], axis=-1),
            helper.make_node("MatMul", [t["p"], t["vt"]], [t["c"]]),
            helper.make_node("Transpose", [t["c"]], [t["ct"]], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [t["ct"], shape3], [node.output[0]], name=tag)]
    return out


def lower_embed_layernorm(node: onnx.NodeProto, seq: int, fresh: Fresh) -> list[onnx.NodeProto] | None:
    """``EmbedLayerNormalization`` -> Gather/Add/LayerNormalization (+ ReduceSum for mask_index)."""
    a = _attrs(node)
    ins = list(node.input) + [""] * (9 - len(node.input))
    ids, seg_ids, word, pos, seg, gamma, beta, mask, pos_ids = ins[:9]
    if len(node.output) > 2 and node.output[2]:
        return None  # the embedding-sum output is not lowered
    tag = node.name or node.output[0]
    out: list[onnx.NodeProto] = []
    w, p, total = fresh(f"{tag}/word"), fresh(f"{tag}/pos"), fresh(f"{tag}/sum")
    out.append(helper.make_node("Gather", [word, ids], [w], axis=0))
    if not pos_ids:
        pos_ids, n = _const(fresh, f"{tag}/positions", np.arange(seq, dtype=np.int64).reshape(1, seq))
        out.append(n)
    out += [helper.make_node("Gather", [pos, pos_ids], [p], axis=0), helper.make_node("Add", [w, p], [total])]
    if seg_ids and seg:
        s, total2 = fresh(f"{tag}/seg"), fresh(f"{tag}/sum2")
        out += [helper.make_node("Gather", [seg, seg_ids], [s], axis=0), helper.make_node("Add", [total, s], [total2])]
        total = total2
    out.append(helper.make_node("LayerNormalization", [total, gamma, beta], [node.output[0]], name=tag, axis=-1,
                                epsilon=float(a.get("epsilon", 1e-12))))
    if len(node.output) > 1 and node.output[1]:
        if not mask:
            return None
        ax, n = _const(fresh, f"{tag}/axes", np.array([1], np.int64))
        m32 = fresh(f"{tag}/mask32")
        out += [n, helper.make_node("Cast", [mask], [m32], to=TensorProto.INT32),
                helper.make_node("ReduceSum", [m32, ax], [node.output[1]], keepdims=0)]
    return out
