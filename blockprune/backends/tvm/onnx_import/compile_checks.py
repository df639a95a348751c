"""Checks on what ``compile`` is asked for, before any work: static shapes only.

Why: TVM artifacts are compiled for one static ``batch x seq`` (the BSR kernels are generated per
M = batch * seq); a dynamic batch would otherwise fail deep inside TVM or silently mean 1.
"""

from __future__ import annotations

from blockprune.errors import BlockpruneError


def static_dim(value: "int | str | None", what: str = "batch") -> int:
    """``value`` as a positive int; ``None``, 'dynamic', -1 or 0 get one clear error."""
    text = str(value).strip().lower()
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or n < 1 or isinstance(value, float):
        raise BlockpruneError(
            f"{what} {value!r} is not a static size: compiled artifacts have a fixed {what}",
            f"pass a positive integer (e.g. --{what} {1 if what == 'batch' else 128}) and compile one artifact per "
            f"{what} size you serve; run the ONNX model in onnxruntime for dynamic shapes",
        )
    return n
