"""Block structure from the weights: for models that arrive already pruned, without our metadata.

Why: a model pruned elsewhere (another toolkit, a numpy script, ``blockprune prune`` followed by a
plain re-export) carries no ``blockprune.layers`` record of its block shape, so the policy and the
BSR rewrite had nothing to work with ("0 layer(s) rewritten to BSR"). The zeros themselves say
it: a weight pruned in ``r x c`` blocks has (nearly) all its zeros inside all-zero ``r x c``
blocks. For each candidate shape we count the zeros that lie in all-zero blocks (edge blocks
included, as pruning tiles them) and keep the **largest block** (by area, then the wider one)
whose all-zero blocks explain at least ``explain`` of the zeros; 1x1 (unstructured) otherwise.
Incidental exact zeros of a dense layer are few, so a dense layer reports no block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blockprune.blocks import BlockShape, block_keep_from_mask, block_sizes
from blockprune.passes.base import Pass, PassContext, PassReport
from blockprune.passes.find_weights import find_weights_in_graph, require_weights
from blockprune.passes.layers_meta import record_layers

CANDIDATES = ("32x32", "16x16", "8x8", "4x4", "2x2", "1x64", "64x1", "1x32", "32x1", "1x16", "16x1",
              "32x4", "16x4", "8x4",  # input extent a multiple of 4: int8 dot-product kernels (#15)
              "1x8", "8x1", "1x4", "4x1", "1x2", "2x1")
MIN_ZEROS = 0.05  # below this fraction of zeros a layer counts as dense
DEFAULT_EXPLAIN = 0.99


@dataclass
class DetectedBlock:
    """The block shape that explains a weight's zeros (``None``: dense or unstructured)."""

    block: BlockShape | None
    density: float  # fraction of nonzero elements
    block_density: float | None  # fraction of nonzero blocks of ``block``
    explained: float  # fraction of zeros inside all-zero blocks of ``block``


def detect_block(w_out_in: np.ndarray, candidates: tuple[str, ...] = CANDIDATES,
                 explain: float = DEFAULT_EXPLAIN) -> DetectedBlock:
    """Largest candidate block (PyTorch ``[out, in]`` layout) whose zero blocks explain the zeros."""
    nz = w_out_in != 0
    zeros = int(nz.size - np.count_nonzero(nz))
    density = float(np.count_nonzero(nz)) / max(nz.size, 1)
    if zeros < MIN_ZEROS * nz.size:
        return DetectedBlock(None, density, None, 0.0)
    best: tuple[tuple[int, int], DetectedBlock] | None = None
    shapes = sorted((BlockShape.parse(t) for t in candidates), key=lambda b: (-b.rows * b.cols, -b.cols))
    for b in shapes:
        if best is not None and b.rows * b.cols < best[0][0]:
            break  # a larger block already explains the zeros
        if b.rows > nz.shape[0] or b.cols > nz.shape[1]:
            continue
        keep = block_keep_from_mask(nz, b)
        empty_elems = int(block_sizes(nz.shape, b)[~keep].sum())
        frac = empty_elems / zeros
        if frac + 1e-12 < explain:
            continue
        key = (b.rows * b.cols, b.cols)
        if best is None or key > best[0]:
            best = (key, DetectedBlock(b, density, float(keep.mean()), frac))
    return best[1] if best is not None else DetectedBlock(None, density, None, 0.0)


class DetectBlocks(Pass):
    """Record, for every pruned weight without a recorded block, the block its zeros reveal."""

    name = "detect-blocks"

    def __init__(self, explain: float = DEFAULT_EXPLAIN) -> None:
        self.explain = explain

    def transform(self, ctx: PassContext) -> PassReport:
        weights = require_weights(find_weights_in_graph(ctx.graph, {
            "param_map": ctx.meta("param_map", {}), "architecture": ctx.meta("architecture")}))
        layers = ctx.meta("layers", {}) or {}
        consts = ctx.constants()
        report = PassReport(self.name)
        found: dict[str, dict] = {}
        for w in weights:
            if (layers.get(w.initializer) or {}).get("block"):
                continue
            report.matched += 1
            d = detect_block(w.to_out_in(np.asarray(consts[w.initializer].values)), explain=self.explain)
            if d.block is None:
                continue
            found[w.initializer] = {"block": str(d.block), "sparsity": 1.0 - d.density, "source": "detected"}
            report.notes.append(f"{w.display_name}: {d.block} blocks, density {d.density:.2f} "
                                f"({d.explained:.1%} of zeros in empty blocks)")
            report.changed += 1
        if found:
            record_layers(ctx, found)
        report.details["blocks"] = {k: v["block"] for k, v in found.items()}
        return report
