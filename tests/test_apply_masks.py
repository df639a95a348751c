"""ApplyMasks: round trip through a masks file, across exporters, and refusal of foreign masks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from blockprune.errors import BlockpruneError
from blockprune.masks import load_masks, save_masks
from blockprune.passes import PruneConfig
from blockprune.prune_api import prune_model


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_roundtrip_through_masks_file(exports, tmp_path):
    model = onnx.load(str(exports.path("bert-tiny", "legacy", head="classification")))
    first = prune_model(model, PruneConfig(block="2x4", sparsity=0.7, include_heads=True))
    save_masks(tmp_path / "m.safetensors", first.masks)
    loaded = load_masks(tmp_path / "m.safetensors")
    assert loaded.source == "one-shot-l2" and set(loaded.masks) == set(first.masks.masks)
    assert {i.block for i in loaded.layers.values()} == {"2x4"} and len(loaded.masks) == 14
    again = prune_model(model, masks=loaded)
    a, b = _inits(first.model), _inits(again.model)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])  # bit-exact
    assert again.verify.max_abs_diff == 0.0


def test_masks_move_between_exporters(exports):
    """Masks made on the dynamo export apply to the legacy export: names are HF names in both."""
    dyn = onnx.load(str(exports.path("roberta-tiny", "dynamo")))
    leg = onnx.load(str(exports.path("roberta-tiny", "legacy")))
    from_dyn = prune_model(dyn, PruneConfig(block="1x16", sparsity=0.5))
    on_leg = prune_model(leg, masks=from_dyn.masks)
    a, b = _inits(from_dyn.model), _inits(on_leg.model)
    for name in from_dyn.masks.masks:
        np.testing.assert_array_equal(a[name], b[name])


def test_mask_for_a_different_model_lists_mismatches(exports):
    bert = onnx.load(str(exports.path("bert-tiny", "legacy")))
    distil = onnx.load(str(exports.path("distilbert-tiny", "legacy")))
    masks = prune_model(bert, PruneConfig(block="1x16", sparsity=0.5)).masks
    with pytest.raises(BlockpruneError) as exc:
        prune_model(distil, masks=masks)
    msg = str(exc.value)
    assert "12 mask name(s) are not prunable weights" in msg and "encoder.layer.0" in msg


def test_mask_with_wrong_shape_is_refused(exports):
    model = onnx.load(str(exports.path("bert-tiny", "legacy")))
    masks = prune_model(model, PruneConfig(block="1x16", sparsity=0.5)).masks
    name = "encoder.layer.1.intermediate.dense.weight"
    masks.masks[name] = masks.masks[name][:, :32]
    with pytest.raises(BlockpruneError, match=r"1 shape mismatch.*intermediate\.dense"):
        prune_model(model, masks=masks)


def test_masks_file_keeps_transposed_views_intact(tmp_path):
    from blockprune.masks import MaskSet

    rng = np.random.default_rng(0)
    m = (rng.random((8, 5)) > 0.5).astype(np.float32)
    save_masks(tmp_path / "t.safetensors", MaskSet({"w": m.T}))  # a non-contiguous view
    np.testing.assert_array_equal(load_masks(tmp_path / "t.safetensors").masks["w"], m.T.astype(np.uint8))
