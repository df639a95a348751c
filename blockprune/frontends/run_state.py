"""The run directory: ``state.json``, per-stage checkpoints, and atomic writes.

Why its own module: resumption only works if one place decides what "finished" means. A stage is
recorded in ``state.json`` only after its checkpoint is completely written (each written to a
temporary name and renamed), so a crash mid-stage leaves the previous stage as the resumption
point, and a changed setting is refused instead of silently mixing two runs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blockprune.blocks import BlockShape
from blockprune.errors import BlockpruneError
from blockprune.frontends.hard_prune import LayerMask
from blockprune.io import atomic_path

STATE_FORMAT = "blockprune.recipe-state/1"


def _write_json(path: Path, obj: Any) -> None:
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class RunState:
    """``out/state.json``: the config fingerprint and, per finished stage, its record.

    A stage is recorded only after its checkpoint is fully written, so a crash mid-stage leaves
    the previous stage as the resumption point.
    """

    def __init__(self, out: Path, fingerprint: dict[str, Any]) -> None:
        self.out = out
        self.path = out / "state.json"
        self.data: dict[str, Any] = {"format": STATE_FORMAT, "config": fingerprint, "stages": {}}
        if self.path.is_file():
            try:
                stored = json.loads(self.path.read_text())
            except json.JSONDecodeError as exc:
                raise BlockpruneError(f"{self.path} is corrupt ({exc})",
                                      "delete the run directory or choose another --out") from exc
            if stored.get("config") != fingerprint:
                diff = sorted(k for k in set(fingerprint) | set(stored.get("config", {}))
                              if fingerprint.get(k) != stored.get("config", {}).get(k))
                raise BlockpruneError(
                    f"{out} holds a run with different settings ({', '.join(diff)})",
                    "use another --out directory, or delete this one to start over",
                )
            self.data = stored
        elif out.exists() and not out.is_dir():
            raise BlockpruneError(f"output {str(out)!r} is a file", "give a directory for the run")

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def record(self, stage: str, info: dict[str, Any], write: bool = True) -> None:
        self.data["stages"][stage] = info
        if write:
            _write_json(self.path, self.data)

    def get(self, stage: str) -> dict[str, Any] | None:
        return self.data["stages"].get(stage)


def checkpoint_dir(out: Path, stage: str) -> Path:
    return out / "checkpoints" / stage


def _save_pretrained_atomic(model: Any, tokenizer: Any, target: Path, extra: dict[str, Any] | None = None) -> None:
    """``save_pretrained`` into a temp dir beside ``target``, then swap it in: never half a checkpoint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    for name, tensors in (extra or {}).items():
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _load_weights(loaded: Any, ckpt: Path, attention: str = "eager") -> None:
    """Replace ``loaded.model`` by the checkpoint's weights (same class; ``attention`` kernel)."""
    cls = type(loaded.model)
    model = cls.from_pretrained(str(ckpt), local_files_only=True, attn_implementation=attention)
    model.eval()
    loaded.model = model
    loaded.config = model.config


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise BlockpruneError(f"checkpoint file {path} is missing although state.json lists its stage as done",
                              "delete the run directory (or that stage's entry in state.json) and rerun")
    return load_file(str(path))


def _masks_from_file(path: Path, layers: dict[str, BlockShape]) -> dict[str, LayerMask]:
    from blockprune.frontends.grouping import keep_from_mask

    raw = _load_tensors(path)
    out = {}
    for n, block in layers.items():
        mask = raw[n].bool()
        out[n] = LayerMask(block=block, keep=keep_from_mask(mask, block), mask=mask)
    return out


