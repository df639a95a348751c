"""TVM CPU backend end to end: ONNX -> Relax (+ BSR kernels) -> library + manifest -> run.

Compiled outputs are compared with onnxruntime on the same inputs (1e-4) for tiny BERT, RoBERTa
and DistilBERT in dense, compacted and block-sparse form; an aarch64 artifact runs under qemu
through the C++ runner; each bad input gets a clear error. Shapes are tiny (batch 2, seq 16) so
every compile stays a few seconds on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as h

from blockprune.errors import BlockpruneError

tvm = pytest.importorskip("tvm")

from blockprune.backends.tvm.runtime import runner  # noqa: E402

from blockprune.backends.tvm.targets import presets as targets  # noqa: E402
from blockprune.backends.tvm.runtime.artifact import MANIFEST, Manifest  # noqa: E402
from blockprune.backends.tvm.pipeline.compile import compile_model  # noqa: E402

BATCH, SEQ, ATOL = 2, 16, 1e-4
FORMS = {  # form -> (block, sparsity, compress form)
    "bsr": ("16x1", 0.8, "bsr"),
    "compact": ("1x64", 0.5, "compact"),
}


@pytest.fixture(scope="module")
def models(exports):
    """(spec, form) -> ONNX model, built once per module."""
    from blockprune.compress_api import compress_model
    from blockprune.passes import PruneConfig

    cache: dict = {}

    def get(spec: str, form: str) -> onnx.ModelProto:
        if (spec, form) not in cache:
            dense = exports(spec, "legacy", "encoder")[1].model
            if form == "dense":
                cache[(spec, form)] = dense
            else:
                block, sparsity, how = FORMS[form]
                res = compress_model(dense, prune=PruneConfig(block=block, sparsity=sparsity), form=how,
                                     verify=False)
                cache[(spec, form)] = res.model
        return cache[(spec, form)]

    return get


def compile_and_compare(model: onnx.ModelProto, out, target: str = "x86-64"):
    res = compile_model(model, out, target=target, batch=BATCH, seq=SEQ)
    run = runner.run_artifact(out, model=model)
    diffs = runner.compare_with_onnx(run, model)
    return res, run, diffs


@pytest.mark.parametrize("form", ["dense", "compact", "bsr"])
@pytest.mark.parametrize("spec", ["bert-tiny", "roberta-tiny", "distilbert-tiny"])
def test_x86_matches_onnxruntime(models, tmp_path, spec, form):
    model = models(spec, form)
    res, run, diffs = compile_and_compare(model, tmp_path / "art")
    assert run.how == "native"
    assert max(diffs.values()) <= ATOL, diffs
    out = next(iter(run.outputs.values()))
    assert out.shape[:2] == (BATCH, SEQ) and np.isfinite(out).all() and np.abs(out).max() > 1e-3
    m = Manifest.read(tmp_path / "art")
    assert [i["shape"] for i in m.inputs] == [[BATCH, SEQ]] * len(m.inputs)
    assert m.target["name"] == "x86-64" and m.arch == "x86_64" and m.source["sha256"]
    assert "apache-tvm" in m.versions
    bsr_layers = [layer for layer in m.layers if layer["form"] == "bsr"]
    n_bsr_nodes = sum(1 for n in model.graph.node if n.op_type == "BlockSparseMatMul")
    assert len(bsr_layers) == n_bsr_nodes
    if form == "bsr":
        assert bsr_layers and m.kernels >= 1
        assert all(layer["block"] == "16x1" and 0 < layer["density"] < 0.6 for layer in bsr_layers)
    else:
        assert m.kernels == 0 and all(layer["form"] == "dense" for layer in m.layers)


def test_dense_pruned_weights_can_be_lowered_to_bsr(models, tmp_path):
    """A pruned model that was not rewritten: --bsr-below lowers its sparse MatMuls to kernels."""
    from blockprune.prune_api import prune_model
    from blockprune.passes import PruneConfig

    dense = models("bert-tiny", "dense")
    pruned = prune_model(dense, PruneConfig(block="16x1", sparsity=0.75), verify=False).model
    res = compile_model(pruned, tmp_path / "art", batch=BATCH, seq=SEQ, lower_dense_below=0.5, dense_block="16x1")
    bsr = [layer for layer in res.manifest.layers if layer["form"] == "bsr"]
    assert len(bsr) >= 8 and res.manifest.kernels >= 1
    diffs = runner.compare_with_onnx(runner.run_artifact(tmp_path / "art", model=pruned), pruned)
    assert max(diffs.values()) <= ATOL


def test_recompiled_artifact_runs_its_new_code(models, tmp_path):
    """dlopen caches by path: running a library rebuilt in place must not reuse the old one."""
    out = tmp_path / "art"
    for form in ("bsr", "dense"):
        model = models("bert-tiny", form)
        compile_model(model, out, batch=BATCH, seq=SEQ)
        diffs = runner.compare_with_onnx(runner.run_artifact(out, model=model), model)
        assert max(diffs.values()) <= ATOL


def test_aarch64_artifact_runs_under_qemu(models, tmp_path, aarch64_qemu):
    model = models("bert-tiny", "bsr")
    res, run, diffs = compile_and_compare(model, tmp_path / "a72", target="cortex-a72")
    assert run.how == "qemu-aarch64"
    assert runner.library_arch(tmp_path / "a72" / "model.so") == "aarch64"
    assert res.manifest.target["config"]["mcpu"] == "cortex-a72" and res.manifest.kernels >= 1
    assert max(diffs.values()) <= ATOL, diffs


# ---- bad inputs --------------------------------------------------------------------------------
def test_unknown_target_lists_the_known_ones(models, tmp_path):
    with pytest.raises(BlockpruneError) as err:
        compile_model(models("bert-tiny", "dense"), tmp_path / "x", target="cortex-a99")
    for name in ("x86-64", "aarch64", "cortex-a53", "cortex-a72", "cortex-a76"):
        assert name in err.value.fix
    assert not (tmp_path / "x").exists()


def test_missing_cross_compiler_names_the_package(models, tmp_path, monkeypatch):
    monkeypatch.setattr(targets.shutil, "which", lambda name: None)
    with pytest.raises(BlockpruneError) as err:
        compile_model(models("bert-tiny", "bsr"), tmp_path / "x", target="aarch64", batch=1, seq=SEQ)
    assert "g++-aarch64-linux-gnu" in err.value.fix
    assert not (tmp_path / "x").exists()
    monkeypatch.setattr(runner.shutil, "which", lambda name: None)
    with pytest.raises(BlockpruneError, match="qemu-aarch64") as err:
        runner.find_qemu()
    assert "qemu-user" in err.value.fix


def _graph_with(node: onnx.NodeProto, opsets) -> onnx.ModelProto:
    x = h.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = h.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    relu = h.make_node("Relu", ["x"], ["r"], name="relu0")
    return h.make_model(h.make_graph([relu, node], "g", [x], [y]), opset_imports=opsets)


@pytest.mark.parametrize("op,domain", [("Det", ""), ("Frobnicate", "com.example")])
def test_unsupported_op_is_named(tmp_path, op, domain):
    node = h.make_node(op, ["r"], ["y"], name="the_node", domain=domain)
    opsets = [h.make_opsetid("", 18)] + ([h.make_opsetid(domain, 1)] if domain else [])
    with pytest.raises(BlockpruneError) as err:
        compile_model(_graph_with(node, opsets), tmp_path / "x", batch=1, seq=1)
    assert op in err.value.problem and "the_node" in err.value.problem


@pytest.fixture(scope="module")
def x86_artifact(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "bert"
    compile_model(models("bert-tiny", "bsr"), out, batch=BATCH, seq=SEQ)
    return out


def test_artifact_for_another_target_is_refused(x86_artifact, tmp_path):
    with pytest.raises(BlockpruneError) as err:
        runner.run_artifact(x86_artifact, expect_target="cortex-a72")
    assert "x86-64" in err.value.problem and "cortex-a72" in err.value.problem
    # a manifest that lies about its library is caught before anything is loaded
    bad = tmp_path / "bad"
    shutil.copytree(x86_artifact, bad)
    d = json.loads((bad / MANIFEST).read_text())
    d["target"]["arch"] = "aarch64"
    (bad / MANIFEST).write_text(json.dumps(d))
    with pytest.raises(BlockpruneError, match="built for x86_64 but the manifest says aarch64"):
        runner.run_artifact(bad)
    with pytest.raises(BlockpruneError, match="not a compiled artifact"):
        runner.run_artifact(tmp_path)


def test_shape_mismatch_at_run_time(x86_artifact, models):
    from blockprune.sample_inputs import make_feeds

    feeds = make_feeds(models("bert-tiny", "bsr"), BATCH, SEQ // 2)
    with pytest.raises(BlockpruneError) as err:
        runner.run_artifact(x86_artifact, feeds)
    assert f"[{BATCH}, {SEQ // 2}]" in err.value.problem and f"[{BATCH}, {SEQ}]" in err.value.problem
    assert f"--seq {SEQ // 2}" in err.value.fix
    feeds = make_feeds(models("bert-tiny", "bsr"), BATCH, SEQ)
    del feeds["attention_mask"]
    with pytest.raises(BlockpruneError, match="attention_mask"):
        runner.run_artifact(x86_artifact, feeds)


def test_cli_compile_run_compare(x86_artifact, models, tmp_path, capsys):
    import argparse

    from blockprune.backends.tvm.cli import add_backend_parsers
    from blockprune.sample_inputs import make_feeds

    model = models("bert-tiny", "bsr")
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "in.npz", **make_feeds(model, BATCH, SEQ, seed=3))
    parser = argparse.ArgumentParser()
    add_backend_parsers(parser.add_subparsers())
    args = parser.parse_args(["run", str(x86_artifact), "--inputs", str(tmp_path / "in.npz"),
                              "--compare", str(tmp_path / "m.onnx"), "--atol", "1e-4", "-o", str(tmp_path / "o.npz")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "vs onnxruntime" in out and "native" in out
    with np.load(tmp_path / "o.npz") as o:
        assert o["last_hidden_state"].shape == (BATCH, SEQ, 64) or o["last_hidden_state"].shape[:2] == (BATCH, SEQ)


def test_bench_over_loopback_rpc(x86_artifact):
    from tvm import rpc

    from blockprune.backends.tvm.runtime.rpc import bench_rpc

    server = rpc.Server("127.0.0.1", port=9190, port_end=9290, silent=True)
    try:
        times = bench_rpc(x86_artifact, "127.0.0.1", server.port, number=2, repeat=2)
    finally:
        server.terminate()
    assert len(times) == 2 and all(0 < t < 1.0 for t in times)


@pytest.mark.parametrize("form", ["dense", "compact", "bsr"])
def test_bundled_minilm_matches_onnxruntime(minilm_demo, tmp_path, form):
    """The real model (MiniLM-L6-H384) in each form, compiled for x86, against onnxruntime."""
    from blockprune.compress_api import compress_model
    from blockprune.passes import PruneConfig

    model = onnx.load(minilm_demo["dense_model"])
    if form != "dense":
        block, sparsity, how = FORMS[form]
        model = compress_model(model, prune=PruneConfig(block=block, sparsity=sparsity), form=how,
                               verify=False).model
    res, run, diffs = compile_and_compare(model, tmp_path / "art")
    assert max(diffs.values()) <= ATOL, diffs
    m = Manifest.read(tmp_path / "art")
    assert len(m.layers) == 36
    if form == "bsr":
        assert sum(layer["form"] == "bsr" for layer in m.layers) >= 24 and m.kernels >= 1


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_bundle_runs_without_python(models, tmp_path, arch):
    """`blockprune bundle`: the C++ runner in the bundle runs the model (natively, or under qemu)."""
    import subprocess

    from blockprune.backends.tvm.runtime.bundle import bundle

    target = "x86-64" if arch == "x86_64" else "cortex-a72"
    if arch == "aarch64":
        missing = [t for t in ("aarch64-linux-gnu-g++", "qemu-aarch64") if shutil.which(t) is None]
        if missing:
            pytest.skip(f"{', '.join(missing)} not installed (apt-get install g++-aarch64-linux-gnu qemu-user)")
    model = models("bert-tiny", "bsr")
    compile_model(model, tmp_path / "art", target=target, batch=BATCH, seq=SEQ)
    out = bundle(tmp_path / "art", tmp_path / "bundle")
    assert {"model.so", "manifest.json", "bp_runner", "bp_rpc_server", "lib", "README.txt"} <= {p.name for p in out.iterdir()}
    m = Manifest.read(out)
    feeds = runner.default_feeds(m, model)
    arrays = runner.check_inputs(m, feeds)
    runner.write_runner_inputs(tmp_path / "in", arrays)
    (tmp_path / "out").mkdir()
    cmd = [str(out / "bp_runner"), str(out / m.library), str(tmp_path / "in"), str(tmp_path / "out")]
    env = dict(os.environ)
    if arch == "aarch64":
        cmd = ["qemu-aarch64"] + cmd
        env["QEMU_LD_PREFIX"] = "/usr/aarch64-linux-gnu"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = runner.read_runner_outputs(tmp_path / "out", m)
    ref = runner.run_artifact(tmp_path / "art", feeds, model=model)
    for name, value in got.items():
        np.testing.assert_allclose(value, ref.outputs[name], atol=1e-4)


def test_cross_compiler_override(models, tmp_path, capsys):
    """--cross-compiler replaces the preset's compiler: a missing one is named in the error."""
    from blockprune.cli import main

    src = tmp_path / "m.onnx"
    onnx.save(models("bert-tiny", "dense"), str(src))
    rc = main(["compile", str(src), "-o", str(tmp_path / "art"), "--target", "cortex-a72", "--seq", "16",
               "--cross-compiler", "/opt/nowhere/aarch64-vendor-g++"])
    assert rc == 2 and "/opt/nowhere/aarch64-vendor-g++" in capsys.readouterr().err
    assert not (tmp_path / "art").exists()
    if shutil.which("aarch64-linux-gnu-g++"):
        res = compile_model(src, tmp_path / "art2", target="cortex-a72", batch=BATCH, seq=SEQ,
                            cross_compiler=shutil.which("aarch64-linux-gnu-g++"))
        assert runner.library_arch(res.directory / res.manifest.library) == "aarch64"


@pytest.mark.parametrize("raised", [BlockpruneError("no kernel for this block", "use 16x1"), ValueError("boom")])
def test_kernel_choice_errors_cross_the_importer_as_clear_errors(models, raised):
    """An error inside the kernel converter (a kernel chooser that refuses a layer) reaches the
    user as itself or as one BlockpruneError naming the layer, not as a frontend traceback."""
    from blockprune.backends.tvm.onnx_import.importer import import_onnx

    def chooser(spec, bsr):
        raise raised

    with pytest.raises(BlockpruneError) as err:
        import_onnx(models("bert-tiny", "bsr"), batch=BATCH, seq=SEQ, bsr_kernel=chooser)
    if isinstance(raised, BlockpruneError):
        assert err.value is raised
    else:
        assert "ValueError('boom')" in err.value.problem and "--form dense" in err.value.fix


def test_qemu_runs_use_one_tvm_thread_unless_the_user_sets_one(tmp_path, monkeypatch):
    """Spin-waiting TVM workers under emulation hang on a busy host (reproduced: a 4 s check past
    600 s beside training), so run_qemu defaults TVM_NUM_THREADS to 1 and keeps a value set."""
    seen: list[dict] = []

    class _Failed:
        returncode, stdout, stderr = 1, "", "stopped here"

    def fake_run(cmd, **kw):
        seen.append(kw["env"])
        return _Failed()

    monkeypatch.setattr(runner, "find_qemu", lambda: "/usr/bin/qemu-aarch64")
    monkeypatch.setattr(runner, "ensure_aarch64_runtime", lambda: tmp_path)
    monkeypatch.setattr(runner, "build_cpp_runner", lambda rt: tmp_path / "bp_runner")
    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    manifest = Manifest(target={"name": "cortex-a72", "arch": "aarch64"}, inputs=[], outputs=[], source={},
                        batch=1, seq=1)
    x = np.zeros((1, 4), np.float32)
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    with pytest.raises(BlockpruneError, match="stopped here"):
        runner.run_qemu(tmp_path, manifest, [x])
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    with pytest.raises(BlockpruneError):
        runner.run_qemu(tmp_path, manifest, [x])
    assert [e["TVM_NUM_THREADS"] for e in seen] == ["1", "2"]
