"""The compiled artifact: a directory with the shared library and ``manifest.json``.

Why a manifest: the library alone says nothing about how to call it. Runners (Python, the C++
runner under qemu, RPC) need the input names/shapes/dtypes and the target it was built for, so a
wrong board or a wrong input fails with a clear message instead of a crash inside TVM; the
per-layer forms and source hash say what was compiled from what.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from blockprune.errors import BlockpruneError

MANIFEST = "manifest.json"
LIBRARY = "model.so"
FORMAT = "blockprune-tvm-artifact/1"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Manifest:
    """Everything a runner must know about an artifact (``manifest.json``)."""

    target: dict[str, Any]  # {"name", "arch", "config"}
    inputs: list[dict[str, Any]]  # [{"name", "shape", "dtype"}]
    outputs: list[dict[str, Any]]
    source: dict[str, Any]  # {"path", "sha256"}
    batch: int
    seq: int
    layers: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    library: str = LIBRARY
    kernels: int = 0
    format: str = FORMAT
    verified: dict[str, Any] | None = None  # compile's check against onnxruntime (verify_artifact)

    @property
    def arch(self) -> str:
        return str(self.target["arch"])

    @property
    def target_name(self) -> str:
        return str(self.target["name"])

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "target": self.target, "library": self.library,
                "batch": self.batch, "seq": self.seq, "inputs": self.inputs, "outputs": self.outputs,
                "source": self.source, "versions": self.versions, "kernels": self.kernels,
                "layers": self.layers, **({"verified": self.verified} if self.verified is not None else {})}

    def write(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MANIFEST
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "Manifest":
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise BlockpruneError(f"{directory} is not a compiled artifact (no {MANIFEST})",
                                  "compile the model first: blockprune compile MODEL.onnx -o DIR")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise BlockpruneError(f"{path} is not valid JSON ({err.msg})", "recompile the model") from None
        if d.get("format") != FORMAT:
            raise BlockpruneError(f"{path} has format {d.get('format')!r}, expected {FORMAT!r}",
                                  "recompile the model with this blockprune version")
        keys = ("target", "inputs", "outputs", "source", "batch", "seq", "layers", "versions", "library",
                "kernels", "verified")
        m = cls(**{k: d[k] for k in keys if k in d})
        if not (directory / m.library).is_file():
            raise BlockpruneError(f"artifact {directory} lacks its library {m.library}", "recompile the model")
        return m


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("blockprune", "apache-tvm", "apache-tvm-ffi", "onnx"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            if dist == "blockprune":
                import blockprune

                out[dist] = getattr(blockprune, "__version__", "unknown")
    return out


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp dir beside ``target``; on success it replaces ``target`` (old one removed).

    A failed compile leaves any previous artifact untouched and no half-written directory.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            if not (target / MANIFEST).is_file() and any(target.iterdir()):
                raise BlockpruneError(f"{target} exists and is not a compiled artifact",
                                      "choose an empty or new output directory")
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / "a")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
