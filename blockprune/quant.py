"""int8 quantization arithmetic of ``compress --quantize int8``: numpy only, one definition.

Why a module of its own: the ONNX quantize pass (which writes the weights), the tests (which
check onnxruntime against these formulas) and the TVM int8 kernels (which must compute the same
thing) all need the exact same rounding rules; spelling them twice is how they drift apart.

* Weights, symmetric per output channel, in the PyTorch ``W[out, in]`` layout::

      w_scale[o] = max_k |W[o, k]| / 127      (1.0 for an all-zero row)
      Wq[o, k]   = clip(round_half_even(W[o, k] / w_scale[o]), -127, 127)   int8

* Activations, dynamic per tensor, exactly ONNX ``DynamicQuantizeLinear`` (uint8)::

      lo, hi = min(0, min X), max(0, max X);  xs = (hi - lo) / 255
      xz = clip(round_half_even(-lo / xs), 0, 255);  xq = clip(round_half_even(X / xs) + xz, 0, 255)

* Product: ``Y[m, o] = xs * w_scale[o] * sum_k (xq[m, k] - xz) * Wq[o, k]`` with an exact int32
  (here int64) accumulator, then float32 ``acc * (xs * w_scale)`` as the ONNX graph computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blockprune.bsr import BSRMatrix, bsr_to_dense

QMAX = 127


@dataclass(frozen=True)
class QuantizedWeight:
    """``W[out, in] ~= w_scale[:, None] * Wq``."""

    wq: np.ndarray  # int8 [out, in]
    w_scale: np.ndarray  # float32 [out]

    def dequantize(self) -> np.ndarray:
        return self.wq.astype(np.float32) * self.w_scale[:, None]


def weight_scales(w_out_in: np.ndarray) -> np.ndarray:
    """Per-output-channel scale ``max |W[o, :]| / 127`` (float32); an all-zero row gets 1.0."""
    amax = np.max(np.abs(np.asarray(w_out_in, dtype=np.float32)), axis=1)
    return np.where(amax > 0, amax / np.float32(QMAX), np.float32(1.0)).astype(np.float32)


def _round_to_int8(w: np.ndarray, scale_per_element: np.ndarray) -> np.ndarray:
    q = np.rint(np.asarray(w, dtype=np.float32) / scale_per_element)  # rint: half to even
    return np.clip(q, -QMAX, QMAX).astype(np.int8)


def quantize_weight(w_out_in: np.ndarray) -> QuantizedWeight:
    """Symmetric per-output-channel int8 of ``W[out, in]``."""
    scale = weight_scales(w_out_in)
    return QuantizedWeight(_round_to_int8(w_out_in, scale[:, None]), scale)


def quantize_bsr_values(bsr: BSRMatrix) -> tuple[np.ndarray, np.ndarray]:
    """int8 ``values [nnzb, r, c]`` and ``w_scale [out]`` of a BSR weight.

    The scales are those of the dense rows, so the result is element for element the dense
    quantization's ``Wq`` at the kept blocks (and 0 elsewhere, as ``round(0) = 0``).
    """
    scale = weight_scales(bsr_to_dense(bsr))
    r = bsr.block.rows
    block_row = np.repeat(np.arange(bsr.block_rows), bsr.row_nnzb())  # [nnzb]
    rows = block_row[:, None] * r + np.arange(r)[None, :]  # [nnzb, r]: output channel of each block row
    return _round_to_int8(bsr.data, scale[rows][:, :, None]), scale


def dynamic_quantize_linear(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """ONNX ``DynamicQuantizeLinear``: ``(xq uint8, xs float32 scalar, xz uint8 scalar)``."""
    x = np.asarray(x, dtype=np.float32)
    lo = np.float32(min(0.0, float(x.min()))) if x.size else np.float32(0.0)
    hi = np.float32(max(0.0, float(x.max()))) if x.size else np.float32(0.0)
    xs = np.float32((hi - lo) / np.float32(255.0))
    if xs == 0:  # all zeros: onnxruntime quantizes to zero-point 0 with scale 0
        return np.zeros(x.shape, np.uint8), np.float32(0.0), np.uint8(0)
    xz = np.uint8(np.clip(np.rint(-lo / xs), 0, 255))
    xq = np.clip(np.rint(x / xs) + np.float32(xz), 0, 255).astype(np.uint8)
    return xq, xs, xz


def int8_matmul_reference(x: np.ndarray, q: QuantizedWeight) -> np.ndarray:
    """``Y[..., o]`` of the contract for activations ``X[..., in]`` (float32 result)."""
    xq, xs, xz = dynamic_quantize_linear(x)
    acc = (xq.astype(np.int64) - np.int64(xz)) @ q.wq.astype(np.int64).T
    return acc.astype(np.float32) * (np.float32(xs) * q.w_scale)
