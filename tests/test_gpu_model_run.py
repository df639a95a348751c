"""Whole Mali build on PoCL, call by call in the VM's order, against onnxruntime (issue #13).

roberta-tiny (same pruning) must pass too: its position ids are ``cumsum`` over the mask, which
TVM's GPU scan computed wrongly (tests/test_gpu_cumsum.py covers the kernel itself).

bert-tiny pruned 16x1 at 80% (seq 16, batch 1): the run must match onnxruntime within
``1e-5 + 1e-4 * max|output|`` on vocabulary-wide token ids with a padded mask, and must fail when
one kernel's result is off (by 1.0 in a BSR output, by 4e31 in the additive mask) or a weight
differs. Skipped only where no OpenCL platform can be had.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from blockprune.errors import BlockpruneError

tvm = pytest.importorskip("tvm")

from blockprune.backends.tvm.verify import gpu_model_run as gm  # noqa: E402
from blockprune.backends.tvm.verify import gpu_verify as gv  # noqa: E402
from blockprune.backends.tvm.verify import opencl_verify as ov  # noqa: E402

SEQ = 16
_REASON = ov.opencl_unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"no OpenCL platform: {_REASON}")


@pytest.fixture(scope="module")
def bsr_model(exports, tmp_path_factory) -> tuple[onnx.ModelProto, str]:
    from blockprune.compress_api import compress_model
    from blockprune.passes import PruneConfig

    dense = exports("bert-tiny", "legacy", "encoder")[1].model
    model = compress_model(dense, prune=PruneConfig(block="16x1", sparsity=0.8), form="auto", verify=False).model
    path = tmp_path_factory.mktemp("gpu-e2e") / "bert-tiny-16x1.onnx"
    onnx.save(model, str(path))
    return model, str(path)


@pytest.fixture(scope="module")
def mods(bsr_model):
    return gv.gpu_modules(bsr_model[0], "mali", 1, SEQ, gpu_break_even=1.0)  # every BSR layer stays BSR


def test_whole_build_matches_onnxruntime(mods, bsr_model):
    report = gm.verify_model_run(mods, bsr_model[0])
    assert report.ok, report.table()
    out = report.outputs[0]
    assert out.shape == (1, SEQ, 64) and out.rel_diff < 1e-5, report.table()
    funcs = [c.func for c in report.calls]
    assert any(f.startswith(gv.GPU_PREFIX) for f in funcs) and len(funcs) > 20
    assert report.host_ops > 0  # storage, views: the VM's own work ran too
    assert report.first_departure() is None
    assert "padded" in report.feeds and "input_ids in [" in report.feeds


def test_feeds_are_realistic_and_padded(bsr_model):
    feeds = gm.model_feeds(bsr_model[0], 1, SEQ, seed=0)
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    assert ids.max() > 1 and len(np.unique(ids)) > 4  # vocabulary-wide, not only 0/1
    assert mask[0, 0] == 1 and (mask == 0).sum() >= 1  # padding even at batch 1


def test_a_wrong_kernel_output_fails_and_is_located(mods, bsr_model):
    target = {}

    def corrupt(index, func, buffers):
        if func.startswith(gv.GPU_PREFIX) and not target:
            target["index"] = index
            buffers["Y"].flat[3] += 1.0

    report = gm.verify_model_run(mods, bsr_model[0], corrupt=corrupt)
    assert not report.ok
    assert report.first_departure().index == target["index"]
    with pytest.raises(BlockpruneError, match=r"differs from onnxruntime .*first call departing .*bsr_matmul_gpu"):
        report.check()


def test_a_mask_kernel_off_by_4e31_fails(mods, bsr_model):
    """The additive mask holds -3.4e38: a tolerance scaled by it let 4e31 pass; per output it cannot."""
    def corrupt(index, func, buffers):
        for arr in buffers.values():
            if arr.dtype == np.float32 and arr.ndim == 4 and arr.min() < -1e38:
                arr.flat[0] += 4e31  # an attended position (0 -> 4e31)

    report = gm.verify_model_run(mods, bsr_model[0], corrupt=corrupt)
    assert not report.ok and report.max_abs_diff > 1e-2, report.table()


def test_a_wrong_weight_fails(mods, bsr_model):
    model = onnx.ModelProto.FromString(bsr_model[0].SerializeToString())
    node = next(n for n in model.graph.node if n.op_type == "BlockSparseMatMul")
    init = next(t for t in model.graph.initializer if t.name == node.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(0.05), init.name))
    report = gm.verify_model_run(mods, model, trace=False)  # the build has the old weights
    assert not report.ok
    with pytest.raises(BlockpruneError, match="differs from onnxruntime"):
        report.check()


def test_inputs_of_the_wrong_shape_are_refused(mods, bsr_model):
    feeds = gm.model_feeds(bsr_model[0], 1, SEQ + 1)
    with pytest.raises(BlockpruneError, match=r"has shape \[1, 17\], the build takes \[1, 16\]"):
        gm.run_main_on_pocl(mods, feeds, trace=False)


@pytest.fixture(scope="module")
def roberta_mods(exports) -> tuple[gv.GPUModules, onnx.ModelProto]:
    """roberta-tiny pruned 16x1 at 80%, BSR kept: position ids come from cumsum over the mask."""
    from blockprune.compress_api import compress_model
    from blockprune.passes import PruneConfig

    dense = exports("roberta-tiny", "legacy", "encoder")[1].model
    model = compress_model(dense, prune=PruneConfig(block="16x1", sparsity=0.8), form="auto", verify=False).model
    return gv.gpu_modules(model, "mali", 1, SEQ, gpu_break_even=1.0), model


def test_roberta_whole_build_matches_onnxruntime(roberta_mods):
    """TVM's GPU scan raced here (max-abs 2.77); the row-scan kernel gives exact position ids."""
    from blockprune.backends.tvm.kernels.cumsum_gpu import KERNEL_NAME

    mods, model = roberta_mods
    report = gm.verify_model_run(mods, model)
    assert report.ok, report.table()
    assert report.outputs[0].rel_diff < 1e-5 and report.first_departure() is None, report.table()
    scans = [c for c in report.calls if "cumsum" in c.func]
    assert [c.func for c in scans] == [KERNEL_NAME] and scans[0].max_abs_diff == 0.0
    assert "padded" in report.feeds


def test_roberta_every_kernel_matches_its_cpu_build(roberta_mods):
    """Includes the one-row token-type gather: random indices must stay in its bounds."""
    rows = gv.verify_modules(roberta_mods[0])
    assert rows and all(r.ok for r in rows), gv.format_rows([r for r in rows if not r.ok])
    assert any("cumsum" in r.func for r in rows)
    gathers = [f for n, f in roberta_mods[0].gpu.functions.items() if 1 in gv.gather_bounds(f).values()]
    assert gathers  # the single-row table is there and was bounded


def test_cli_verify_runs_the_whole_model(bsr_model, capsys):
    from blockprune.backends.tvm.cli import add_backend_parsers
    from blockprune.backends.tvm.gpu_cli import add_gpu_parsers

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_backend_parsers(sub)
    add_gpu_parsers(sub)
    args = parser.parse_args(["verify", bsr_model[1], "--target", "mali", "--seq", str(SEQ)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| last_hidden_state | [1, 16, 64] |" in printed and "| NO |" not in printed
    assert "whole model on PoCL (mali" in printed
