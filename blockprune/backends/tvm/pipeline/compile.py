"""ONNX model -> compiled TVM artifact directory (shared library + manifest) for a CPU target.

Why our own pipeline: TVM's default CPU pipeline schedules nothing (tvm-notes), so the dense
ops get the schedules of ``cpu_schedules.apply_cpu_schedules`` between legalisation and
lowering; the BSR kernels arrive already scheduled (marked ``tirx.is_scheduled``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from blockprune.errors import BlockpruneError

from blockprune.backends.tvm.runtime.artifact import LIBRARY, Manifest, atomic_dir, sha256_file, versions
from blockprune.backends.tvm.onnx_import.importer import DEFAULT_BATCH, DEFAULT_SEQ, ImportResult, import_onnx
from blockprune.backends.tvm.onnx_import.normalize import importer_errors
from blockprune.backends.tvm.verify.artifact_check import verify_artifact
from blockprune.backends.tvm.targets.presets import TargetPreset, export_fcompile, find_cross_compiler, resolve_target


def compile_relax(mod, preset: TargetPreset):
    """Relax module -> tvm Executable for ``preset``: the one CPU pipeline of the project.

    Fast-math legalization, fusion and our schedules (:func:`.cpu_schedules.build_cpu_pipeline`);
    ``compile``, ``calibrate`` and the benchmarks all come through here, so what is measured is
    what users get. ``BLOCKPRUNE_TVM_CPU_SCHEDULES=0`` compiles without our dense schedules (to
    tell a schedule bug from an import bug).
    """
    import tvm

    from blockprune.backends.tvm.pipeline.cpu_schedules import build_cpu_pipeline

    target = preset.target()
    scheduled = os.environ.get("BLOCKPRUNE_TVM_CPU_SCHEDULES", "1") != "0"
    return tvm.compile(mod, target=target, relax_pipeline=build_cpu_pipeline(target, schedule=scheduled))


@dataclass
class CompileResult:
    directory: Path
    manifest: Manifest
    imported: ImportResult


def _load(model: "str | os.PathLike | onnx.ModelProto") -> tuple[onnx.ModelProto, dict[str, Any]]:
    if isinstance(model, onnx.ModelProto):
        data = model.SerializeToString()
        import hashlib

        return model, {"path": None, "sha256": hashlib.sha256(data).hexdigest()}
    from blockprune.onnx_io import load_onnx

    path = Path(model)
    if not path.is_file():
        raise BlockpruneError(f"model {path} not found", "pass the path of an .onnx file")
    return load_onnx(path), {"path": str(path.resolve()), "sha256": sha256_file(path)}


def compile_model(model: "str | os.PathLike | onnx.ModelProto", out_dir: str | os.PathLike,
                  target: Any = "x86-64", batch: int = DEFAULT_BATCH, seq: int = DEFAULT_SEQ,
                  lower_dense_below: float | None = None, dense_block: str | None = None,
                  cross_compiler: str | None = None, verify: bool = True,
                  atol: float = 1e-4) -> CompileResult:
    """Compile ``model`` for ``target`` into ``out_dir`` (``model.so`` + ``manifest.json``), atomically.

    ``verify``: before the directory is renamed into place, run the artifact (aarch64 under qemu)
    against onnxruntime on the source model (``verify_artifact``); a difference over ``atol``
    leaves no artifact.

    Cross targets are linked with their cross compiler (checked first, before any work);
    ``cross_compiler`` (a name on PATH or a path) overrides the preset's, e.g. a vendor toolchain.
    """
    preset = resolve_target(target)
    if cross_compiler:
        import dataclasses

        extra = {k: v for k, v in preset.extra.items() if k != "ndk"}  # an explicit compiler wins over NDK lookup
        preset = dataclasses.replace(preset, cross_compiler=cross_compiler, extra=extra,
                                     cross_package=f"the compiler you named ({cross_compiler})")
    find_cross_compiler(preset)  # fail early, naming the package, when it is missing
    proto, source = _load(model)
    with importer_errors():  # any frontend failure -> one BlockpruneError naming the node
        imported = import_onnx(proto, batch, seq, preset, lower_dense_below, dense_block)
    executable = compile_relax(imported.mod, preset)
    manifest = Manifest(
        target={"name": preset.name, "arch": preset.arch, "config": dict(preset.config)},
        inputs=[i.to_json() for i in imported.inputs],
        outputs=[o.to_json() for o in imported.outputs],
        source=source, batch=batch, seq=seq,
        layers=[layer.to_json() for layer in imported.layers],
        versions=versions(), library=LIBRARY, kernels=imported.kernels,
    )
    with atomic_dir(out_dir) as tmp:
        fcompile = export_fcompile(preset)
        lib = str(tmp / LIBRARY)
        if fcompile is None:
            executable.export_library(lib)
        else:
            executable.export_library(lib, fcompile=fcompile)
        manifest.write(tmp)
        if verify:
            manifest.verified = verify_artifact(tmp, proto, atol=atol).to_json()
            manifest.write(tmp)
    return CompileResult(Path(out_dir), manifest, imported)
