"""The masks file: the hand-off between the PyTorch frontend and the ONNX passes.

Format (``masks.safetensors``):

* one uint8 tensor per pruned weight, 1 = keep, 0 = pruned, **keyed by the ONNX initializer
  name** of the exported model and **in that initializer's own layout** (for a MatMul weight
  stored ``[in, out]`` the mask is ``[in, out]`` too), so applying it is an elementwise product;
* safetensors metadata key ``"blockprune"``: JSON with ``format`` (``blockprune.masks/1``),
  ``source`` (who made it: ``one-shot-l2``, ``reweighted-group-lasso``, ...), and per layer
  ``block`` (``"1x32"``, in the W[out, in] layout), ``sparsity`` and ``hf_name`` where known.

Why keyed by initializer name rather than PyTorch name: the passes never import torch, and a
user may bring an ONNX model that did not come from our exporter. The exporter records the
initializer -> HF parameter mapping in the model's metadata, so both sides can translate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blockprune.errors import BlockpruneError
from blockprune.io import atomic_path

MASKS_FORMAT = "blockprune.masks/1"


@dataclass
class LayerMaskInfo:
    block: str | None = None
    sparsity: float | None = None
    hf_name: str | None = None
    layout: str | None = None  # layout of the mask tensor: "in_out" or "out_in"


@dataclass
class MaskSet:
    """Masks keyed by ONNX initializer name, plus where they came from."""

    masks: dict[str, np.ndarray]
    source: str = "unknown"
    layers: dict[str, LayerMaskInfo] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, str]:
        meta = {
            "format": MASKS_FORMAT,
            "source": self.source,
            "layers": {k: vars(v) for k, v in self.layers.items()},
            "extra": self.extra,
        }
        return {"blockprune": json.dumps(meta, sort_keys=True)}


def save_masks(path: str | Path, maskset: MaskSet) -> Path:
    """Write masks atomically (temp file + rename)."""
    from safetensors.numpy import save_file

    # C order matters: a transposed view (an in_out mask) would otherwise be written as its raw,
    # Fortran-ordered buffer under a C-order header, i.e. silently transposed.
    tensors = {k: np.ascontiguousarray(np.asarray(v) != 0, dtype=np.uint8) for k, v in maskset.masks.items()}
    path = Path(path)
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=maskset.metadata())
    return path


def load_masks(path: str | Path) -> MaskSet:
    """Read a masks file, with one clear error for a missing, corrupt or foreign file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise BlockpruneError(
            f"masks file {str(path)!r} does not exist",
            "pass the masks.safetensors written by `blockprune train` or `blockprune prune --save-masks`",
        )
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw_meta = f.metadata() or {}
            masks = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise BlockpruneError(
            f"masks file {str(path)!r} is not a readable safetensors file ({exc})",
            "regenerate it; it may be truncated or not a masks file at all",
        ) from exc
    meta: dict[str, Any] = {}
    if "blockprune" in raw_meta:
        try:
            meta = json.loads(raw_meta["blockprune"])
        except json.JSONDecodeError as exc:
            raise BlockpruneError(
                f"masks file {str(path)!r} has corrupt blockprune metadata", "regenerate it"
            ) from exc
    if meta and meta.get("format") != MASKS_FORMAT:
        raise BlockpruneError(
            f"masks file {str(path)!r} has format {meta.get('format')!r}, expected {MASKS_FORMAT!r}",
            "regenerate it with this version of blockprune",
        )
    layers = {k: LayerMaskInfo(**v) for k, v in meta.get("layers", {}).items()}
    return MaskSet(masks=masks, source=meta.get("source", "unknown"), layers=layers,
                   extra=meta.get("extra", {}))
