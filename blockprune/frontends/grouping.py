"""Block grouping of a torch Linear weight ``W[out, in]``: the torch twin of ``blockprune.blocks``.

Why a twin: the penalty needs group norms that autograd can differentiate, on the weight's own
device, every training step; the numpy functions cannot do that. Why it must agree exactly: the
masks learnt here are applied by the ONNX passes, which cut the matrix with ``blockprune.blocks``.
Both therefore use the same recipe: tile from the top-left, zero-pad the last block row/column
up to a whole block (the edge rule: a partial block is a group like any other), reshape to
``(grid_rows, r, grid_cols, c)`` and reduce over the in-block axes. No Python loop over groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blockprune.blocks import BlockShape
from blockprune.errors import BlockpruneError

def _check_2d(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise BlockpruneError(
            f"expected a 2-D weight W[out, in], got shape {tuple(w.shape)}",
            "block pruning applies to Linear weights only; exclude this parameter from the selection",
        )


def grid(shape: tuple[int, int] | torch.Size, block: BlockShape) -> tuple[int, int]:
    """Number of block rows and block columns, edge blocks included (ceil division)."""
    return BlockShape.parse(block).grid((int(shape[0]), int(shape[1])))


def pad_to_blocks(w: torch.Tensor, block: BlockShape) -> torch.Tensor:
    """Zero-pad ``w`` at the bottom/right to a whole number of blocks (no copy if already whole).

    Zeros add nothing to a sum of squares, so norms of partial blocks are unchanged.
    """
    _check_2d(w)
    block = BlockShape.parse(block)
    gr, gc = grid(w.shape, block)
    pr, pc = gr * block.rows - w.shape[0], gc * block.cols - w.shape[1]
    if pr or pc:
        w = F.pad(w, (0, pc, 0, pr))
    return w


def block_view(w: torch.Tensor, block: BlockShape) -> torch.Tensor:
    """``(grid_rows, r, grid_cols, c)`` view of the padded weight; block (i, j) is ``[i, :, j, :]``."""
    block = BlockShape.parse(block)
    p = pad_to_blocks(w, block)
    gr, gc = grid(w.shape, block)
    return p.reshape(gr, block.rows, gc, block.cols)


def group_sq_norms(w: torch.Tensor, block: BlockShape) -> torch.Tensor:
    """Sum of squares of every block, shape ``grid``."""
    v = block_view(w, block)
    return (v * v).sum(dim=(1, 3))


def group_norms(w: torch.Tensor, block: BlockShape) -> torch.Tensor:
    """Plain L2 norm of every block, shape ``grid``; differentiable (the penalty's ``||W_g||_2``).

    ``torch.linalg.vector_norm`` is used rather than ``sqrt(sum(x**2))`` because its backward
    returns the zero subgradient for an all-zero group instead of NaN, which matters once groups
    have been driven to zero.
    """
    v = block_view(w, block)
    return torch.linalg.vector_norm(v, ord=2, dim=(1, 3))


def block_sizes(shape: tuple[int, int] | torch.Size, block: BlockShape, device=None) -> torch.Tensor:
    """Element count of every block (int64, shape ``grid``); the edge blocks are smaller."""
    block = BlockShape.parse(block)
    out_f, in_f = int(shape[0]), int(shape[1])
    gr, gc = grid(shape, block)
    rows = torch.full((gr,), block.rows, dtype=torch.int64, device=device)
    cols = torch.full((gc,), block.cols, dtype=torch.int64, device=device)
    rows[-1] = out_f - (gr - 1) * block.rows
    cols[-1] = in_f - (gc - 1) * block.cols
    return torch.outer(rows, cols)


def group_scores(w: torch.Tensor, block: BlockShape) -> torch.Tensor:
    """Pruning criterion, same as ``blocks.block_scores``: L2 norm, edge blocks scaled to a full
    block's equivalent by ``sqrt(r*c / size)`` so small edge blocks are neither favoured nor
    penalised."""
    block = BlockShape.parse(block)
    norms = group_norms(w, block)
    sizes = block_sizes(w.shape, block, device=w.device).to(norms.dtype)
    return norms * torch.sqrt((block.rows * block.cols) / sizes)


def expand_keep(keep: torch.Tensor, block: BlockShape, shape: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Element mask (bool, ``shape``) from a per-block keep matrix of shape ``grid(shape)``."""
    block = BlockShape.parse(block)
    expected = grid(shape, block)
    if tuple(keep.shape) != expected:
        raise BlockpruneError(
            f"block keep matrix has shape {tuple(keep.shape)}, expected {expected} for a "
            f"{int(shape[0])}x{int(shape[1])} weight with block {block}",
            "build the keep matrix with the same block shape as the weight's grouping",
        )
    m = keep.to(torch.bool)
    m = m.repeat_interleave(block.rows, dim=0).repeat_interleave(block.cols, dim=1)
    return m[: int(shape[0]), : int(shape[1])].contiguous()


def keep_from_mask(mask: torch.Tensor, block: BlockShape) -> torch.Tensor:
    """Per-block keep matrix (bool): a block is kept if any of its elements is nonzero."""
    v = block_view(mask != 0, block)
    return v.any(dim=3).any(dim=1)


def is_block_aligned(mask: torch.Tensor, block: BlockShape) -> bool:
    """True when every block of ``mask`` is all-ones or all-zeros."""
    keep = keep_from_mask(mask, block)
    return bool(torch.equal(expand_keep(keep, block, mask.shape), mask != 0))
