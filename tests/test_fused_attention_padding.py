"""onnxruntime's fused BERT ops, lowered to standard ops, match the fused graph on padded inputs.

Why: issue #13's GPU column failed on the ``ort-optimized`` exports with a padded mask, and the
CPU compile checks had only ever fed batch-1 inputs without padding. These tests pin down the
ONNX-level lowering (``normalize_for_tvm``) on its own, both run by onnxruntime, for every mask
form the lowering accepts: ``EmbedLayerNormalization``'s ``mask_index`` (valid lengths) feeding
``Attention``, and a raw 2-D 0/1 mask, with the default and a custom ``mask_filter_value``. They
also check that the artifact verification's sample inputs are padded at batch 1 and reach the
whole vocabulary through the fused embedding. No TVM needed (graph surgery and onnxruntime).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from blockprune.backends.tvm.onnx_import.normalize import normalize_for_tvm
from blockprune.sample_inputs import make_feeds, with_padding

ort = pytest.importorskip("onnxruntime")

HIDDEN, HEADS, VOCAB, TYPES, MAXPOS, SEQ = 16, 2, 50, 2, 32, 8
ATOL = 1e-5


def _init(rng: np.random.Generator, name: str, shape: tuple[int, ...], scale: float = 0.5) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _fused_encoder(mask_form: str, filter_value: float | None = None) -> onnx.ModelProto:
    """ids -> Cast -> EmbedLayerNormalization -> Attention, as onnxruntime's optimizer writes them.

    ``mask_form``: ``"index"`` feeds Attention the embedding's ``mask_index`` (valid lengths),
    ``"raw"`` the int32 2-D attention mask itself.
    """
    rng = np.random.default_rng(0)
    inits = [_init(rng, "word", (VOCAB, HIDDEN)), _init(rng, "pos", (MAXPOS, HIDDEN)),
             _init(rng, "seg", (TYPES, HIDDEN)), _init(rng, "gamma", (HIDDEN,)), _init(rng, "beta", (HIDDEN,)),
             _init(rng, "qkv_w", (HIDDEN, 3 * HIDDEN)), _init(rng, "qkv_b", (3 * HIDDEN,))]
    nodes = [helper.make_node("Cast", [n], [f"{n}_32"], to=TensorProto.INT32)
             for n in ("input_ids", "token_type_ids", "attention_mask")]
    nodes.append(helper.make_node(
        "EmbedLayerNormalization", ["input_ids_32", "token_type_ids_32", "word", "pos", "seg", "gamma", "beta",
                                    "attention_mask_32"], ["emb", "mask_index"], domain="com.microsoft",
        name="embed", epsilon=1e-12))
    mask = "mask_index" if mask_form == "index" else "attention_mask_32"
    attrs = {"num_heads": HEADS} | ({"mask_filter_value": filter_value} if filter_value is not None else {})
    nodes.append(helper.make_node("Attention", ["emb", "qkv_w", "qkv_b", mask], ["ctx"], domain="com.microsoft",
                                  name="attention", **attrs))
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
              for n in ("input_ids", "token_type_ids", "attention_mask")]
    output = helper.make_tensor_value_info("ctx", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "fused", inputs, [output], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def _padded_feeds(batch: int) -> dict[str, np.ndarray]:
    """Vocabulary-wide ids, both token types, and rows padded at different lengths (one unpadded)."""
    rng = np.random.default_rng(1)
    mask = np.ones((batch, SEQ), np.int64)
    for b, valid in enumerate([SEQ - 3, 2, SEQ, 1][:batch]):
        mask[b, valid:] = 0
    return {"input_ids": rng.integers(0, VOCAB, (batch, SEQ)), "token_type_ids": rng.integers(0, TYPES, (batch, SEQ)),
            "attention_mask": mask}


@pytest.mark.parametrize("mask_form,filter_value", [("index", None), ("raw", None), ("index", -1000.0),
                                                     ("raw", -1000.0)])
@pytest.mark.parametrize("batch", [1, 4])
def test_lowered_attention_matches_fused_on_padded_rows(mask_form, filter_value, batch):
    fused = _fused_encoder(mask_form, filter_value)
    lowered = normalize_for_tvm(fused, batch, SEQ)
    assert not any(n.domain == "com.microsoft" for n in lowered.graph.node)
    feeds = _padded_feeds(batch)
    want, got = _run(fused, feeds), _run(lowered, feeds)
    assert got.shape == want.shape == (batch, SEQ, HIDDEN)
    assert np.abs(got - want).max() <= ATOL, np.abs(got - want).max(axis=(1, 2))


def test_padding_changes_the_fused_output():
    """The cases above really exercise masking: with padding the fused graph's output moves."""
    fused = _fused_encoder("index")
    feeds = _padded_feeds(4)
    unpadded = {**feeds, "attention_mask": np.ones_like(feeds["attention_mask"])}
    assert np.abs(_run(fused, feeds) - _run(fused, unpadded))[0].max() > 1e-3


def test_sample_feeds_are_padded_at_batch_1_and_vocabulary_wide_through_the_fused_embedding():
    fused = _fused_encoder("index")
    feeds = with_padding(make_feeds(fused, 1, SEQ, seed=0))
    mask = feeds["attention_mask"]
    assert mask[0, 0] == 1 and 1 <= (mask == 0).sum() < SEQ
    assert feeds["input_ids"].max() >= 2 and feeds["input_ids"].max() < VOCAB  # not only {0, 1}
    assert feeds["token_type_ids"].max() < TYPES
    already = make_feeds(fused, 2, SEQ, seed=0)  # row 1 is padded already: left as it is
    assert np.array_equal(with_padding(already)["attention_mask"], already["attention_mask"])
