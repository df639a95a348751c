"""Per-layer statistics of a model's prunable weights: what `blockprune inspect` shows.

Compression rate is counted as the paper does: CR = (zeros + nonzeros) / nonzeros over every
2-D Linear weight (encoder layers, pooler, classifier; embeddings are Gathers, not counted;
biases not counted).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx

from blockprune.blocks import BlockShape, block_keep_from_mask, compression_rate
from blockprune.passes.base import PassContext
from blockprune.passes.find_weights import find_weights_in_graph


@dataclass
class LayerStats:
    name: str
    initializer: str
    role: str | None
    shape: tuple[int, int]  # (out, in)
    dtype: str
    block: str | None
    density: float
    nonzero_blocks: int | None
    total_blocks: int | None
    bytes: int  # as stored (dense)
    nonzero_bytes: int  # values that survive (what a compact format must keep)
    source: str | None = None
    form: str | None = None
    reason: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelStats:
    layers: list[LayerStats]
    total: int
    nonzero: int

    @property
    def compression_rate(self) -> float:
        return compression_rate(self.total, self.nonzero)

    @property
    def density(self) -> float:
        return self.nonzero / max(self.total, 1)


def model_stats(model: onnx.ModelProto, block: str | BlockShape | None = None) -> ModelStats:
    """Stats for every prunable weight; ``block`` overrides the block recorded in metadata."""
    ctx = PassContext(model)
    layers_meta = ctx.meta("layers", {}) or {}
    weights = find_weights_in_graph(ctx.graph, {"param_map": ctx.meta("param_map", {}),
                                                "architecture": ctx.meta("architecture")})
    consts = ctx.constants()
    rows, total, nonzero, seen = [], 0, 0, set()
    for w in weights:
        if w.initializer in seen:
            continue
        seen.add(w.initializer)
        values = w.to_out_in(np.asarray(consts[w.initializer].values))
        meta = layers_meta.get(w.initializer, {})
        blk = BlockShape.parse(block) if block else (BlockShape.parse(meta["block"]) if meta.get("block") else None)
        nz = int(np.count_nonzero(values))
        nzb = tb = None
        if blk is not None and blk.rows <= values.shape[0] and blk.cols <= values.shape[1]:
            keep = block_keep_from_mask(values, blk)
            nzb, tb = int(keep.sum()), int(keep.size)
        itemsize = values.dtype.itemsize
        rows.append(LayerStats(w.display_name, w.initializer, w.role, w.shape, str(values.dtype),
                               str(blk) if blk else None, nz / values.size, nzb, tb,
                               values.size * itemsize, nz * itemsize, meta.get("source"),
                               meta.get("form"), meta.get("reason")))
        total += _original_size(meta, values.size)
        nonzero += nz
    for row in _block_sparse_rows(ctx, layers_meta) + _int8_dense_rows(ctx, layers_meta):
        rows.append(row)
        total += _original_size(layers_meta.get(row.initializer, {}), row.shape[0] * row.shape[1])
        nonzero += round(row.density * row.shape[0] * row.shape[1])
    return ModelStats(rows, total, nonzero)


def _original_size(meta: dict, current: int) -> int:
    """Elements of the weight before compaction: the paper's CR counts removed structure as zeros."""
    if meta.get("compacted"):
        before = meta["compacted"][0]
        return int(before[0]) * int(before[1])
    return current


def _block_sparse_rows(ctx: PassContext, layers_meta: dict) -> list[LayerStats]:
    """Rows for layers stored as ``ai.blockprune::BlockSparseMatMul`` (or its int8 variant)."""
    from blockprune.passes.bsr_function import DOMAIN, OP
    from blockprune.passes.bsr_int8_function import OP_INT8

    rows = []
    for node in ctx.graph.nodes:
        if node.domain != DOMAIN or node.op not in (OP, OP_INT8):
            continue
        values, indices, indptr = (np.asarray(t.values) for t in node.inputs[1:4])
        out_f, in_f = (int(x) for x in node.attrs["dense_shape"])
        r, c = (int(x) for x in node.attrs["blocksize"])
        name = node.attrs.get("weight_name", node.name)
        name = name.decode() if isinstance(name, bytes) else str(name)
        meta = layers_meta.get(name, {})
        nz = _nonzero(meta, values, out_f * in_f, node.op == OP_INT8)
        stored = int(values.nbytes + indices.nbytes + indptr.nbytes) + sum(int(t.values.nbytes) for t in node.inputs[4:])
        rows.append(LayerStats(name, name, _role(ctx, name), (out_f, in_f), str(values.dtype), f"{r}x{c}",
                               nz / (out_f * in_f), int(indices.size), (out_f // r) * (in_f // c),
                               stored, nz * values.dtype.itemsize, meta.get("source"),
                               _form(meta, "bsr"), meta.get("reason")))
    return rows


def _int8_dense_rows(ctx: PassContext, layers_meta: dict) -> list[LayerStats]:
    """Rows for dense layers quantized by ``QuantizeInt8`` (MatMulInteger on a ``<weight>.int8``)."""
    import onnx_graphsurgeon as gs

    rows, seen = [], set()
    for node in ctx.graph.nodes:
        b = node.inputs[1] if node.op == "MatMulInteger" and len(node.inputs) > 1 else None
        if not isinstance(b, gs.Constant) or not b.name.endswith(".int8") or b.name in seen:
            continue
        seen.add(b.name)
        name = b.name.removesuffix(".int8")
        meta = layers_meta.get(name, {})
        wq = np.asarray(b.values)  # [in, out]
        shape = (int(wq.shape[1]), int(wq.shape[0]))
        nz = _nonzero(meta, wq, wq.size, True)
        blk = BlockShape.parse(meta["block"]) if meta.get("block") else None
        rows.append(LayerStats(name, name, _role(ctx, name), shape, str(wq.dtype), str(blk) if blk else None,
                               nz / wq.size, None, None, int(wq.nbytes), nz * wq.dtype.itemsize,
                               meta.get("source"), _form(meta, "dense"), meta.get("reason")))
    return rows


def _nonzero(meta: dict, values: np.ndarray, size: int, quantized: bool) -> int:
    """Nonzero weights; for int8 the float32 density the policy recorded (rounding a small weight
    to 0 is quantization, not pruning, and must not change the compression rate)."""
    if quantized and meta.get("density") is not None:
        return round(float(meta["density"]) * size)
    return int(np.count_nonzero(values))


def _form(meta: dict, default: str) -> str:
    form = meta.get("form") or default
    return form + "+int8" if meta.get("quant") == "int8" else form


def _role(ctx: PassContext, name: str) -> str | None:
    from blockprune.models.registry import role_of_hf_name

    arch = ctx.meta("architecture")
    return (role_of_hf_name(arch, name) or (None, None))[0] if arch else None
