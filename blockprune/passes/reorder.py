"""Reorder: permute FFN neurons and attention heads where it costs nothing at run time.

GRIM-style matrix reorder (see ``shared/design/method.md``): rows with the same nonzero block
pattern are put next to each other so that scattered pruned segments line up into all-zero
``r x c`` blocks (which a BSR kernel skips) and dead neurons gather together.

Only permutations proven free are applied (``passes.patterns``):

* FFN intermediate dimension: rows of ffn_in and its bias, columns of ffn_out, one permutation;
* attention heads: the q, k, v rows (and biases) of a head move together, the attention-output
  columns follow v; the head count is inferred by the Reshape, so nothing else changes.

Objective for a target block ``r x c``: all-zero blocks of the permuted weights. Candidate
orders (identity, lexicographic by ffn_in row pattern, by ffn_out column pattern, by both, by
density) are scored and the best kept; the identity wins ties, so the pass never makes things
worse. It reports the empty-block count before and after over all prunable weights.
"""

from __future__ import annotations

import numpy as np

from blockprune.blocks import BlockShape
from blockprune.passes.base import Pass, PassContext, PassReport
from blockprune.passes.find_weights import find_weights_in_graph, require_weights
from blockprune.passes.weight_edit import editable_attentions, editable_ffns, empty_blocks, out_in, take


def _segment_pattern(w_out_in: np.ndarray, width: int) -> np.ndarray:
    """Per row: which ``width``-wide column segments hold a nonzero (bool [rows, segments])."""
    rows, cols = w_out_in.shape
    segs = -(-cols // width)
    padded = np.zeros((rows, segs * width), dtype=bool)
    padded[:, :cols] = w_out_in != 0
    return padded.reshape(rows, segs, width).any(axis=2)


def _lexorder(keys: np.ndarray) -> np.ndarray:
    """Stable lexicographic order of rows of a bool matrix (first column most significant)."""
    if keys.shape[1] == 0:
        return np.arange(keys.shape[0])
    return np.lexsort(keys[:, ::-1].T)


def ffn_permutation(w1: np.ndarray, w2: np.ndarray, block: BlockShape) -> tuple[np.ndarray, int, int]:
    """Best free permutation of the intermediate neurons for ``block``.

    ``w1`` is ffn_in ``[I, H]``, ``w2`` ffn_out ``[H, I]`` (PyTorch layout). Returns
    (permutation, empty blocks before, after) counted over both weights.
    """
    def score(p: np.ndarray) -> int:
        return empty_blocks(w1[p], block) + empty_blocks(w2[:, p], block)

    n = w1.shape[0]
    rows1 = _segment_pattern(w1, block.cols)  # neuron -> which input segments it uses
    cols2 = _segment_pattern(w2.T, block.rows)  # neuron -> which output segments it feeds
    both = np.concatenate([rows1, cols2], axis=1)
    dens = (w1 != 0).sum(1) + (w2 != 0).sum(0)
    candidates = [np.arange(n), _lexorder(~rows1), _lexorder(~cols2), _lexorder(~both),
                  _lexorder(~np.concatenate([cols2, rows1], axis=1)), np.argsort(-dens, kind="stable")]
    scored = [(score(p), -i, p) for i, p in enumerate(candidates)]
    best_score, _, best = max(scored, key=lambda t: (t[0], t[1]))
    return best, scored[0][0], best_score


def head_permutation(ws: list[np.ndarray], wo: np.ndarray, d: int, block: BlockShape) -> tuple[np.ndarray, int, int]:
    """Order heads densest first (dead heads gather at the end) when that empties more blocks."""
    h = wo.shape[1] // d

    def permute_rows(p):
        return np.concatenate([np.arange(i * d, (i + 1) * d) for i in p])

    def score(p):
        idx = permute_rows(p)
        return sum(empty_blocks(w[idx], block) for w in ws) + empty_blocks(wo[:, idx], block)

    nnz = [sum(int((w[i * d:(i + 1) * d] != 0).sum()) for w in ws) + int((wo[:, i * d:(i + 1) * d] != 0).sum())
           for i in range(h)]
    ident, cand = np.arange(h), np.argsort(-np.asarray(nnz), kind="stable")
    before, after = score(ident), score(cand)
    return (cand, before, after) if after > before else (ident, before, before)


class Reorder(Pass):
    """Permute FFN neurons and heads to cluster nonzero blocks for ``block`` (exact rewrite)."""

    name = "reorder"

    def __init__(self, block: str | BlockShape = "1x32", heads: bool = True) -> None:
        self.block = BlockShape.parse(block)
        self.heads = heads

    def transform(self, ctx: PassContext) -> PassReport:
        weights = require_weights(find_weights_in_graph(ctx.graph, {
            "param_map": ctx.meta("param_map", {}), "architecture": ctx.meta("architecture")}))
        consts = ctx.constants()
        total_before = sum(empty_blocks(w.to_out_in(np.asarray(consts[w.initializer].values)), self.block)
                           for w in weights)
        report = PassReport(self.name, details={"block": str(self.block)})
        perms: dict[str, list[int]] = {}
        ffns, skipped = editable_ffns(ctx.graph, weights)
        for m in ffns:
            key = f"layer {m.layer} ffn"
            p, before, after = ffn_permutation(out_in(ctx, m.ffn_in), out_in(ctx, m.ffn_out), self.block)
            report.matched += 1
            if after > before:
                take(ctx, m.ffn_in, "out", p)
                take(ctx, m.ffn_out, "in", p)
                perms[key] = p.tolist()
                report.changed += 1
        if self.heads:
            atts, skipped_att = editable_attentions(ctx.graph, weights)
            skipped.update(skipped_att)
            for m in atts:
                key = f"layer {m.layer} heads"
                qkv = [out_in(ctx, x) for x in (m.q, m.k, m.v)]
                p, before, after = head_permutation(qkv, out_in(ctx, m.out), m.head_dim, self.block)
                report.matched += 1
                if after > before:
                    rows = np.concatenate([np.arange(i * m.head_dim, (i + 1) * m.head_dim) for i in p])
                    for x in (m.q, m.k, m.v):
                        take(ctx, x, "out", rows)
                    take(ctx, m.out, "in", rows)
                    perms[key] = p.tolist()
                    report.changed += 1
        total_after = 0
        for w in weights:
            values = ctx.pending_values(w.initializer, np.asarray(consts[w.initializer].values))
            total_after += empty_blocks(w.to_out_in(values), self.block)
        report.details.update(empty_blocks_before=total_before, empty_blocks_after=total_after,
                              skipped=skipped)
        report.notes = [f"{k}: left alone ({v})" for k, v in skipped.items()]
        if perms:
            ctx.set_meta("reorder", {**(ctx.meta("reorder", {}) or {}), **perms})
        return report
