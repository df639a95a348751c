"""Activation-aware block importance, numpy only (usable by the ONNX passes without torch).

Why: a block's plain L2 norm ignores what the block multiplies. In a transformer a handful of
hidden dimensions carry activations one or two orders of magnitude larger than the rest, so a
small weight on such a dimension can matter more than a large weight on a quiet one. Scoring
the block of ``W ⊙ s`` (``s_j`` = norm of input feature ``j`` over calibration tokens, broadcast
over output rows) estimates the block's contribution to the layer output ``||W_g X_g||`` instead
of its size; this is the Wanda-style criterion generalised to blocks.

``feature_norms`` are normalised to root-mean-square 1 per layer before weighting, so activation-
aware scores stay on the scale of plain block norms (the eps of the reweighting and a global
ranking keep their meaning) and a layer's ranking does not depend on how many tokens were seen.
"""

from __future__ import annotations

import numpy as np

from blockprune.blocks import BlockShape, block_scores
from blockprune.errors import BlockpruneError


def normalise_feature_norms(feature_norms: np.ndarray) -> np.ndarray:
    """``feature_norms / rms(feature_norms)`` (all-zero input: all ones, i.e. plain norms)."""
    s = np.asarray(feature_norms, dtype=np.float64).reshape(-1)
    if s.size == 0 or not np.all(np.isfinite(s)) or np.any(s < 0):
        raise BlockpruneError("per-feature activation norms must be finite and >= 0",
                              "collect them again over a few hundred examples (NaN means the model diverged)")
    rms = float(np.sqrt(np.mean(s * s)))
    return np.ones_like(s) if rms == 0 else s / rms


def activation_weighted(w_out_in: np.ndarray, feature_norms: np.ndarray) -> np.ndarray:
    """``W[out, in] * s[None, :]`` with ``s`` the normalised per-input-feature norms."""
    w = np.asarray(w_out_in, dtype=np.float64)
    if w.ndim != 2:
        raise BlockpruneError(f"expected a 2-D weight W[out, in], got shape {w.shape}",
                              "activation-aware scores apply to Linear weights only")
    s = np.asarray(feature_norms).reshape(-1)
    if s.shape[0] != w.shape[1]:
        raise BlockpruneError(
            f"{s.shape[0]} feature norms for a weight with {w.shape[1]} input features",
            "pass the norms of this layer's input (one per column of W[out, in]; transpose ONNX MatMul weights)")
    return w * normalise_feature_norms(s)[None, :]


def activation_block_scores(w_out_in: np.ndarray, feature_norms: np.ndarray | None,
                            block: BlockShape | str) -> np.ndarray:
    """Block scores of ``W ⊙ s`` (shape = block grid), edge blocks scaled like ``block_scores``.

    ``feature_norms=None`` gives the plain block-norm scores, so callers can switch criteria
    with one argument.
    """
    block = BlockShape.parse(block)
    if feature_norms is None:
        return block_scores(np.asarray(w_out_in, dtype=np.float64), block)
    return block_scores(activation_weighted(w_out_in, feature_norms), block)
