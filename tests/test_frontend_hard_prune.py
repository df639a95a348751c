"""Hard pruning: exact per-layer ratio (the paper's rule), global ratio, threshold, selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from blockprune import blocks as nb
from blockprune.blocks import BlockShape
from blockprune.errors import BlockpruneError
from blockprune.frontends.grouping import is_block_aligned
from blockprune.frontends.hard_prune import (
    HardPruneConfig,
    LayerSelection,
    hard_prune,
    masks_numpy,
    overall_sparsity,
    select_layers,
)


def _params(seed=0, scales=(1.0, 1.0, 1.0)):
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.0.query.weight": torch.randn(8, 16, generator=g) * scales[0],
        "enc.0.ffn.weight": torch.randn(12, 8, generator=g) * scales[1],
        "classifier.weight": torch.randn(2, 16, generator=g) * scales[2],
    }


LAYERS = {"enc.0.query.weight": "1x4", "enc.0.ffn.weight": "2x2", "classifier.weight": "1x4"}


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_layer_mode_exact_ratio_and_weakest_blocks(sparsity):
    params = _params()
    res = hard_prune(params, LAYERS, HardPruneConfig(mode="layer", sparsity=sparsity))
    assert list(res) == list(LAYERS)
    for name, lm in res.items():
        b = BlockShape.parse(LAYERS[name])
        w = params[name].double().numpy()
        scores = nb.block_scores(w, b)
        n_blocks = scores.size
        # exact count per layer: these blocks divide their matrices and sparsity * n_blocks is whole
        assert sparsity * n_blocks == int(sparsity * n_blocks)
        assert lm.blocks_pruned == int(sparsity * n_blocks)
        assert lm.sparsity == pytest.approx(sparsity)
        # percentile rule: every pruned block scores no more than every kept block
        pruned = ~lm.keep.numpy()
        assert scores[pruned].max() <= scores[~pruned].min()
        # element mask is the block keep matrix expanded, and matches the numpy path exactly
        assert is_block_aligned(lm.mask, b)
        np.testing.assert_array_equal(lm.mask.numpy(), nb.expand_block_mask(lm.keep.numpy(), b, w.shape) != 0)
        np.testing.assert_array_equal(pruned, nb.choose_pruned(scores, nb.block_sizes(w.shape, b), sparsity))


def test_layer_mode_is_per_layer_even_when_scales_differ():
    # One layer 100x smaller: a global rule would strip it, the per-layer rule must not.
    params = _params(scales=(0.01, 1.0, 1.0))
    res = hard_prune(params, LAYERS, HardPruneConfig(mode="layer", sparsity=0.5))
    assert res["enc.0.query.weight"].sparsity == pytest.approx(0.5)
    glob = hard_prune(params, LAYERS, HardPruneConfig(mode="global", sparsity=0.5))
    # 128 of the 256 elements are the tiny layer's: the global rule takes (nearly) all of them
    assert glob["enc.0.query.weight"].sparsity > 0.9


def test_layer_mode_edge_blocks_follow_choose_pruned():
    w = torch.randn(7, 10, generator=torch.Generator().manual_seed(4))
    b = BlockShape(3, 4)  # partial blocks on both edges
    lm = hard_prune({"w": w}, {"w": b}, HardPruneConfig(sparsity=0.4))["w"]
    wn = w.double().numpy()
    expected = nb.choose_pruned(nb.block_scores(wn, b), nb.block_sizes(wn.shape, b), 0.4)
    np.testing.assert_array_equal(~lm.keep.numpy(), expected)
    # pruned element count is the closest to round(0.4 * 70) = 28 that pruning weakest-first allows
    scores, sizes = nb.block_scores(wn, b).ravel(), nb.block_sizes(wn.shape, b).ravel()
    prefix = np.concatenate([[0], np.cumsum(sizes[np.argsort(scores, kind="stable")])])
    assert abs(int((~lm.mask).sum()) - 28) == np.abs(prefix - 28).min()
    assert int((~lm.mask).sum()) in prefix


def test_global_mode_ratio_over_all_layers():
    params = _params(scales=(0.1, 1.0, 3.0))
    res = hard_prune(params, LAYERS, HardPruneConfig(mode="global", sparsity=0.5))
    assert overall_sparsity(res) == pytest.approx(0.5)
    # all blocks of all layers ranked together: the global score cut separates pruned and kept
    all_pruned, all_kept = [], []
    for name, lm in res.items():
        s = nb.block_scores(params[name].double().numpy(), BlockShape.parse(LAYERS[name]))
        all_pruned.append(s[~lm.keep.numpy()])
        all_kept.append(s[lm.keep.numpy()])
    assert np.concatenate(all_pruned).max() <= np.concatenate(all_kept).min()
    # the small-scale layer gives more than the large one
    assert res["enc.0.query.weight"].sparsity > res["classifier.weight"].sparsity


def test_threshold_mode():
    params = _params()
    thr = 2.0
    res = hard_prune(params, LAYERS, HardPruneConfig(mode="threshold", threshold=thr))
    for name, lm in res.items():
        s = nb.block_scores(params[name].double().numpy(), BlockShape.parse(LAYERS[name]))
        np.testing.assert_array_equal(lm.keep.numpy(), s >= thr)
    none = hard_prune(params, LAYERS, HardPruneConfig(mode="threshold", threshold=0.0))
    assert overall_sparsity(none) == 0.0


def test_hard_prune_does_not_touch_weights_and_exports_uint8():
    model = nn.Linear(16, 8)
    before = model.weight.detach().clone()
    res = hard_prune(model, {"weight": "1x4"}, HardPruneConfig(sparsity=0.5))
    assert torch.equal(model.weight, before)
    m = masks_numpy(res)["weight"]
    assert m.dtype == np.uint8 and m.shape == (8, 16) and m.mean() == 0.5


HF_NAMES = {
    "bert.embeddings.word_embeddings.weight": (100, 16),
    "bert.embeddings.position_embeddings.weight": (32, 16),
    "bert.embeddings.LayerNorm.weight": (16,),
    "bert.encoder.layer.0.attention.self.query.weight": (16, 16),
    "bert.encoder.layer.0.attention.self.query.bias": (16,),
    "bert.encoder.layer.0.intermediate.dense.weight": (64, 16),
    "bert.encoder.layer.0.output.dense.weight": (16, 64),
    "bert.pooler.dense.weight": (16, 16),
    "classifier.weight": (2, 16),
    "roberta.embeddings.word_embeddings.weight": (100, 16),
    "roberta.encoder.layer.0.attention.output.dense.weight": (16, 16),
    "distilbert.embeddings.word_embeddings.weight": (100, 16),
    "distilbert.transformer.layer.0.attention.q_lin.weight": (16, 16),
    "pre_classifier.weight": (16, 16),
}


def test_default_selection_excludes_embeddings_and_non_matrices():
    params = {n: torch.zeros(s) for n, s in HF_NAMES.items()}
    sel = select_layers(params, LayerSelection(block="1x4"))
    assert set(sel) == {
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.0.intermediate.dense.weight",
        "bert.encoder.layer.0.output.dense.weight",
        "bert.pooler.dense.weight",
        "classifier.weight",
        "roberta.encoder.layer.0.attention.output.dense.weight",
        "distilbert.transformer.layer.0.attention.q_lin.weight",
        "pre_classifier.weight",
    }
    assert all(b == BlockShape(1, 4) for b in sel.values())


def test_selection_overrides_and_unfit_blocks():
    params = {n: torch.zeros(s) for n, s in HF_NAMES.items()}
    sel = LayerSelection(
        include=[r"encoder\.layer\.\d+\."],
        block="4x1",
        block_overrides=[(r"intermediate", "1x8"), (r"dense", "2x2")],
    )
    got = select_layers(params, sel)
    assert got["bert.encoder.layer.0.intermediate.dense.weight"] == BlockShape(1, 8)  # first match wins
    assert got["bert.encoder.layer.0.output.dense.weight"] == BlockShape(2, 2)
    assert got["bert.encoder.layer.0.attention.self.query.weight"] == BlockShape(4, 1)
    assert "bert.pooler.dense.weight" not in got
    # a 4x1 block cannot tile the 2-row classifier: error by default, skipped on request
    with pytest.raises(BlockpruneError, match="classifier.weight"):
        select_layers(params, LayerSelection(block="4x1"))
    assert "classifier.weight" not in select_layers(params, LayerSelection(block="4x1", skip_unfit=True))


def test_config_and_selection_errors():
    with pytest.raises(BlockpruneError, match="unknown"):
        HardPruneConfig(mode="random")
    with pytest.raises(BlockpruneError, match="outside"):
        HardPruneConfig(sparsity=1.0)
    with pytest.raises(BlockpruneError, match="threshold"):
        HardPruneConfig(mode="threshold")
    with pytest.raises(BlockpruneError, match="no 2-D weight"):
        select_layers({"a.bias": torch.zeros(3)})
    with pytest.raises(BlockpruneError, match="does not compile"):
        LayerSelection(include=["["])
    with pytest.raises(BlockpruneError, match="no parameter named"):
        hard_prune(_params(), {"nope.weight": "1x4"})
