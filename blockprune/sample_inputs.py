"""Random but valid inputs for an encoder ONNX graph, for every numerical check in the toolchain.

Why shared: the export check, every pass's verification and the backends' comparisons must feed
the same kind of data: token ids inside the vocabulary, a padding mask with real zeros in it
(so masking paths are exercised), and token types inside the type vocabulary.
"""

from __future__ import annotations

import numpy as np
import onnx

from blockprune.onnx_io import get_meta

_NP = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32,
       onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
       onnx.TensorProto.BOOL: np.bool_}


def _consumers(model: onnx.ModelProto, name: str) -> list[tuple[onnx.NodeProto, int]]:
    return [(n, i) for n in model.graph.node for i, x in enumerate(n.input) if x == name]


# Fused embedding of onnxruntime's transformer optimizer: input slot -> slot of the table it indexes.
_EMBED_TABLES = {"EmbedLayerNormalization": {0: 2, 1: 4}}


def _gather_rows(model: onnx.ModelProto, input_name: str, depth: int = 3) -> int | None:
    """Rows of the embedding table indexed by ``input_name`` (its vocabulary size).

    Why follow ``Cast`` and the fused embedding: onnxruntime-optimized graphs cast the int64 ids
    to int32 and feed them to ``EmbedLayerNormalization``; without this their ids would be drawn
    from {0, 1} only, far from the realistic inputs every check claims.
    """
    inits = {t.name: t for t in model.graph.initializer}
    for node, slot in _consumers(model, input_name):
        table = None
        if node.op_type == "Gather" and slot == 1:
            table = node.input[0]
        elif slot in _EMBED_TABLES.get(node.op_type, {}) and len(node.input) > _EMBED_TABLES[node.op_type][slot]:
            table = node.input[_EMBED_TABLES[node.op_type][slot]]
        elif node.op_type == "Cast" and depth > 0:
            rows = _gather_rows(model, node.output[0], depth - 1)
            if rows is not None:
                return rows
        t = inits.get(table) if table else None
        if t is not None and len(t.dims) == 2:
            return int(t.dims[0])
    return None


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    init_names = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in init_names]


def make_feeds(model: onnx.ModelProto, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for every graph input; dynamic dims take (batch, seq), fixed dims keep their size."""
    rng = np.random.default_rng(seed)
    cfg = get_meta(model, "config", {}) or {}
    feeds: dict[str, np.ndarray] = {}
    for vi in graph_inputs(model):
        tt = vi.type.tensor_type
        dims = []
        for i, d in enumerate(tt.shape.dim):
            dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (batch if i == 0 else seq))
        dtype = _NP.get(tt.elem_type, np.float32)
        name = vi.name
        if name == "attention_mask":
            arr = np.ones(dims, dtype=dtype)
            if arr.ndim == 2:  # pad the tail of every other row, keep at least one token
                for b in range(1, arr.shape[0], 2):
                    arr[b, max(1, arr.shape[1] // 2 + b % 3):] = 0
        elif np.issubdtype(dtype, np.integer):
            if "type" in name:
                high = int(cfg.get("type_vocab_size") or _gather_rows(model, name) or 1)
            else:
                high = int(cfg.get("vocab_size") or _gather_rows(model, name) or 2)
            arr = rng.integers(0, max(high, 1), size=dims, dtype=np.int64).astype(dtype)
        else:
            arr = rng.standard_normal(dims).astype(dtype)
        feeds[name] = arr
    return feeds


def with_padding(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` with the tail of the last row of a 2-D ``attention_mask`` zeroed if nothing is padded.

    Why: :func:`make_feeds` pads every other row, so batch-1 inputs (what artifacts are mostly
    compiled for) would never exercise the masked path of the attention; a wrong mask lowering
    then passes every check. A quarter of the row is padded; at least one token stays.
    """
    mask = feeds.get("attention_mask")
    if mask is not None and mask.ndim == 2 and mask.shape[1] > 1 and mask.all():
        mask = mask.copy()
        mask[-1, max(1, (3 * mask.shape[1]) // 4):] = 0
        feeds = {**feeds, "attention_mask": mask}
    return feeds
