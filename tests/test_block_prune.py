"""BlockPrune: exact densities per block mode, the right blocks, per-layer config, global ranking."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from blockprune.blocks import BlockShape, block_scores, block_sizes, choose_pruned, expand_block_mask, is_block_aligned
from blockprune.onnx_io import get_meta
from blockprune.passes import PruneConfig
from blockprune.passes.find_weights import find_weights
from blockprune.passes.layer_stats import model_stats
from blockprune.prune_api import prune_model


def _weights_out_in(model):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {w.initializer: (w, w.to_out_in(inits[w.initializer])) for w in find_weights(model)}


@pytest.mark.parametrize("block", ["1x32", "16x1", "4x4", "32x32", "1x1"])
@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_density_exact_per_layer_and_blocks_aligned(exports, block, sparsity):
    model = onnx.load(str(exports.path("bert-tiny", "legacy")))
    res = prune_model(model, PruneConfig(block=block, sparsity=sparsity))
    b = BlockShape.parse(block)
    for name, (w, values) in _weights_out_in(res.model).items():
        assert np.count_nonzero(values) == values.size * (1 - sparsity), name  # exact: blocks divide 64/128
        assert is_block_aligned(values != 0, b)
    assert res.stats.compression_rate == pytest.approx(1 / (1 - sparsity))
    assert res.verify is not None and res.verify.max_abs_diff <= 1e-4


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("spec", ["bert-tiny", "roberta-tiny", "distilbert-tiny"])
def test_prunes_the_weakest_blocks_of_the_pytorch_weight(exports, spec, exporter):
    """The surviving blocks are exactly those numpy picks from the PyTorch W[out, in]: layout is right."""
    path, _, loaded = exports(spec, exporter)
    res = prune_model(onnx.load(str(path)), PruneConfig(block="1x16", sparsity=0.5))
    params = {n: p.detach().numpy() for n, p in loaded.model.named_parameters()}
    b = BlockShape(1, 16)
    pruned = _weights_out_in(res.model)
    assert len(pruned) == 12
    for name, (w, values) in pruned.items():
        torch_w = params[w.hf_name]
        keep = ~choose_pruned(block_scores(torch_w, b), block_sizes(torch_w.shape, b), 0.5)
        np.testing.assert_array_equal(values, torch_w * expand_block_mask(keep, b, torch_w.shape))


def test_edge_blocks_follow_the_documented_rule(exports):
    model = onnx.load(str(exports.path("bert-tiny", "legacy")))
    b = BlockShape(3, 5)  # divides neither 64 nor 128
    res = prune_model(model, PruneConfig(block="3x5", sparsity=0.5))
    for name, (w, values) in _weights_out_in(res.model).items():
        assert is_block_aligned(values != 0, b)
        assert abs(1 - np.count_nonzero(values) / values.size - 0.5) < 15 / values.size  # within one block
    layers = get_meta(res.model, "layers")
    assert {v["block"] for v in layers.values()} == {"3x5"}


def test_config_rules_and_heads(exports, tmp_path):
    model = onnx.load(str(exports.path("bert-tiny", "legacy", head="classification")))
    cfg_file = tmp_path / "layers.yaml"
    cfg_file.write_text(
        "block: 1x16\nsparsity: 0.5\ninclude_heads: true\nlayers:\n"
        "  - match: 'attention\\.self\\.(query|key)'\n    block: 4x4\n    sparsity: 0.75\n"
        "  - match: 'classifier'\n    sparsity: 0.0\n"
        "  - match: 'pooler'\n    block: 8x8\n")
    res = prune_model(model, PruneConfig.from_yaml(cfg_file))
    by_name = {r.name: r for r in res.stats.layers}
    q = by_name["bert.encoder.layer.0.attention.self.query.weight"]
    assert (q.block, q.density) == ("4x4", 0.25)
    v = by_name["bert.encoder.layer.1.attention.self.value.weight"]
    assert (v.block, v.density) == ("1x16", 0.5)
    assert by_name["classifier.weight"].density == 1.0 and by_name["classifier.weight"].block is None
    assert (by_name["bert.pooler.dense.weight"].block, by_name["bert.pooler.dense.weight"].density) == ("8x8", 0.5)


def test_heads_left_dense_by_default(exports):
    model = onnx.load(str(exports.path("bert-tiny", "legacy", head="classification")))
    res = prune_model(model, PruneConfig(block="16x1", sparsity=0.5))  # 16x1 would not fit the 2-row classifier
    dens = {r.name: r.density for r in res.stats.layers}
    assert dens["classifier.weight"] == 1.0 and dens["bert.pooler.dense.weight"] == 1.0
    assert sum(d == 0.5 for d in dens.values()) == 12


def test_global_ranking_prunes_the_globally_weakest_blocks(exports):
    model = onnx.load(str(exports.path("distilbert-tiny", "legacy")))
    b = BlockShape(1, 16)
    res = prune_model(model, PruneConfig(block="1x16", sparsity=0.6, global_ranking=True))
    assert res.stats.density == pytest.approx(0.4, abs=16 / res.stats.total)
    assert len({round(r.density, 4) for r in res.stats.layers}) > 1  # layers differ: the ranking is global
    before, after = _weights_out_in(model), _weights_out_in(res.model)
    pruned_scores, kept_scores = [], []
    for name, (w, values) in before.items():
        scores = block_scores(values, b)
        kept = block_scores(after[name][1], b) > 0
        pruned_scores.append(scores[~kept])
        kept_scores.append(scores[kept])
    assert np.concatenate(pruned_scores).max() <= np.concatenate(kept_scores).min()
