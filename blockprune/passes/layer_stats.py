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
                               values.size * itemsize, nz * itemsize, meta.get("source")))
        total += values.size
        nonzero += nz
    return ModelStats(rows, total, nonzero)
