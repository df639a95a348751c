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


def _gather_rows(model: onnx.ModelProto, input_name: str) -> int | None:
    """Rows of the embedding table gathered by ``input_name`` (its vocabulary size)."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == input_name:
            t = inits.get(node.input[0])
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
                high = int(cfg.get("type_vocab_size") or 1)
            else:
                high = int(cfg.get("vocab_size") or _gather_rows(model, name) or 2)
            arr = rng.integers(0, max(high, 1), size=dims, dtype=np.int64).astype(dtype)
        else:
            arr = rng.standard_normal(dims).astype(dtype)
        feeds[name] = arr
    return feeds
