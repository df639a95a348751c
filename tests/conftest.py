"""Shared fixtures: exported tiny models (cached per test session), data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GLUE = SHARED / "data" / "glue"

TINY = ("bert-tiny", "roberta-tiny", "distilbert-tiny")
EXPORTERS = ("dynamo", "legacy")


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    if not GLUE.is_dir():
        pytest.skip(f"GLUE data not found at {GLUE} (../shared/data/glue beside the repo)")
    return GLUE


class _Exports:
    """Export each (model, exporter, head) once per test session and hand out the path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.results = {}

    def __call__(self, spec: str, exporter: str = "legacy", head: str = "encoder"):
        key = (spec, exporter, head)
        if key not in self.results:
            from blockprune.models.export import export_onnx
            from blockprune.models.zoo import load_model

            loaded = load_model(spec, head=head)
            path = self.root / f"{spec}-{exporter}-{head}.onnx"
            self.results[key] = (path, export_onnx(loaded, path, exporter=exporter), loaded)
        return self.results[key]

    def path(self, spec: str, exporter: str = "legacy", head: str = "encoder") -> Path:
        return self(spec, exporter, head)[0]


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> _Exports:
    return _Exports(tmp_path_factory.mktemp("exports"))


@pytest.fixture(scope="session")
def minilm_demo(tmp_path_factory) -> dict:
    """The main job on the bundled MiniLM, run once: export (dynamo) -> prune 50% 1x32 -> verify."""
    from blockprune.demo import run_demo

    return run_demo(tmp_path_factory.mktemp("demo"), block="1x32", sparsity=0.5, exporter="dynamo")


@pytest.fixture
def without_pyopencl(monkeypatch):
    """``import pyopencl`` fails while the test runs, as on a machine without OpenCL; the cached
    OpenCL context is dropped before and after so neither side sees the other's."""
    import builtins

    from blockprune.backends.tvm.verify import opencl_verify as ov

    real_import = builtins.__import__

    def no_pyopencl(name, *args, **kwargs):
        if name == "pyopencl":
            raise ImportError("no pyopencl")
        return real_import(name, *args, **kwargs)

    ov._opencl_context.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_pyopencl)
    yield
    monkeypatch.undo()
    ov._opencl_context.cache_clear()


@pytest.fixture
def aarch64_qemu() -> None:
    """Skip unless aarch64 artifacts can be built and run here: the cross-compiler, qemu-user and
    TVM's aarch64 runtime (``make test`` installs the first two; the runtime comes from wheels)."""
    import shutil

    from blockprune.backends.tvm.runtime import runner
    from blockprune.errors import BlockpruneError

    for tool, package in (("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu"), ("qemu-aarch64", "qemu-user")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt-get install {package})")
    try:
        runner.ensure_aarch64_runtime()
    except BlockpruneError as err:
        pytest.skip(f"aarch64 TVM runtime wheels unavailable: {err.problem}")
