"""Reorder, Compact, Policy, BlockSparseRewrite and the compress workflow (issue: passes)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from blockprune.cli import main
from blockprune.compress_api import compress_model
from blockprune.errors import BlockpruneError
from blockprune.passes import PruneConfig
from blockprune.passes.block_sparse import BlockSparseRewrite, DensifyBlockSparse
from blockprune.passes.compact import Compact
from blockprune.passes.find_weights import find_weights
from blockprune.passes.policy import Policy
from blockprune.passes.reorder import Reorder
from blockprune.passes.verify import compare
from blockprune.passes.weight_edit import empty_blocks
from blockprune.prune_api import prune_model
from tests.conftest import EXPORTERS, TINY


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _set(model, name, values):
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(values.astype(np.float32)), name))
            return
    raise KeyError(name)


def _weights_by_role(model):
    return {(w.layer, w.role): w for w in find_weights(model)}


def _get_oi(model, w):
    return w.to_out_in(_inits(model)[w.initializer]).copy()


def _set_oi(model, w, oi):
    _set(model, w.initializer, w.from_out_in(oi))


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("spec", TINY)
def test_every_stage_preserves_outputs(exports, spec, exporter):
    model = onnx.load(str(exports.path(spec, exporter)))
    # 16x1 column segments on 80% kill whole FFN columns now and then: compaction has work to do
    res = compress_model(model, prune=PruneConfig(block="16x1", sparsity=0.8), form="auto")
    names = [s.name for s in res.stages]
    assert names == ["prune", "reorder", "compact", "policy", "block-sparse"]
    for st in res.stages:
        if st.max_abs_diff is not None:
            assert st.max_abs_diff <= 1e-4, st.name
    bsr = [n for n in res.model.graph.node if n.op_type == "BlockSparseMatMul"]
    forms = [r.form for r in res.stats.layers]
    assert len(forms) == 12 and all(forms)  # every layer got a decision
    assert len(bsr) == sum("bsr" in f for f in forms) >= 8 and all(n.domain == "ai.blockprune" for n in bsr)
    # the final model against the pruned one, independently of the workflow's own checks
    pruned = prune_model(model, PruneConfig(block="16x1", sparsity=0.8)).model
    assert compare(res.model, pruned, shapes=((3, 12),)).max_abs_diff <= 1e-4


def test_compress_bundled_minilm(minilm_demo):
    model = onnx.load(minilm_demo["dense_model"])
    res = compress_model(model, prune=PruneConfig(block="1x32", sparsity=0.8), form="auto")
    for st in res.stages:
        assert st.max_abs_diff is None or st.max_abs_diff <= 1e-4
    assert res.stats.compression_rate >= 5.0 - 1e-9  # compaction only ever removes more
    forms = {r.form for r in res.stats.layers}
    assert "bsr" in forms or "compact+bsr" in forms


def _planted_ffn(model, layer: int, block: int, rng) -> int:
    """Give layer's FFN a structure whose best neuron order is known; scramble it. Returns the optimum.

    8 patterns x 16 neurons; pattern k uses input segments {k, k+8} of W1 (4-wide) and output
    segments {k, (k+3)%16} of W2 (4-high). Grouped by pattern (groups of 16, a multiple of 4),
    every 4x4 block outside those segments is empty: 14 of 16 per row of blocks in each matrix.
    """
    ws = _weights_by_role(model)
    w1, w2 = ws[(layer, "ffn_in")], ws[(layer, "ffn_out")]
    a, b = _get_oi(model, w1), _get_oi(model, w2)  # [128, 64], [64, 128]
    pattern = np.repeat(np.arange(8), 16)
    m1, m2 = np.zeros_like(a, dtype=bool), np.zeros_like(b, dtype=bool)
    for j, k in enumerate(pattern):
        for seg in (k, k + 8):
            m1[j, seg * block:(seg + 1) * block] = True
        for seg in (k, (k + 3) % 16):
            m2[seg * block:(seg + 1) * block, j] = True
    optimum = 2 * (128 // block) * (16 - 2)
    perm = rng.permutation(128)
    _set_oi(model, w1, (a * m1)[perm])
    _set_oi(model, w2, (b * m2)[:, perm])
    # bias permuted too, so the scrambled model is itself a valid FFN
    return optimum


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_reorder_reaches_the_known_optimum(exports, exporter):
    model = onnx.load(str(exports.path("bert-tiny", exporter)))
    optimum = _planted_ffn(model, 0, 4, np.random.default_rng(0))
    w1 = _weights_by_role(model)[(0, "ffn_in")]
    w2 = _weights_by_role(model)[(0, "ffn_out")]
    before = empty_blocks(_get_oi(model, w1), (b := __import__("blockprune.blocks").blocks.BlockShape(4, 4))) + \
        empty_blocks(_get_oi(model, w2), b)
    out, report = Reorder("4x4", heads=False).run(model)
    after = empty_blocks(_get_oi(out, w1), b) + empty_blocks(_get_oi(out, w2), b)
    assert before < optimum
    assert after == optimum
    assert report.details["empty_blocks_after"] - report.details["empty_blocks_before"] == after - before
    assert compare(out, model).max_abs_diff <= 1e-4  # never changes outputs


def test_reorder_never_makes_things_worse(exports):
    model = prune_model(onnx.load(str(exports.path("distilbert-tiny", "legacy"))),
                        PruneConfig(block="1x16", sparsity=0.5)).model
    for blk in ("1x16", "4x4", "16x1", "32x32"):
        out, report = Reorder(blk).run(model)
        assert report.details["empty_blocks_after"] >= report.details["empty_blocks_before"]
        assert compare(out, model).max_abs_diff <= 1e-4


@pytest.mark.parametrize("spec", TINY)
def test_compact_removes_heads_and_neurons(exports, spec):
    model = onnx.load(str(exports.path(spec, "dynamo")))
    ws = _weights_by_role(model)
    d = 16
    # layer 0: head 1 dead through its output columns, head 3 through its value rows + bias
    wo = _get_oi(model, ws[(0, "attn_out")])
    wo[:, 1 * d:2 * d] = 0
    _set_oi(model, ws[(0, "attn_out")], wo)
    wv = _get_oi(model, ws[(0, "v")])
    wv[3 * d:4 * d] = 0
    _set_oi(model, ws[(0, "v")], wv)
    bias_v = next(n for n in model.graph.node if n.op_type == "Add" and any(
        i for i in n.input if i.endswith("value.bias") or i.endswith("v_lin.bias")))
    # find the value bias initializer by name
    vb_name = [i for i in bias_v.input if i in _inits(model)][0]
    vb = _inits(model)[vb_name].copy()
    vb[3 * d:4 * d] = 0
    _set(model, vb_name, vb)
    # layer 1: 40 neurons dead through ffn_out columns (two whole groups of NEURON_ALIGN=16 go, the
    # other 8 stay, zeroed), 16 through ffn_in rows (constant: folded, one whole group)
    w2 = _get_oi(model, ws[(1, "ffn_out")])
    w2[:, :40] = 0
    _set_oi(model, ws[(1, "ffn_out")], w2)
    w1 = _get_oi(model, ws[(1, "ffn_in")])
    w1[96:112] = 0
    _set_oi(model, ws[(1, "ffn_in")], w1)

    out, report = Compact().run(model)
    assert compare(out, model).max_abs_diff <= 1e-4
    removed = report.details["removed"]
    assert removed["layer 0 heads"] == {"heads_before": 4, "heads_after": 2, "removed": [1, 3]}
    assert removed["layer 1 ffn"]["neurons_after"] == 128 - 32 - 16  # a multiple of 16: no odd widths
    assert removed["layer 1 ffn"]["folded_constant_neurons"] == 16
    inits = _inits(out)
    for role in ("q", "k", "v"):
        w = ws[(0, role)]
        assert inits[w.initializer].shape == ((64, 32) if w.layout == "in_out" else (32, 64))
    assert inits[ws[(0, "attn_out")].initializer].shape in {(32, 64)}
    assert inits[vb_name].shape == (32,)
    w1n, w2n = ws[(1, "ffn_in")], ws[(1, "ffn_out")]
    assert inits[w1n.initializer].shape == (64, 80) and inits[w2n.initializer].shape == (80, 64)
    untouched = ws[(1, "q")]
    assert inits[untouched.initializer].shape == (64, 64)


def test_block_sparse_roundtrip(exports):
    model = onnx.load(str(exports.path("bert-tiny", "legacy")))
    pruned = prune_model(model, PruneConfig(block="4x4", sparsity=0.75)).model
    with_policy, _ = Policy(form="bsr").run(pruned)
    rewritten, report = BlockSparseRewrite().run(with_policy)
    assert report.changed == 12
    assert compare(rewritten, pruned).max_abs_diff == 0.0
    back, _ = DensifyBlockSparse().run(rewritten)
    a, b = _inits(pruned), _inits(back)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not any(o.domain == "ai.blockprune" for o in back.opset_import)


@pytest.mark.parametrize("block,sparsity", [("4x4", 0.75), ("1x32", 0.5)])
def test_block_sparse_file_size_follows_density(minilm_demo, tmp_path, block, sparsity):
    """On disk: within 10% of density x dense weight bytes + index bytes (the rest unchanged)."""
    model = onnx.load(minilm_demo["dense_model"])
    pruned = prune_model(model, PruneConfig(block=block, sparsity=sparsity), verify=False).model
    rewritten, report = BlockSparseRewrite(block=block, only_policy=False).run(pruned)
    assert report.changed == 36
    onnx.save(pruned, str(tmp_path / "dense.onnx"))
    onnx.save(rewritten, str(tmp_path / "bsr.onnx"))
    r, c = (int(x) for x in block.split("x"))
    weights = find_weights(pruned)
    inits = _inits(pruned)
    dense_w = sum(int(np.prod(w.shape)) * 4 for w in weights)
    nnzb = [int(np.count_nonzero(inits[w.initializer])) // (r * c) for w in weights]
    index = sum(n * 4 + (w.shape[0] // r + 1) * 4 for n, w in zip(nnzb, weights))
    expected = (1 - sparsity) * dense_w + index
    dense_size, bsr_size = (tmp_path / "dense.onnx").stat().st_size, (tmp_path / "bsr.onnx").stat().st_size
    rest = dense_size - dense_w  # embeddings, norms, biases, graph
    assert abs((bsr_size - rest) - expected) <= 0.10 * expected


def test_policy_break_even_and_reasons(exports):
    model = onnx.load(str(exports.path("bert-tiny", "legacy")))
    pruned = prune_model(model, PruneConfig.from_dict({
        "block": "1x16", "sparsity": 0.8, "layers": [{"match": "intermediate", "sparsity": 0.3}]})).model
    out, report = Policy(break_even=0.5).run(pruned)
    forms = report.details["forms"]
    ffn_in = [k for k in forms if "intermediate" in k]
    assert all(forms[k] == "dense" for k in ffn_in)
    assert all(v == "bsr" for k, v in forms.items() if k not in ffn_in)
    layers = json.loads(next(p.value for p in out.metadata_props if p.key == "blockprune.layers"))
    assert "density 0.70 > break-even 0.50" in layers[ffn_in[0]]["reason"]


def test_compress_cli_and_inspect_show_forms(capsys, exports, tmp_path):
    src = exports.path("roberta-tiny", "legacy")
    out = tmp_path / "c.onnx"
    assert main(["compress", str(src), "-o", str(out), "--block", "4x4", "--sparsity", "0.8"]) == 0
    text = capsys.readouterr().out
    assert "file size" in text and "stage reorder" in text and "rewritten to BSR" in text
    assert main(["inspect", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert len(rep["layers"]) == 12 and all(r["form"].endswith("bsr") for r in rep["layers"])
    assert all("break-even" in r["reason"] for r in rep["layers"])
    assert rep["compression_rate"] >= 5.0 - 1e-9
    assert out.stat().st_size < src.stat().st_size


def test_compress_refuses_a_model_already_rewritten(capsys, exports, tmp_path):
    src = exports.path("bert-tiny", "legacy")
    first = tmp_path / "c.onnx"
    assert main(["compress", str(src), "-o", str(first), "--block", "4x4", "--sparsity", "0.8"]) == 0
    capsys.readouterr()
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    assert main(["compress", str(first), "-o", str(out_dir / "again.onnx")]) == 2
    assert "already contains block-sparse" in capsys.readouterr().err
    with pytest.raises(BlockpruneError, match="custom op domain 'ai.blockprune'"):
        BlockSparseRewrite().run(onnx.load(str(first)))
    assert list(out_dir.iterdir()) == []


def test_ffn_pattern_not_found_is_reported_with_layer_and_reason(exports):
    model = onnx.load(str(exports.path("bert-tiny", "legacy")))
    ws = _weights_by_role(model)
    # expose layer 1's activation output as a graph output: the FFN is no longer closed
    ffn_out_node = next(n for n in model.graph.node if n.name == ws[(1, "ffn_out")].node)
    act = ffn_out_node.input[0]
    model.graph.output.append(onnx.helper.make_tensor_value_info(act, onnx.TensorProto.FLOAT, ["b", "s", 128]))
    out, report = Reorder("4x4").run(prune_model(model, PruneConfig(block="1x16", sparsity=0.5)).model)
    assert "layer 1 ffn" in report.details["skipped"]
    assert any("layer 1 ffn: left alone" in n and "outside the FFN" in n for n in report.notes)
    assert "layer 0 ffn" not in report.details["skipped"]


def test_masks_that_do_not_match_in_compress(capsys, exports, tmp_path):
    masks = tmp_path / "m.safetensors"
    assert main(["prune", str(exports.path("distilbert-tiny", "legacy")), "-o", str(tmp_path / "d.onnx"),
                 "--save-masks", str(masks)]) == 0
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    rc = main(["compress", str(exports.path("bert-tiny", "legacy")), "-o", str(out_dir / "c.onnx"), "--masks", str(masks)])
    assert rc == 2 and "do not match this model" in capsys.readouterr().err
    assert list(out_dir.iterdir()) == []


def _to_fp16(model):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT:
            with np.errstate(over="ignore"):  # the additive mask constant (-3.4e38) becomes -inf: fine
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for n in m.graph.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == onnx.TensorProto.FLOAT:
                a.i = onnx.TensorProto.FLOAT16
    for o in m.graph.output:
        o.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    del m.graph.value_info[:]
    return m


def test_fp16_weights_are_refused_clearly(exports):
    fp16 = _to_fp16(onnx.load(str(exports.path("bert-tiny", "legacy"))))
    with pytest.raises(BlockpruneError, match="float16.*float32 weights only"):
        Reorder("4x4").run(fp16)
    with pytest.raises(BlockpruneError, match="float16.*float32 weights only"):
        Compact().run(fp16)


def test_external_data_models(capsys, exports, tmp_path):
    from blockprune.onnx_io import save_onnx

    src = save_onnx(onnx.load(str(exports.path("bert-tiny", "legacy"))), tmp_path / "ext.onnx", external_data=True)
    out = tmp_path / "c.onnx"
    assert main(["compress", str(src), "-o", str(out), "--block", "4x4", "--sparsity", "0.5"]) == 0
    capsys.readouterr()
    (tmp_path / "ext.onnx.data").unlink()
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    assert main(["compress", str(src), "-o", str(out_dir / "c.onnx"), "--sparsity", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "external data" in err and "ext.onnx.data" in err and "is missing" in err
    assert list(out_dir.iterdir()) == []
