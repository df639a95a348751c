"""Block geometry shared by the frontends (PyTorch) and the passes (ONNX): numpy only.

Conventions (read these before touching masks):

* A block shape ``r x c`` is always stated in the **PyTorch Linear layout**, ``W[out, in]``
  (row = output neuron, column = input feature), whatever layout the weight has in ONNX.
  The paper's modes are all r x c tiles in that layout:

  - ``1xw``: a row segment of width w inside a column strip ("row pruning inside each column
    block", the authors' default),
  - ``hx1``: a column segment of height h inside a row strip,
  - ``rxc``: a general tile, what BSR kernels want.

* The matrix is tiled from the top-left corner. **Edge rule**: when r does not divide the row
  count (or c the column count), the last block row (column) is a partial block holding the
  remainder. A partial block is a group like any other; its score is its L2 norm scaled by
  ``sqrt(r*c / size)``, i.e. the norm a full block with the same mean square would have, so
  that edge blocks are neither favoured nor penalised for being small. Nothing is skipped.

* Sparsity is the fraction of *elements* zeroed. Blocks are pruned weakest first until the
  pruned element count is as close as possible to ``sparsity * numel``, a tie going to the
  smaller count (keep more weights); when the block divides the matrix this is exactly
  ``ceil(sparsity * n_blocks - 0.5)`` blocks, i.e. the nearest count, halves rounded down.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from blockprune.errors import BlockpruneError

_BLOCK_RE = re.compile(r"^\s*(\d+)\s*[xX×,]\s*(\d+)\s*$")


@dataclass(frozen=True)
class BlockShape:
    """An r x c block in the ``W[out, in]`` layout."""

    rows: int
    cols: int

    @classmethod
    def parse(cls, text: "str | BlockShape | Sequence[int]") -> "BlockShape":
        """Parse ``"1x32"``, ``"16x1"``, ``"4x4"`` (also ``[4, 4]``)."""
        if isinstance(text, BlockShape):
            return text
        if isinstance(text, (list, tuple)) and len(text) == 2:
            r, c = int(text[0]), int(text[1])
        else:
            m = _BLOCK_RE.match(str(text))
            if not m:
                raise BlockpruneError(
                    f"block shape {text!r} is not of the form RxC",
                    "write it as rows x cols in the PyTorch W[out, in] layout, e.g. 1x32, 16x1, 4x4",
                )
            r, c = int(m.group(1)), int(m.group(2))
        if r <= 0 or c <= 0:
            raise BlockpruneError(
                f"block shape {r}x{c} has a zero side",
                "both sides of a block must be at least 1, e.g. 1x32",
            )
        return cls(r, c)

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"

    @property
    def mode(self) -> str:
        """The paper's name for this block: row segment, column segment, or tile."""
        if self.rows == 1 and self.cols == 1:
            return "element"
        if self.rows == 1:
            return "row-segment"
        if self.cols == 1:
            return "column-segment"
        return "tile"

    def check_fits(self, shape: tuple[int, int], name: str = "weight") -> None:
        """A block larger than the matrix makes no sense: refuse it, naming the layer."""
        out_f, in_f = shape
        if self.rows > out_f or self.cols > in_f:
            raise BlockpruneError(
                f"block {self} is larger than layer {name!r} of shape {out_f}x{in_f} (out x in)",
                "choose a block no larger than the matrix, or exclude the layer in the config",
            )

    def grid(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Number of block rows and block columns (edge blocks included)."""
        return math.ceil(shape[0] / self.rows), math.ceil(shape[1] / self.cols)


def _padded(w: np.ndarray, block: BlockShape) -> np.ndarray:
    gr, gc = block.grid(w.shape)
    pr, pc = gr * block.rows - w.shape[0], gc * block.cols - w.shape[1]
    if pr or pc:
        w = np.pad(w, ((0, pr), (0, pc)))
    return w


def block_sizes(shape: tuple[int, int], block: BlockShape) -> np.ndarray:
    """Element count of every block, shape ``grid(shape)``; edge blocks are smaller."""
    gr, gc = block.grid(shape)
    rows = np.full(gr, block.rows, dtype=np.int64)
    cols = np.full(gc, block.cols, dtype=np.int64)
    rows[-1] = shape[0] - (gr - 1) * block.rows
    cols[-1] = shape[1] - (gc - 1) * block.cols
    return np.outer(rows, cols)


def block_norms(w_out_in: np.ndarray, block: BlockShape) -> np.ndarray:
    """L2 norm of every block of ``W[out, in]``, shape ``grid``, computed without Python loops."""
    if w_out_in.ndim != 2:
        raise BlockpruneError(f"expected a 2-D weight, got shape {w_out_in.shape}")
    p = _padded(np.asarray(w_out_in, dtype=np.float64), block)
    gr, gc = block.grid(w_out_in.shape)
    sq = (p * p).reshape(gr, block.rows, gc, block.cols).sum(axis=(1, 3))
    return np.sqrt(sq)


def block_scores(w_out_in: np.ndarray, block: BlockShape) -> np.ndarray:
    """Pruning criterion: block L2 norm, edge blocks scaled to full-block equivalents."""
    norms = block_norms(w_out_in, block)
    sizes = block_sizes(w_out_in.shape, block)
    return norms * np.sqrt(block.rows * block.cols / sizes)


def expand_block_mask(keep: np.ndarray, block: BlockShape, shape: tuple[int, int]) -> np.ndarray:
    """Element mask (float32 0/1, ``shape``) from a per-block keep matrix."""
    m = np.repeat(np.repeat(keep.astype(bool), block.rows, axis=0), block.cols, axis=1)
    return m[: shape[0], : shape[1]].astype(np.float32)


def block_keep_from_mask(mask_out_in: np.ndarray, block: BlockShape) -> np.ndarray:
    """Per-block keep matrix: a block is kept if any of its elements is nonzero."""
    p = _padded(np.asarray(mask_out_in) != 0, block)
    gr, gc = block.grid(mask_out_in.shape)
    return p.reshape(gr, block.rows, gc, block.cols).any(axis=(1, 3))


def is_block_aligned(mask_out_in: np.ndarray, block: BlockShape) -> bool:
    """True when every block of the mask is all-ones or all-zeros."""
    keep = block_keep_from_mask(mask_out_in, block)
    return bool(np.array_equal(expand_block_mask(keep, block, mask_out_in.shape) != 0, mask_out_in != 0))


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    s = float(sparsity)
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise BlockpruneError(
            f"{what} {sparsity} is outside [0, 1)",
            f"give the fraction of weights to remove, e.g. 0.5 for half; 1.0 would delete the layer",
        )
    return s


def choose_pruned(scores: np.ndarray, sizes: np.ndarray, sparsity: float) -> np.ndarray:
    """Boolean array (same shape as ``scores``): True for blocks to prune.

    Weakest first (stable order, so equal scores go to the lower index), stopping at the count
    whose pruned element total is closest to ``sparsity * total`` (a tie keeps more weights).
    """
    flat_s = scores.reshape(-1)
    flat_n = sizes.reshape(-1)
    target = sparsity * float(flat_n.sum())
    order = np.argsort(flat_s, kind="stable")
    cum = np.concatenate([[0], np.cumsum(flat_n[order])])
    k = int(np.argmin(np.abs(cum - target)))
    pruned = np.zeros(flat_s.shape, dtype=bool)
    pruned[order[:k]] = True
    return pruned.reshape(scores.shape)


def density(arr: np.ndarray) -> float:
    return float(np.count_nonzero(arr)) / max(arr.size, 1)


def compression_rate(total: int, nonzero: int) -> float:
    """The paper's CR = (zeros + nonzeros) / nonzeros."""
    return float("inf") if nonzero == 0 else total / nonzero
