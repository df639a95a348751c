"""Teacher-only perturbed copies (``frontends/augment.py``): the copies themselves, the per-row
loss that mixes them with labelled rows, and a recipe run whose distilled stages train on them
while the dense stage does not."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blockprune.errors import BlockpruneError
from blockprune.frontends.augment import PerturbConfig, perturb_text, perturbed_copies, Vocabulary
from blockprune.frontends.distill import DistillConfig, distillation_loss, row_distillation_loss
from blockprune.frontends.glue import GlueExample, get_task
from blockprune.frontends.recipe import run_recipe

from test_frontend_recipe import RTE, small_config, tiny_model  # noqa: F401  (fixture)


def _examples(pair: bool, n: int = 20) -> list[GlueExample]:
    words = "the cat sat on a mat while dogs ran far away from home every day".split()
    out = []
    for i in range(n):
        a = " ".join(words[(i + k) % len(words)] for k in range(6 + i % 5))
        b = " ".join(words[(2 * i + k) % len(words)] for k in range(5)) if pair else None
        out.append(GlueExample(f"t:{i}", a, b, i % 2))
    return out


def test_copies_are_unlabelled_perturbed_and_deterministic():
    spec = get_task("MRPC")
    ex = _examples(pair=True)
    c1 = perturbed_copies(ex, spec, 2, seed=0)
    assert len(c1) == 2 * len(ex)
    assert all(c.label == -100 for c in c1)
    assert all(c.guid.startswith(e.guid + "+aug") for c, e in zip(c1, ex + ex))
    # every copy differs from its source in at least one side, and no side is emptied
    assert all((c.text_a, c.text_b) != (e.text_a, e.text_b) for c, e in zip(c1, ex + ex))
    assert all(c.text_a.split() and c.text_b.split() for c in c1)
    assert perturbed_copies(ex, spec, 2, seed=0) == c1
    assert perturbed_copies(ex, spec, 2, seed=1) != c1
    assert [e.label for e in ex] == [i % 2 for i in range(len(ex))]  # the sources are left alone
    # regression tasks mark the copies with NaN, single-sentence tasks keep text_b None
    assert all(math.isnan(c.label) for c in perturbed_copies(ex, get_task("STS-B"), 1, seed=0))
    assert all(c.text_b is None for c in perturbed_copies(_examples(pair=False), get_task("CoLA"), 1, seed=0))
    assert perturbed_copies(ex, spec, 0, seed=0) == []
    with pytest.raises(BlockpruneError, match="negative"):
        perturbed_copies(ex, spec, -1, seed=0)


def test_perturbation_edits_about_the_rate_and_draws_from_the_vocabulary():
    import random

    ex = _examples(pair=False)
    vocab = Vocabulary(ex)
    rng = random.Random(0)
    text = " ".join(f"w{i}" for i in range(40))
    cfg = PerturbConfig(rate=0.25, replace=1.0, delete=0.0)  # replacements only: the length stays
    out = perturb_text(text, rng, vocab, cfg).split()
    changed = [w for w, o in zip(out, text.split()) if w != o]
    assert len(out) == 40 and len(changed) == 10 and set(changed) <= set(vocab.words)
    assert perturb_text("word", rng, vocab, PerturbConfig(rate=1.0, replace=0.0, delete=1.0)).split()  # never empty
    with pytest.raises(BlockpruneError, match="rate"):
        PerturbConfig(rate=0.0)


def test_row_loss_matches_the_batch_loss_and_ignores_labels_of_teacher_only_rows():
    torch.manual_seed(0)
    cfg = DistillConfig(0.5, 2.0)
    s, t = torch.randn(6, 3), torch.randn(6, 3)
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    want = distillation_loss(s, t, F.cross_entropy(s, y), cfg)
    assert float(row_distillation_loss(s, t, y, cfg)) == pytest.approx(float(want), rel=1e-6)
    # rows 3..5 teacher-only: their label cannot matter, their loss is the soft term alone
    y2 = y.clone()
    y2[3:] = -100
    got = row_distillation_loss(s, t, y2, cfg)
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), reduction="none", log_target=True).sum(-1) * 4
    ce = F.cross_entropy(s, y, reduction="none")
    rows = torch.cat([0.5 * ce[:3] + 0.5 * kl[:3], kl[3:]])
    assert float(got) == pytest.approx(float(rows.mean()), rel=1e-6)
    # regression: a NaN label is teacher-only, and its gradient stays finite
    sr = torch.randn(4, 1, requires_grad=True)
    tr, yr = torch.randn(4, 1), torch.tensor([0.5, math.nan, 2.0, math.nan])
    loss = row_distillation_loss(sr, tr, yr, cfg)
    loss.backward()
    loss = loss.detach()
    assert torch.isfinite(loss) and torch.isfinite(sr.grad).all()
    d = (sr.detach().reshape(-1) - tr.reshape(-1)) ** 2
    task = (sr.detach().reshape(-1)[[0, 2]] - yr[[0, 2]]) ** 2
    assert float(loss) == pytest.approx(float((0.5 * task.sum() + 0.5 * d[[0, 2]].sum() + d[[1, 3]].sum()) / 4), rel=1e-5)
    # an all-teacher-only batch is finite too (the model's own mean CE would be NaN)
    assert torch.isfinite(row_distillation_loss(s, t, torch.full((6,), -100), cfg))
    with pytest.raises(BlockpruneError, match="weight is 0"):
        row_distillation_loss(s, t, y, DistillConfig(0.0))


def test_augment_needs_logit_distillation_and_leaves_old_fingerprints_alone(tiny_model, tmp_path):
    with pytest.raises(BlockpruneError, match="logit distillation is off"):
        small_config(tiny_model, tmp_path / "a", method="gradual", augment=1, distill_hidden=1.0).validate()
    with pytest.raises(BlockpruneError, match="augment"):
        small_config(tiny_model, tmp_path / "a", method="gradual", augment=-1, distill=0.5).validate()
    off = small_config(tiny_model, tmp_path / "a", method="gradual", distill=0.5)
    assert "augment" not in off.fingerprint()  # runs from before the option resume
    on = small_config(tiny_model, tmp_path / "a", method="gradual", distill=0.5, augment=2)
    assert on.fingerprint()["augment"] == 2
    # the train command's flag reaches the config
    import argparse

    from blockprune.frontends.train_cli import add_train_parser, config_from_args

    parser = argparse.ArgumentParser(prog="blockprune")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", "--model", str(tiny_model), "--task", "rte", "--data-dir", str(RTE),
                              "--out", str(tmp_path / "c"), "--distill", "0.5", "--augment", "3"])
    assert config_from_args(args).augment == 3


@pytest.mark.skipif(not (RTE / "train.tsv").is_file(), reason="real GLUE RTE data not found")
def test_distilled_stages_train_on_the_copies_and_the_dense_stage_does_not(tiny_model, tmp_path):
    n, bs = 32, 16
    cfg = small_config(tiny_model, tmp_path / "aug", method="gradual", block="4x4", ratio=0.5, epochs_dense=1,
                       epochs_rew=1, epochs_retrain=1, distill=0.5, distill_hidden=1.0, augment=2,
                       limit_train=n, limit_eval=16, batch_size=bs, prune_every=1, calib_examples=16,
                       exporter="legacy")
    res = run_recipe(cfg)
    steps = {row["stage"]: row.get("steps") for row in res.report["stages"]}
    assert steps["dense"] == n // bs  # no teacher: the labelled examples only
    assert steps["gradual"] == steps["retrain"] == 3 * n // bs  # the examples and their two copies
    assert res.report["config"]["augment"] == 2
    assert res.report["pruned_layers_sparsity"] == pytest.approx(0.5, abs=0.02)
