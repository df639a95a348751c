"""int8 models from ``compress --quantize int8`` compile to our int8 kernels and match the contract.

Dense layers (onnxruntime's DynamicQuantizeLinear/MatMulInteger pattern) and block-sparse ones
(``BlockSparseMatMulInt8``) both become int8 kernel calls with the bias/GELU/residual fused; the
compiled model must equal onnxruntime on the exact-integer reference to float32 rounding (the
compile's own verification), while onnxruntime's saturating AVX2 kernel differs visibly.
"""

from __future__ import annotations

import onnx
import pytest

tvm = pytest.importorskip("tvm")

from blockprune.errors import BlockpruneError  # noqa: E402


@pytest.fixture(scope="module")
def tiny(exports):
    return exports.path("bert-tiny", "legacy", "encoder")


@pytest.mark.parametrize("extra,form", [({}, "dense-int8"), ({"sparsity": 0.8, "block": "16x4"}, "bsr-int8"),
                                        ({"sparsity": 0.8, "block": "16x1", "form": "bsr"}, "dense-int8")])
def test_int8_model_compiles_to_int8_kernels_and_matches_the_exact_reference(tiny, tmp_path, extra, form):
    import blockprune as bp
    from blockprune.backends.tvm.pipeline.compile import compile_model
    from blockprune.backends.tvm.runtime.runner import compare_with_onnx, run_artifact
    from blockprune.passes.int8_reference import exact_int8_model

    small = tmp_path / "q.onnx"
    bp.compress(tiny, small, quantize="int8", **extra)
    res = compile_model(small, tmp_path / "art", batch=1, seq=16)  # verifies against the exact reference
    assert res.manifest.verified and max(res.manifest.verified["max_abs_diff"].values()) < 1e-4
    forms = {layer["form"] for layer in res.manifest.layers}
    assert forms == {form}, forms
    epilogues = {layer["epilogue"] for layer in res.manifest.layers}
    assert {"bias", "bias+gelu", "bias+residual"} <= epilogues, epilogues
    text = res.imported.mod.script()
    assert "MatMulInteger" not in text and "int8_quantize" in text
    # q, k, v read the same activation: one quantizer call serves the three (2 layers x 4 calls)
    calls = text.count("call_tir(cls.int8_quantize")
    assert calls == 4 * 2, calls
    assert len(res.manifest.layers) == 6 * 2
    model = onnx.load(str(small))
    out = run_artifact(tmp_path / "art")
    exact = max(compare_with_onnx(out, exact_int8_model(model)).values())
    assert exact < 1e-4
    assert max(compare_with_onnx(out, model).values()) >= exact  # the saturating run is never closer


def test_int8_model_is_refused_by_name_on_gpu_targets(tiny, tmp_path):
    import blockprune as bp
    from blockprune.backends.tvm.pipeline.gpu_compile import compile_gpu_model

    small = tmp_path / "q.onnx"
    bp.compress(tiny, small, quantize="int8", sparsity=0.8, block="16x4", form="bsr")
    with pytest.raises(BlockpruneError, match="int8") as err:
        compile_gpu_model(small, tmp_path / "gpu", target="mali", batch=1, seq=16)
    assert "without --quantize" in err.value.fix
    assert not (tmp_path / "gpu").exists()


def test_int8_verification_fails_an_artifact_that_computes_something_else(tiny, tmp_path):
    """The quantization-aware bounds still catch a wrong layer: one FFN layer's scales negated in the
    reference (as a kernel with a sign or layout bug would compute) fails verification."""
    import blockprune as bp
    from onnx import numpy_helper

    from blockprune.backends.tvm.pipeline.compile import compile_model
    from blockprune.backends.tvm.verify.artifact_check import verify_artifact

    small = tmp_path / "q.onnx"
    bp.compress(tiny, small, quantize="int8")
    compile_model(small, tmp_path / "art", batch=1, seq=16, verify=False)
    model = onnx.load(str(small))
    check = verify_artifact(tmp_path / "art", model)
    assert check.int8 and all(v["rel_l2"] < 1e-4 for v in check.int8.values())
    scale = next(t for t in model.graph.initializer if "intermediate" in t.name and "w_scale" in t.name)
    scale.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(scale), scale.name))
    with pytest.raises(BlockpruneError, match="exact-integer int8 reference"):
        verify_artifact(tmp_path / "art", model)
