"""Block compressed sparse row (BSR) storage of a pruned Linear weight: numpy only.

Shared by the ONNX passes (which decide what to store) and the backends (which compute with
it), so that both agree on one layout:

* The weight is ``W[out, in]`` (PyTorch Linear layout) and the block is ``r x c`` in that
  layout (see :mod:`blockprune.blocks`): ``r`` output neurons by ``c`` input features.
* ``data[nnzb, r, c]`` holds the kept blocks, row-block by row-block, block columns ascending
  inside a row-block (the order ``np.nonzero`` gives), so a kernel walks ``data`` linearly.
* ``indices[nnzb]`` is the block-column of each kept block, ``indptr[out/r + 1]`` the usual
  CSR row pointers over row-blocks. Both int32: every transformer layer fits, and half the
  index bytes of int64 matter on a phone.

Here the block must divide the matrix. Edge blocks exist in the pruning masks (see the edge
rule in :mod:`blockprune.blocks`), but a kernel wants uniform blocks: the passes pad the weight
or keep such a layer dense before calling :func:`dense_to_bsr`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from blockprune.blocks import BlockShape
from blockprune.errors import BlockpruneError

INDEX_DTYPE = np.int32


@dataclass(frozen=True, eq=False)
class BSRMatrix:
    """A ``W[out, in]`` weight stored as kept ``r x c`` blocks (layout in the module doc).

    ``eq=False``: equality of numpy arrays is elementwise, compare with ``bsr_to_dense``.
    """

    data: np.ndarray  # [nnzb, r, c] float32
    indices: np.ndarray  # [nnzb] int32, block-column of each block
    indptr: np.ndarray  # [out/r + 1] int32, row-block pointers
    shape: tuple[int, int]  # (out, in) of the dense weight
    block: BlockShape

    def __post_init__(self) -> None:
        self.validate()

    # ---- geometry -------------------------------------------------------------------------
    @property
    def block_rows(self) -> int:
        """Number of row-blocks, ``out / r``."""
        return self.shape[0] // self.block.rows

    @property
    def block_cols(self) -> int:
        """Number of block-columns, ``in / c``."""
        return self.shape[1] // self.block.cols

    @property
    def nnzb(self) -> int:
        """Number of stored (kept) blocks."""
        return int(self.indices.shape[0])

    @property
    def block_density(self) -> float:
        """Fraction of blocks kept; equals the element density of a block-aligned mask."""
        total = self.block_rows * self.block_cols
        return self.nnzb / total if total else 0.0

    def row_nnzb(self) -> np.ndarray:
        """Kept blocks per row-block (shape ``[out/r]``): load balance and empty rows."""
        return np.diff(self.indptr)

    # ---- memory ---------------------------------------------------------------------------
    @property
    def data_nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def index_nbytes(self) -> int:
        """Bytes of ``indices`` + ``indptr``: the storage overhead of sparsity."""
        return int(self.indices.nbytes + self.indptr.nbytes)

    @property
    def nbytes(self) -> int:
        """Total stored bytes (values + indices)."""
        return self.data_nbytes + self.index_nbytes

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the same weight stored dense in float32, for compression ratios."""
        return int(self.shape[0] * self.shape[1] * np.dtype(np.float32).itemsize)

    # ---- checks ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Refuse inconsistent arrays early: a kernel would read out of bounds instead."""
        r, c = self.block.rows, self.block.cols
        _check_divisible(self.shape, self.block)
        nb_rows, nb_cols = self.shape[0] // r, self.shape[1] // c
        problems = []
        if self.data.dtype != np.float32:
            problems.append(f"data dtype is {self.data.dtype}, expected float32")
        if self.indices.dtype != INDEX_DTYPE or self.indptr.dtype != INDEX_DTYPE:
            problems.append("indices and indptr must be int32")
        if self.data.ndim != 3 or self.data.shape[1:] != (r, c):
            problems.append(f"data shape {self.data.shape} is not [nnzb, {r}, {c}]")
        elif self.data.shape[0] != self.indices.shape[0]:
            problems.append(f"data has {self.data.shape[0]} blocks but indices {self.indices.shape[0]}")
        if self.indptr.shape != (nb_rows + 1,):
            problems.append(f"indptr shape {self.indptr.shape} is not ({nb_rows + 1},)")
        else:
            if self.indptr[0] != 0 or self.indptr[-1] != self.indices.shape[0]:
                problems.append("indptr must start at 0 and end at nnzb")
            if np.any(np.diff(self.indptr) < 0):
                problems.append("indptr must be non-decreasing")
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= nb_cols):
            problems.append(f"a block-column index is outside [0, {nb_cols})")
        if problems:
            raise BlockpruneError(
                "inconsistent BSR matrix: " + "; ".join(problems),
                "build BSR matrices with blockprune.bsr.dense_to_bsr rather than by hand",
            )


def _check_divisible(shape: Sequence[int], block: BlockShape) -> None:
    out_f, in_f = int(shape[0]), int(shape[1])
    if out_f % block.rows or in_f % block.cols:
        raise BlockpruneError(
            f"block {block} does not divide the weight of shape {out_f}x{in_f} (out x in)",
            "BSR needs whole blocks: the passes pad such a weight to a multiple of the block "
            "or keep the layer dense; choose a block that divides both sides to avoid this",
        )


def dense_to_bsr(w_out_in: np.ndarray, block: "BlockShape | str | Sequence[int]") -> BSRMatrix:
    """Compress ``W[out, in]``: keep a block iff any of its elements is nonzero.

    Exact: every nonzero element lands in a kept block, so :func:`bsr_to_dense` gives back the
    input bit for bit (as float32). NaN counts as nonzero, so it is kept and visible.
    """
    block = BlockShape.parse(block)
    w = np.asarray(w_out_in)
    if w.ndim != 2:
        raise BlockpruneError(
            f"expected a 2-D weight W[out, in], got shape {w.shape}",
            "pass the Linear weight in the PyTorch layout (out x in)",
        )
    _check_divisible(w.shape, block)
    w = w.astype(np.float32, copy=False)
    r, c = block.rows, block.cols
    gr, gc = w.shape[0] // r, w.shape[1] // c
    tiles = w.reshape(gr, r, gc, c).transpose(0, 2, 1, 3)  # [gr, gc, r, c]
    keep = (tiles != 0).any(axis=(2, 3))
    rows, cols = np.nonzero(keep)  # row-major order: row-blocks ascending, columns ascending
    data = np.ascontiguousarray(tiles[rows, cols], dtype=np.float32).reshape(-1, r, c)
    indptr = np.zeros(gr + 1, dtype=INDEX_DTYPE)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    return BSRMatrix(
        data=data,
        indices=cols.astype(INDEX_DTYPE),
        indptr=indptr,
        shape=(int(w.shape[0]), int(w.shape[1])),
        block=block,
    )


def bsr_to_dense(bsr: BSRMatrix) -> np.ndarray:
    """The dense ``W[out, in]`` (float32) a BSR matrix stands for."""
    r, c = bsr.block.rows, bsr.block.cols
    tiles = np.zeros((bsr.block_rows, bsr.block_cols, r, c), dtype=np.float32)
    rows = np.repeat(np.arange(bsr.block_rows), bsr.row_nnzb())
    tiles[rows, bsr.indices] = bsr.data
    return tiles.transpose(0, 2, 1, 3).reshape(bsr.shape)
