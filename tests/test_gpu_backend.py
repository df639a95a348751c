"""Mobile GPU backend, whole model: tiny block-sparse BERT -> OpenCL artifact -> every kernel on PoCL.

bert-tiny pruned 16x1 at 80% (seq 16) is compiled for ``mali`` and ``adreno``; every OpenCL
kernel of the build (BSR kernels with each layer's real index arrays, dlight-scheduled dense
kernels) runs on PoCL and must match the same PrimFunc compiled for the CPU within
``1e-5 + 1e-4 * max|reference|`` (float32 sums reordered by the GPU schedules differ by a few
ulps; a wrong index or a race is off by order 1). The GPU form policy is checked numerically
with onnxruntime. Skipped only where no OpenCL platform can be had (the reason is printed).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import pytest

from blockprune.errors import BlockpruneError

tvm = pytest.importorskip("tvm")

from blockprune.backends.tvm.verify import gpu_verify as gv  # noqa: E402
from blockprune.backends.tvm.verify import opencl_verify as ov  # noqa: E402
from blockprune.backends.tvm.pipeline.gpu_compile import (  # noqa: E402
    KERNELS_CL,
    compile_gpu_model,
    gpu_forms,
    import_for_gpu,
    kernel_names,
)

SEQ = 16
_REASON = ov.opencl_unavailable_reason()
needs_opencl = pytest.mark.skipif(_REASON is not None, reason=f"no OpenCL platform: {_REASON}")
if _REASON is not None:
    print(f"test_gpu_backend: OpenCL tests skipped: {_REASON}")


@pytest.fixture(scope="module")
def bsr_model(exports, tmp_path_factory) -> tuple[onnx.ModelProto, str]:
    """bert-tiny, 16x1 blocks at 80% sparsity, rewritten to BlockSparseMatMul (and its path)."""
    from blockprune.compress_api import compress_model
    from blockprune.passes import PruneConfig

    dense = exports("bert-tiny", "legacy", "encoder")[1].model
    model = compress_model(dense, prune=PruneConfig(block="16x1", sparsity=0.8), form="auto", verify=False).model
    path = tmp_path_factory.mktemp("gpu") / "bert-tiny-16x1.onnx"
    onnx.save(model, str(path))
    return model, str(path)


@pytest.fixture(scope="module")
def mali_artifact(bsr_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "mali"
    return compile_gpu_model(bsr_model[1], out, target="mali", batch=1, seq=SEQ)


def _cli():
    from blockprune.backends.tvm.cli import add_backend_parsers
    from blockprune.backends.tvm.gpu_cli import add_gpu_parsers

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_backend_parsers(sub)
    add_gpu_parsers(sub)
    return parser


# ---- compile ---------------------------------------------------------------------------------------
def test_compile_writes_library_manifest_and_kernel_source(mali_artifact, bsr_model):
    from blockprune.backends.tvm.runtime.runner import library_arch

    res, out = mali_artifact, mali_artifact.directory
    assert {p.name for p in out.iterdir()} >= {"model.so", "manifest.json", KERNELS_CL}
    assert library_arch(out / "model.so") == "aarch64"  # the OpenCL module's host side, cross-linked
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["name"] == "mali" and manifest["target"]["config"]["kind"] == "opencl"
    assert manifest["seq"] == SEQ and manifest["inputs"][0]["shape"] == [1, SEQ]
    source = (out / KERNELS_CL).read_text()
    assert res.kernel_count == len(kernel_names(source)) > 5
    bsr = [layer for layer in manifest["layers"] if layer["form"] == "bsr"]
    assert bsr and all(layer["kernel"].startswith("bsr_matmul_gpu") and "GPU break-even" in layer["gpu_policy"]
                       for layer in bsr)
    assert {f"{layer['kernel']}_kernel" for layer in bsr} <= kernel_names(source)
    assert manifest["kernels"] == len({layer["kernel"] for layer in bsr})


# ---- every kernel on PoCL --------------------------------------------------------------------------
@needs_opencl
def test_every_mali_kernel_matches_the_cpu_reference(mali_artifact, bsr_model):
    report = gv.verify_artifact_kernels(mali_artifact.directory, "mali")
    table = report.table()
    assert report.ok, table
    assert report.missing == [] and report.artifact_kernels == mali_artifact.kernel_count
    kinds = {r.kind for r in report.rows}
    assert kinds == {"bsr", "dense (dlight)"}, table
    # BSR kernels ran once per layer, with that layer's own arrays from the model
    bsr_layers = [layer for layer in mali_artifact.manifest.layers if layer["form"] == "bsr"]
    assert sum(r.runs for r in report.rows if r.kind == "bsr") == len(bsr_layers), table
    assert all(r.launch.threads_per_group > 1 for r in report.rows)  # really scheduled for a GPU
    assert all(r.max_abs_diff < 1e-3 for r in report.rows if r.kind == "bsr"), table


@needs_opencl
def test_adreno_through_the_cli_compile_and_verify(bsr_model, tmp_path, capsys):
    parser = _cli()
    out = tmp_path / "adreno"
    args = parser.parse_args(["compile", bsr_model[1], "-o", str(out), "--target", "adreno", "--seq", str(SEQ)])
    assert args.func(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["name"] == "adreno" and manifest["target"]["config"]["device"] == "adreno"
    assert (out / KERNELS_CL).is_file()
    capsys.readouterr()
    args = parser.parse_args(["verify", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| bsr_matmul_gpu0 |" in printed and "| NO |" not in printed
    assert printed.count("| yes |") >= 10


def test_bsr_arrays_come_from_the_model(bsr_model):
    """The index arrays fed to each BSR kernel are exactly the layer's ONNX initializers."""
    from onnx import numpy_helper

    model, _ = bsr_model
    gpu = import_for_gpu(model, "mali", 1, SEQ, gpu_break_even=1.0)  # every BSR layer stays BSR on the GPU
    arrays = gv.bsr_layer_arrays(gpu.imported.mod, set(gpu.kernel_specs))
    got = sorted((a["indices"].tobytes(), a["indptr"].tobytes()) for sets in arrays.values() for a in sets)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    want = sorted((inits[n.input[2]].astype(np.int32).tobytes(), inits[n.input[3]].astype(np.int32).tobytes())
                  for n in model.graph.node if n.op_type == "BlockSparseMatMul")
    assert got == want and len(want) > 0


# ---- per-layer GPU policy ----------------------------------------------------------------------------
def test_gpu_break_even_densifies_layers_exactly(bsr_model):
    import onnxruntime as ort

    model, _ = bsr_model
    dense_for_gpu, decisions = gpu_forms(model, break_even=0.1)
    assert decisions and all(d.form == "dense" and "> GPU break-even 0.10" in d.reason for d in decisions)
    assert not any(n.op_type == "BlockSparseMatMul" for n in dense_for_gpu.graph.node)
    imported = import_for_gpu(model, "mali", 1, SEQ, gpu_break_even=0.1).imported
    assert imported.kernels == 0 and all(layer.form == "dense" for layer in imported.layers)
    kept, decisions = gpu_forms(model, break_even=0.9)
    assert all(d.form == "bsr" for d in decisions)

    rng = np.random.default_rng(0)
    outs = []
    for m in (model, dense_for_gpu):
        m = onnx.ModelProto.FromString(m.SerializeToString())
        m.ir_version = min(m.ir_version, 10)  # onnxruntime refuses onnx 1.23's IR 14
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = {i.name: (rng.integers(0, 2, (1, SEQ)) if i.type == "tensor(int64)" else
                          np.ones((1, SEQ), np.float32)) for i in sess.get_inputs()}
        rng = np.random.default_rng(0)
        outs.append(sess.run(None, feeds)[0])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


# ---- bad inputs ------------------------------------------------------------------------------------
def test_no_opencl_platform_names_pocl(mali_artifact, without_pyopencl):
    with pytest.raises(BlockpruneError, match="pocl-opencl-icd"):
        gv.verify_artifact_kernels(mali_artifact.directory, "mali")


def test_preset_whose_limits_the_schedule_exceeds(bsr_model, tmp_path):
    small = {"kind": "opencl", "device": "mali", "max_num_threads": 8}
    with pytest.raises(BlockpruneError, match=r"16 output rows, more than the 8 work-items"):
        compile_gpu_model(bsr_model[1], tmp_path / "small", target=small, batch=1, seq=SEQ)
    assert not (tmp_path / "small").exists()


def test_artifact_for_another_gpu_is_refused(mali_artifact):
    with pytest.raises(BlockpruneError, match="compiled for 'mali', not 'adreno'"):
        gv.verify_artifact_kernels(mali_artifact.directory, "adreno")


def test_verify_exits_1_when_a_kernel_fails(monkeypatch, capsys, tmp_path):
    from blockprune.backends.tvm.targets.gpu_presets import LaunchConfig

    bad = gv.VerifyReport("mali", [gv.KernelRow("f", "f_kernel", "dense (dlight)", LaunchConfig((1, 1, 1), (8, 1, 1)),
                                                1, 0.5, 1e-5)])
    monkeypatch.setattr(gv, "verify_artifact_kernels", lambda *a, **k: bad)
    args = _cli().parse_args(["verify", str(tmp_path), "--target", "mali"])
    assert args.func(args) == 1
    assert "| NO |" in capsys.readouterr().out


def test_gpu_artifact_run_and_bench_say_where_it_can_run(mali_artifact):
    from tvm import rpc

    parser = _cli()
    out = str(mali_artifact.directory)
    args = parser.parse_args(["run", out])
    with pytest.raises(BlockpruneError, match="no TVM runtime with OpenCL"):
        args.func(args)
    args = parser.parse_args(["bench", out])
    with pytest.raises(BlockpruneError, match="--rpc HOST:PORT"):
        args.func(args)
    server = rpc.Server("127.0.0.1", port=9300, port_end=9400, silent=True)  # a CPU-only runtime
    try:
        args = parser.parse_args(["bench", out, "--rpc", f"127.0.0.1:{server.port}"])
        with pytest.raises(BlockpruneError, match="has no OpenCL device"):
            args.func(args)
    finally:
        server.terminate()
