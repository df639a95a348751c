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
    for row in _block_sparse_rows(ctx, layers_meta):
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
    """Rows for layers already stored as ``ai.blockprune::BlockSparseMatMul``."""
    from blockprune.models.registry import role_of_hf_name
    from blockprune.passes.bsr_function import DOMAIN, OP

    rows = []
    arch = ctx.meta("architecture")
    for node in ctx.graph.nodes:
        if node.domain != DOMAIN or node.op != OP:
            continue
        values, indices, indptr = (np.asarray(t.values) for t in node.inputs[1:4])
        out_f, in_f = (int(x) for x in node.attrs["dense_shape"])
        r, c = (int(x) for x in node.attrs["blocksize"])
        name = node.attrs.get("weight_name", node.name)
        name = name.decode() if isinstance(name, bytes) else str(name)
        meta = layers_meta.get(name, {})
        role = (role_of_hf_name(arch, name) or (None, None))[0] if arch else None
        nz = int(np.count_nonzero(values))
        rows.append(LayerStats(name, name, role, (out_f, in_f), str(values.dtype), f"{r}x{c}",
                               nz / (out_f * in_f), int(indices.size), (out_f // r) * (in_f // c),
                               int(values.nbytes + indices.nbytes + indptr.nbytes), nz * values.dtype.itemsize,
                               meta.get("source"), meta.get("form", "bsr"), meta.get("reason")))
    return rows
