"""Torch block grouping vs a direct (looped) numpy reference and vs blockprune.blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blockprune import blocks as nb
from blockprune.blocks import BlockShape
from blockprune.errors import BlockpruneError
from blockprune.frontends import grouping as tg

# (shape out x in, block): 1xw row segments, hx1 column segments, rxc tiles, and edge cases
# where the block does not divide one or both sides.
CASES = [
    ((6, 16), "1x4"),
    ((8, 6), "4x1"),
    ((8, 12), "2x3"),
    ((7, 10), "1x4"),  # partial last column strip
    ((7, 10), "3x1"),  # partial last row strip
    ((7, 10), "3x4"),  # partial row and column
    ((5, 5), "5x5"),  # one block
    ((3, 4), "1x1"),  # element pruning
]


def reference_norms(w: np.ndarray, r: int, c: int) -> np.ndarray:
    """Loop over blocks, slicing the (unpadded) matrix: independent of the pad+reshape trick."""
    gr, gc = -(-w.shape[0] // r), -(-w.shape[1] // c)
    out = np.zeros((gr, gc))
    for i in range(gr):
        for j in range(gc):
            blk = w[i * r : (i + 1) * r, j * c : (j + 1) * c]
            out[i, j] = np.sqrt((blk.astype(np.float64) ** 2).sum())
    return out


def reference_scores(w: np.ndarray, r: int, c: int) -> np.ndarray:
    gr, gc = -(-w.shape[0] // r), -(-w.shape[1] // c)
    out = np.zeros((gr, gc))
    for i in range(gr):
        for j in range(gc):
            blk = w[i * r : (i + 1) * r, j * c : (j + 1) * c].astype(np.float64)
            out[i, j] = np.sqrt((blk**2).sum()) * np.sqrt(r * c / blk.size)
    return out


def reference_mask(keep: np.ndarray, r: int, c: int, shape) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    for i in range(keep.shape[0]):
        for j in range(keep.shape[1]):
            m[i * r : (i + 1) * r, j * c : (j + 1) * c] = keep[i, j]
    return m


def _w(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("shape,block", CASES)
def test_group_norms_match_loop_reference_and_blocks(shape, block):
    b = BlockShape.parse(block)
    w = _w(shape)
    got = tg.group_norms(w, b).numpy()
    ref = reference_norms(w.numpy(), b.rows, b.cols)
    assert got.shape == b.grid(shape)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got, nb.block_norms(w.numpy(), b), rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape,block", CASES)
def test_group_scores_scale_edge_blocks_like_blocks(shape, block):
    b = BlockShape.parse(block)
    w = _w(shape, seed=1)
    got = tg.group_scores(w, b).numpy()
    np.testing.assert_allclose(got, reference_scores(w.numpy(), b.rows, b.cols), rtol=1e-12)
    np.testing.assert_allclose(got, nb.block_scores(w.numpy(), b), rtol=1e-12)
    np.testing.assert_array_equal(tg.block_sizes(shape, b).numpy(), nb.block_sizes(shape, b))


def test_edge_block_score_is_full_block_equivalent():
    # Constant matrix: every block, partial or not, must score the same after scaling,
    # while the raw norm of the partial block is smaller.
    w = torch.full((5, 7), 2.0, dtype=torch.float64)
    b = BlockShape(2, 3)
    norms, scores = tg.group_norms(w, b), tg.group_scores(w, b)
    assert norms[-1, -1] < norms[0, 0]
    torch.testing.assert_close(scores, torch.full_like(scores, 2.0 * np.sqrt(6)))


@pytest.mark.parametrize("shape,block", CASES)
def test_expand_keep_matches_reference_and_blocks(shape, block):
    b = BlockShape.parse(block)
    grid = b.grid(shape)
    keep = np.random.default_rng(3).random(grid) > 0.5
    got = tg.expand_keep(torch.from_numpy(keep), b, shape)
    assert got.dtype == torch.bool and tuple(got.shape) == shape
    np.testing.assert_array_equal(got.numpy(), reference_mask(keep, b.rows, b.cols, shape))
    np.testing.assert_array_equal(got.numpy(), nb.expand_block_mask(keep, b, shape) != 0)
    # Round trip back to the keep matrix, and the mask is block aligned.
    np.testing.assert_array_equal(tg.keep_from_mask(got, b).numpy(), keep)
    assert tg.is_block_aligned(got, b)


def test_not_block_aligned_is_detected():
    m = torch.ones(4, 8, dtype=torch.bool)
    m[0, 1] = False  # half a 1x4 block
    assert not tg.is_block_aligned(m, BlockShape(1, 4))
    assert nb.is_block_aligned(m.numpy().astype(np.float32), BlockShape(1, 4)) is False


def test_group_norms_are_differentiable_with_zero_subgradient():
    w = _w((4, 8)).requires_grad_(True)
    with torch.no_grad():
        w[0, :4] = 0.0  # an all-zero group must not produce NaN gradients
    b = BlockShape(1, 4)
    tg.group_norms(w, b).sum().backward()
    assert torch.isfinite(w.grad).all()
    assert torch.equal(w.grad[0, :4], torch.zeros(4, dtype=w.dtype))
    # d||g||/dw = w / ||g|| for a nonzero group
    g = w.detach()[1, :4]
    torch.testing.assert_close(w.grad[1, :4], g / g.norm())


def test_float32_agrees_with_numpy_float64():
    b = BlockShape(3, 4)
    w = _w((7, 10), seed=5).float()
    np.testing.assert_allclose(tg.group_norms(w, b).numpy(), nb.block_norms(w.numpy(), b), rtol=1e-6)


def test_errors():
    with pytest.raises(BlockpruneError, match="2-D"):
        tg.group_norms(torch.zeros(4), BlockShape(1, 2))
    with pytest.raises(BlockpruneError, match="keep matrix"):
        tg.expand_keep(torch.ones(2, 2, dtype=torch.bool), BlockShape(1, 4), (4, 8))
