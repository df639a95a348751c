"""Verify a quantized model against its float32 reference with a tolerance stated for int8.

Why not max-abs: int8 changes every output a little by design (on the bundled MiniLM with random
tokens, max |diff| of the hidden states is ~0.3-0.4, for onnxruntime's own ``quantize_dynamic``
~0.3-0.7), so the 1e-4 of the exact stages cannot apply, and a max-abs bound loose enough to pass
says nothing. What a user of an encoder keeps is the *direction* of the sentence vector (cosine
similarity, retrieval, STS) and the scale of the outputs (logits), so two numbers are checked on
the same random token batches as every other stage (``blockprune.sample_inputs``):

* ``min_cosine``: the cosine between candidate and reference *sentence vectors*, the lowest over
  every sentence of every batch and output. A sentence vector is the attention-mask-weighted
  mean over the sequence axis of a ``[batch, seq, ...]`` output (sentence-transformers pooling),
  or a row of a ``[batch, n]`` output (pooler output). Rows of fewer than 8 values (the logits
  of a classifier or regressor) are left to the relative error: the cosine of a 2-vector is
  mostly the noise of its sign. Bound: **>= 0.98**. Measured on MiniLM (random
  tokens, seq 7-64): our int8 0.986-0.993, onnxruntime's ``quantize_dynamic`` 0.985-0.992, whose
  cost on real sentences is 0.2-0.4 points of STS-B Spearman; on the verification batches
  (2x16, 1x7) ours gives 0.988 dense, 0.994 at 16x1 50% and 80%, bert-base 0.989. On the 3000
  real STS-B dev sentences our dense int8 has mean cosine 0.993, lowest 0.977
  (``benchmarks/results/int8_accuracy.md``). Bugs on bert-tiny: all scales halved 0.977, q/k/v weights
  transposed 0.940, zero point dropped 0.21 (tests/test_quantize_int8.py checks such models fail).
* ``max_rel_error``: ``||cand - ref|| / ||ref||`` of each whole output, the highest. Bound:
  **<= 0.35** (MiniLM: ours 0.12-0.15, onnxruntime's 0.13-0.17). Cosine is blind to scale: this
  catches a model whose outputs point the right way at the wrong size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from blockprune.errors import BlockpruneError
from blockprune.passes.verify import DEFAULT_SHAPES, paired_runs

MIN_COSINE = 0.98
MAX_REL_ERROR = 0.35
MIN_COSINE_DIM = 8  # shorter sentence vectors (logits) are checked by the relative error only


@dataclass
class QuantVerifyResult:
    min_cosine: float | None  # None: no output has sentence vectors of >= MIN_COSINE_DIM values
    max_rel_error: float
    max_abs_diff: float
    per_shape: dict[str, dict[str, float]] = field(default_factory=dict)
    min_cosine_bound: float = MIN_COSINE
    max_rel_error_bound: float = MAX_REL_ERROR

    @property
    def ok(self) -> bool:
        cos_ok = self.min_cosine is None or (np.isfinite(self.min_cosine) and self.min_cosine >= self.min_cosine_bound)
        return bool(cos_ok and np.isfinite(self.max_rel_error) and self.max_rel_error <= self.max_rel_error_bound)

    def as_dict(self) -> dict[str, float]:
        return {"min_sentence_cosine": self.min_cosine, "max_rel_error": self.max_rel_error,
                "max_abs_diff": self.max_abs_diff, "min_cosine_bound": self.min_cosine_bound,
                "max_rel_error_bound": self.max_rel_error_bound}


def sentence_vectors(out: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """``[batch, d]``: masked mean over the sequence axis of ``[batch, seq, ...]``; rows of 2-D."""
    out = np.asarray(out, dtype=np.float64)
    if out.ndim <= 1:
        return out.reshape(1, -1)
    if out.ndim == 2:
        return out
    flat = out.reshape(out.shape[0], out.shape[1], -1)
    if mask is not None and mask.shape == flat.shape[:2]:
        w = mask.astype(np.float64)[..., None]
        return (flat * w).sum(1) / np.maximum(w.sum(1), 1e-9)
    return flat.mean(1)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    both_zero = (na == 0) & (nb == 0)
    return np.where(both_zero, 1.0, (a * b).sum(-1) / np.maximum(na * nb, 1e-30))


def _lower(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _fmt(cos: float | None) -> str:
    return "n/a (no output with sentence vectors)" if cos is None else f"{cos:.4f}"


def compare_quantized(candidate: onnx.ModelProto, reference: onnx.ModelProto, min_cosine: float = MIN_COSINE,
                      max_rel_error: float = MAX_REL_ERROR, shapes=DEFAULT_SHAPES, seed: int = 0,
                      what: str = "quantized model") -> QuantVerifyResult:
    """Both metrics over ``shapes``; raise one BlockpruneError when a bound is not met."""
    per, cos_min, rel_max, abs_max = {}, None, 0.0, 0.0
    for key, feeds, pairs in paired_runs(candidate, reference, shapes, seed, what):
        mask = feeds.get("attention_mask")
        c_min, r_max, a_max = None, 0.0, 0.0
        for oc, orf in pairs:
            d = oc.astype(np.float64) - orf
            vc, vr = sentence_vectors(oc, mask), sentence_vectors(orf, mask)
            if vr.shape[-1] >= MIN_COSINE_DIM:
                c_min = _lower(c_min, float(np.min(_cosines(vc, vr))))
            r_max = max(r_max, float(np.linalg.norm(d) / max(np.linalg.norm(orf), 1e-30)))
            a_max = max(a_max, float(np.max(np.abs(d))))
        per[key] = {"min_sentence_cosine": c_min, "rel_error": r_max, "max_abs_diff": a_max}
        cos_min, rel_max, abs_max = _lower(cos_min, c_min), max(rel_max, r_max), max(abs_max, a_max)
    result = QuantVerifyResult(cos_min, rel_max, abs_max, per, min_cosine, max_rel_error)
    if not result.ok:
        raise BlockpruneError(
            f"verification failed: the {what} is too far from its float32 reference: lowest sentence-vector "
            f"cosine {_fmt(cos_min)} (bound >= {min_cosine:g}), relative error {rel_max:.3g} (bound <= "
            f"{max_rel_error:g}) ({per}); nothing was written",
            "keep this model in float32 (drop --quantize), leave the heads in float32 (no --include-heads), "
            "or report this as a bug with the model; --no-verify writes it anyway",
        )
    return result
