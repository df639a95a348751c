"""Distillation in masked retraining: the loss itself, and a recipe run that uses it.

The recipe test checks behaviour, not just that a flag is accepted: with the whole loss on the
teacher term (``distill=1``), masked retraining moves the pruned student's logits towards the
pre-pruning model's logits, while plain retraining from the same start does not aim there.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blockprune.errors import BlockpruneError
from blockprune.frontends.distill import DistillConfig, distillation_loss, frozen_teacher
from blockprune.frontends.recipe import run_recipe

from test_frontend_recipe import small_config, tiny_model  # noqa: F401  (fixture)
# the two recipe runs below train on the real RTE files: they skip where the recipe tests they borrow from do
from test_frontend_recipe import pytestmark as needs_rte


def test_loss_blends_task_and_teacher_terms():
    torch.manual_seed(0)
    s, t = torch.randn(8, 3), torch.randn(8, 3)
    task = torch.tensor(0.7)
    assert distillation_loss(s, t, task, DistillConfig(0.0)) is task
    temp = 3.0
    kl = (F.softmax(t / temp, -1) * (F.log_softmax(t / temp, -1) - F.log_softmax(s / temp, -1))).sum(-1).mean()
    got = distillation_loss(s, t, task, DistillConfig(0.25, temp))
    assert float(got) == pytest.approx(0.75 * 0.7 + 0.25 * temp ** 2 * float(kl), rel=1e-5)
    assert float(distillation_loss(t, t, torch.tensor(0.0), DistillConfig(1.0))) == pytest.approx(0.0, abs=1e-6)
    # regression: MSE to the teacher's prediction
    sr, tr = torch.randn(8, 1), torch.randn(8, 1)
    assert float(distillation_loss(sr, tr, task, DistillConfig(0.5))) == pytest.approx(
        0.35 + 0.5 * float(((sr - tr) ** 2).mean()), rel=1e-5)
    # the gradient pulls the student towards the teacher and never into the teacher
    s = s.clone().requires_grad_(True)
    tt = t.clone().requires_grad_(True)
    distillation_loss(s, tt, torch.tensor(0.0), DistillConfig(1.0)).backward()
    assert tt.grad is None
    step = s.detach() - 0.5 * s.grad
    before = F.kl_div(F.log_softmax(s.detach() / 2, -1), F.log_softmax(t / 2, -1), reduction="batchmean", log_target=True)
    after = F.kl_div(F.log_softmax(step / 2, -1), F.log_softmax(t / 2, -1), reduction="batchmean", log_target=True)
    assert after < before


@pytest.mark.parametrize("weight,temp,what", [(-0.1, 2.0, "outside"), (1.5, 2.0, "outside"), (0.5, 0.0, "positive"),
                                              (0.5, math.inf, "positive")])
def test_bad_settings_are_refused(weight, temp, what):
    with pytest.raises(BlockpruneError, match=what):
        DistillConfig(weight, temp)


def test_teacher_is_a_frozen_copy():
    m = torch.nn.Linear(4, 2)
    t = frozen_teacher(m)
    with torch.no_grad():
        m.weight.zero_()
    assert t.weight.abs().sum() > 0 and not t.training and not any(p.requires_grad for p in t.parameters())


def _logits(model_dir, feeds):
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return m(**feeds).logits


@needs_rte
def test_distilled_retraining_tracks_the_teacher(tiny_model, tmp_path):  # noqa: F811
    """Same dense start, same masks: retraining on the teacher term alone ends closer to the
    pre-pruning model's logits than retraining on the labels alone."""
    from transformers import AutoTokenizer

    common = dict(method="magnitude", ratio=0.5, epochs_dense=1, epochs_retrain=2, lr_retrain=3e-3, limit_train=64,
                  limit_eval=16)
    plain = run_recipe(small_config(tiny_model, tmp_path / "plain", **common))
    kd = run_recipe(small_config(tiny_model, tmp_path / "kd", distill=1.0, distill_temperature=1.0, **common))
    assert kd.report["config"]["distill"] == 1.0
    assert plain.report["config"].get("distill", 0.0) == 0.0
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    feeds = tok(["A man is playing a guitar.", "Nobody plays.", "The cat sat on the mat and slept."] * 4,
                ["Someone plays music.", "A concert happens.", "A cat is asleep."] * 4,
                padding=True, return_tensors="pt")
    teacher = _logits(tmp_path / "plain" / "checkpoints" / "dense", feeds)  # both runs' dense stage is identical
    assert torch.allclose(teacher, _logits(tmp_path / "kd" / "checkpoints" / "dense", feeds), atol=1e-5)
    d_plain = float(((_logits(plain.model_dir, feeds) - teacher) ** 2).mean())
    d_kd = float(((_logits(kd.model_dir, feeds) - teacher) ** 2).mean())
    assert d_kd < 0.5 * d_plain, (d_kd, d_plain)


def _saved_bert(out, num_labels: int, seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(str(out))
    return model


@needs_rte
def test_a_given_teacher_is_what_the_distilled_stages_learn_from(tiny_model, tmp_path):
    from blockprune.frontends import recipe as recipe_mod
    from test_frontend_recipe import small_config as cfg_of

    given = _saved_bert(tmp_path / "teacher", 2, seed=7)
    seen: list[tuple[str, torch.Tensor]] = []
    real = recipe_mod.train_stage

    def spy(accelerator, model, loader, plan, cfg, layers=None, masks=None, teacher=None, **kw):
        if teacher is not None:
            seen.append((plan.name, teacher.classifier.weight.detach().clone()))
        return real(accelerator, model, loader, plan, cfg, layers, masks, teacher, **kw)

    cfg = cfg_of(tiny_model, tmp_path / "run", method="gradual", block="4x4", ratio=0.5, epochs_dense=1,
                 epochs_rew=1, epochs_retrain=1, distill=0.5, teacher=str(tmp_path / "teacher"), limit_train=32,
                 limit_eval=16, prune_every=1, calib_examples=16, exporter="legacy")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recipe_mod, "train_stage", spy)
        res = run_recipe(cfg)
    assert [name for name, _ in seen] == ["gradual", "retrain"]  # the dense stage has no teacher
    for _, w in seen:  # the given checkpoint, not the start model or its dense fine-tune
        assert torch.equal(w, given.classifier.weight)
    assert res.report["config"]["teacher"] == str(tmp_path / "teacher")
    # refused before the out dir exists: no checkpoint there, distillation off, another head
    bad = [({"teacher": str(tmp_path / "nowhere")}, "no config.json"),
           ({"teacher": str(tmp_path / "teacher"), "distill": 0.0}, "distillation is off")]
    for kw, what in bad:
        with pytest.raises(BlockpruneError, match=what):
            run_recipe(cfg_of(tiny_model, tmp_path / "bad", method="gradual", **{"distill": 0.5, **kw}))
        assert not (tmp_path / "bad").exists()
    _saved_bert(tmp_path / "three", 3, seed=1)
    with pytest.raises(BlockpruneError, match="num_labels=3"):
        run_recipe(cfg_of(tiny_model, tmp_path / "bad3", method="gradual", block="4x4", ratio=0.5, distill=0.5,
                          teacher=str(tmp_path / "three"), epochs_dense=0, epochs_rew=1, limit_train=16,
                          limit_eval=16, calib_examples=16, exporter="legacy"))
    assert not (tmp_path / "bad3").exists()
