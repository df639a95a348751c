"""Block geometry (numpy): parsing, norms, the edge rule and the selection rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from blockprune.blocks import (BlockShape, block_keep_from_mask, block_norms, block_scores, block_sizes,
                               check_sparsity, choose_pruned, expand_block_mask, is_block_aligned)
from blockprune.errors import BlockpruneError


def test_parse_and_modes():
    assert BlockShape.parse("1x32") == BlockShape(1, 32)
    assert BlockShape.parse(" 16 X 1 ") == BlockShape(16, 1)
    assert BlockShape.parse([4, 4]).mode == "tile"
    assert BlockShape.parse("1x32").mode == "row-segment"
    assert BlockShape.parse("16x1").mode == "column-segment"
    for bad in ("0x4", "4x0", "abc", "4", "-1x2"):
        with pytest.raises(BlockpruneError):
            BlockShape.parse(bad)


def test_norms_match_direct_loop_with_edges():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((10, 13))
    b = BlockShape(4, 5)
    norms, sizes = block_norms(w, b), block_sizes(w.shape, b)
    assert norms.shape == sizes.shape == (3, 3)
    for i in range(3):
        for j in range(3):
            blk = w[i * 4:(i + 1) * 4, j * 5:(j + 1) * 5]
            assert norms[i, j] == pytest.approx(np.linalg.norm(blk))
            assert sizes[i, j] == blk.size
    scores = block_scores(w, b)
    assert scores[2, 2] == pytest.approx(norms[2, 2] * np.sqrt(20 / sizes[2, 2]))
    assert scores[0, 0] == pytest.approx(norms[0, 0])


def test_choose_pruned_exact_when_block_divides():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 64))
    for blk in ("1x32", "16x1", "4x4", "32x32"):
        b = BlockShape.parse(blk)
        n = block_norms(w, b).size
        for s in (0.0, 0.25, 0.5, 0.75):
            pruned = choose_pruned(block_scores(w, b), block_sizes(w.shape, b), s)
            assert pruned.sum() == math.ceil(s * n - 0.5)  # nearest count, halves kept
            if 0 < pruned.sum() < n:  # weakest first
                sc = block_scores(w, b)
                assert sc[pruned].max() <= sc[~pruned].min()


def test_mask_roundtrip_and_alignment():
    keep = np.array([[1, 0, 1], [0, 1, 1]], dtype=bool)
    b = BlockShape(3, 4)
    m = expand_block_mask(keep, b, (5, 10))  # edge rows/cols are partial
    assert m.shape == (5, 10) and m[0, 4] == 0 and m[4, 9] == 1
    np.testing.assert_array_equal(block_keep_from_mask(m, b), keep)
    assert is_block_aligned(m, b)
    m[0, 0] = 0
    assert not is_block_aligned(m, b)


def test_sparsity_bounds():
    assert check_sparsity(0) == 0.0
    for bad in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(BlockpruneError):
            check_sparsity(bad)
