"""Export + PyTorch check for every architecture, both exporters; metadata; TVM import."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from blockprune.models.export import torch_reference
from blockprune.onnx_io import get_meta, load_onnx
from blockprune.sample_inputs import make_feeds
from tests.conftest import EXPORTERS, TINY


def _ort(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("spec", TINY)
def test_export_matches_pytorch(exports, spec, exporter):
    path, res, loaded = exports(spec, exporter)
    assert path.is_file()
    # the exporter's own check ran on two shapes and passed the 1e-4 bar
    assert set(res.max_abs_diff) == {"2x16", "3x9"}
    assert max(res.max_abs_diff.values()) < 1e-4
    model = load_onnx(path)
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} >= {17} or \
        min(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    # dynamic batch and sequence: a third shape never seen by the exporter, padded rows included
    feeds = make_feeds(model, batch=4, seq=23, seed=7)
    assert (feeds["attention_mask"] == 0).any()
    got = _ort(path).run(None, feeds)[0]
    ref = torch_reference(loaded, feeds)
    assert got.shape == ref.shape == (4, 23, loaded.hidden_size)
    assert np.max(np.abs(got - ref)) < 1e-4


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_classification_head_exports_logits(exports, exporter):
    path, res, loaded = exports("bert-tiny", exporter, head="classification")
    model = load_onnx(path)
    feeds = make_feeds(model, batch=3, seq=11, seed=1)
    got = _ort(path).run(None, feeds)[0]
    assert got.shape == (3, 2)
    assert np.max(np.abs(got - torch_reference(loaded, feeds))) < 1e-4


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("spec", TINY)
def test_initializers_named_after_hf_parameters(exports, spec, exporter):
    path, _, loaded = exports(spec, exporter)
    model = onnx.load(str(path))
    params = {n: p.detach().numpy() for n, p in loaded.model.named_parameters()}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    pmap = get_meta(model, "param_map")
    linear = [n for n in params if loaded.arch.role_of(n)]
    used_linear = [n for n in linear if not n.startswith("pooler.")]  # the bare encoder never uses the pooler
    assert used_linear and all(n in pmap for n in used_linear)
    for name, entry in pmap.items():
        assert entry["hf"] == name and name in inits
        stored = inits[name]
        expect = params[name].T if entry["layout"] == "in_out" else params[name]
        np.testing.assert_array_equal(stored, expect)
    assert get_meta(model, "architecture") == loaded.arch.name
    assert get_meta(model, "config")["num_layers"] == 2


def test_both_exporters_give_same_weight_names(exports):
    a = get_meta(onnx.load(str(exports.path("roberta-tiny", "dynamo"))), "param_map")
    b = get_meta(onnx.load(str(exports.path("roberta-tiny", "legacy"))), "param_map")
    two_d = lambda m: {k for k, v in m.items() if v["layout"] != "same"}  # noqa: E731
    assert two_d(a) == two_d(b) and len(two_d(a)) == 12 + 3  # 12 encoder Linears + 3 embedding tables


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("spec", TINY)
def test_export_imports_into_tvm(exports, spec, exporter):
    from tvm.relax.frontend.onnx import from_onnx

    model = onnx.load(str(exports.path(spec, exporter)))
    inputs = [i.name for i in model.graph.input]
    mod = from_onnx(model, shape_dict={n: [2, 16] for n in inputs}, dtype_dict={n: "int64" for n in inputs},
                    keep_params_in_input=False)
    assert "main" in [gv.name_hint for gv in mod.functions]


def test_legacy_export_is_constant_folded(exports):
    model = onnx.load(str(exports.path("bert-tiny", "legacy")))
    ops = {n.op_type for n in model.graph.node}
    assert "ConstantOfShape" not in ops and "Constant" not in ops


def test_external_data_when_forced(exports, tmp_path):
    from blockprune.onnx_io import save_onnx

    model = onnx.load(str(exports.path("bert-tiny", "legacy")))
    out = save_onnx(model, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").is_file()
    assert out.stat().st_size < (tmp_path / "m.onnx.data").stat().st_size
    again = load_onnx(out)
    assert len(again.graph.initializer) == len(model.graph.initializer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_regression_head(tmp_path):
    from blockprune.models.export import export_onnx
    from blockprune.models.zoo import load_model

    loaded = load_model("roberta-tiny", head="regression")
    res = export_onnx(loaded, tmp_path / "r.onnx", exporter="legacy")
    feeds = make_feeds(res.model, batch=2, seq=10, seed=3)
    got = _ort(res.path).run(None, feeds)[0]
    assert got.shape == (2, 1)
    assert np.max(np.abs(got - torch_reference(loaded, feeds))) < 1e-4
    assert get_meta(res.model, "head") == "regression"
