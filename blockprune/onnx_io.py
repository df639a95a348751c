"""Reading and writing ONNX models with clear errors, atomic writes and metadata helpers.

Shared by the exporter (models), the passes and the backends. Why a module of its own: every
stage must refuse a missing, foreign or truncated file the same way, and must never leave a
half-written model (or its external-data sidecar) behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import onnx

from blockprune.errors import BlockpruneError

# Protobuf cannot serialise a single message over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
META_PREFIX = "blockprune."


def load_onnx(path: str | os.PathLike, check: bool = True) -> onnx.ModelProto:
    """Load a model, naming the problem and the fix when it cannot be used."""
    path = Path(path)
    if not path.exists():
        raise BlockpruneError(f"model file {str(path)!r} does not exist",
                              "check the path, or create the model with `blockprune export`")
    if path.is_dir():
        raise BlockpruneError(f"{str(path)!r} is a directory, not an ONNX file",
                              "pass the .onnx file itself")
    if path.stat().st_size == 0:
        raise BlockpruneError(f"model file {str(path)!r} is empty", "re-export the model")
    missing = _missing_external_data(path)
    if missing:
        raise BlockpruneError(
            f"model {str(path)!r} keeps its weights in external data, but {missing!r} is missing beside it",
            "copy the .onnx file together with its external data file(s), keeping their names",
        )
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # DecodeError, or missing external data
        raise BlockpruneError(
            f"{str(path)!r} is not a readable ONNX model: the file is truncated, corrupt or of another "
            f"format ({type(exc).__name__}: {exc})",
            "re-export it with `blockprune export`, or copy it again if a transfer was cut short",
        ) from exc
    if check:
        if not model.graph.node or not model.opset_import:
            raise BlockpruneError(
                f"{str(path)!r} holds no ONNX graph (truncated, or not an ONNX file)",
                "re-export it with `blockprune export`",
            )
        try:
            _check(model, path)
        except Exception as exc:
            from blockprune.onnx_fixups import raise_opset_for_layernorm

            if not raise_opset_for_layernorm(model):  # onnxruntime-optimizer output: repaired, else refused
                raise _invalid(path, exc) from exc
            try:
                _check(model, None)
            except Exception as exc2:
                raise _invalid(path, exc2) from exc2
    return model


def _check(model: onnx.ModelProto, path: Path | None) -> None:
    if model.ByteSize() < EXTERNAL_DATA_THRESHOLD or path is None:
        onnx.checker.check_model(model)
    else:
        onnx.checker.check_model(str(path))


def _invalid(path: Path, exc: Exception) -> BlockpruneError:
    return BlockpruneError(
        f"{str(path)!r} is not a valid ONNX model (truncated or corrupt?): {exc}",
        "re-export it with `blockprune export`",
    )


def _missing_external_data(path: Path) -> str | None:
    """Name of the first external-data file the model refers to that does not exist, if any."""
    try:
        bare = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None  # not loadable at all: the caller reports that
    for t in bare.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and not (path.parent / loc).is_file():
                return loc
    return None


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None,
              verify: "Callable[[Path], None] | None" = None) -> Path:
    """Write atomically; weights go to ``<name>.data`` beside the model when over ~2 GB.

    Both files are written in a temporary directory beside the target, ``verify`` (if given) is
    called on the temporary model path, and only then are they renamed into place (data first),
    so a failure at any point leaves neither.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=str(path.parent)))
    try:
        tmp_model = tmpdir / path.name
        data_name = path.name + ".data"
        if external_data:
            onnx.save_model(model, str(tmp_model), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp_model))
        if verify is not None:
            verify(tmp_model)
        if external_data:
            os.replace(tmpdir / data_name, path.parent / data_name)
        os.replace(tmp_model, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def get_meta(model: onnx.ModelProto, key: str, default: Any = None) -> Any:
    """Read a ``blockprune.*`` metadata entry (JSON-decoded)."""
    full = META_PREFIX + key
    for p in model.metadata_props:
        if p.key == full:
            try:
                return json.loads(p.value)
            except json.JSONDecodeError:
                return p.value
    return default


def set_meta(model: onnx.ModelProto, key: str, value: Any) -> None:
    """Write a ``blockprune.*`` metadata entry as JSON, replacing an existing one."""
    full = META_PREFIX + key
    text = json.dumps(value, sort_keys=True)
    for p in model.metadata_props:
        if p.key == full:
            p.value = text
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = full, text


def copy_meta(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    """Carry every metadata entry of ``src`` over to ``dst`` (graph surgery drops them)."""
    existing = {p.key for p in dst.metadata_props}
    for p in src.metadata_props:
        if p.key not in existing:
            e = dst.metadata_props.add()
            e.key, e.value = p.key, p.value
