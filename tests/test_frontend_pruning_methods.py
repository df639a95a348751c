"""Activation-aware importance, the proximal group-Lasso step, the cubic gradual schedule and
the sensitivity allocation, on real (tiny) computations.

What can fail: numpy and torch scores disagreeing (the passes and the frontend would then make
different masks), padding leaking into activation norms, the proximal step not reaching exact
zeros or shrinking by the wrong amount, gradual masks reviving weights or missing the target,
an allocation that misses the overall ratio or prunes the sensitive layer as hard as the robust one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from blockprune.blocks import BlockShape, block_scores
from blockprune.errors import BlockpruneError
from blockprune.frontends.allocation import SensitivityCurves, allocate, measure_sensitivity, overall_ratio
from blockprune.frontends.gradual import CubicSchedule, GradualPruner, cubic_sparsity
from blockprune.frontends.hard_prune import hard_prune
from blockprune.frontends.importance import collect_feature_norms, importance_scores
from blockprune.frontends.regularizer import GroupLassoConfig, ReweightedGroupLasso
from blockprune.importance import activation_block_scores


def test_numpy_and_torch_activation_scores_agree_and_differ_from_plain():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 36, generator=g, dtype=torch.float64)
    s = torch.rand(36, generator=g, dtype=torch.float64) * 3
    s[5] = 40.0  # one outlier feature, as in transformers
    for block in ("1x8", "4x4", "16x1"):
        b = BlockShape.parse(block)
        t = importance_scores(w, b, s).numpy()
        n = activation_block_scores(w.numpy(), s.numpy(), b)
        np.testing.assert_allclose(t, n, rtol=1e-10)
        assert not np.allclose(n, block_scores(w.numpy(), b))
    np.testing.assert_allclose(activation_block_scores(w.numpy(), None, "4x4"), block_scores(w.numpy(), BlockShape(4, 4)))
    with pytest.raises(BlockpruneError, match="feature norms"):
        activation_block_scores(w.numpy(), np.ones(5), "4x4")


def test_activation_scores_keep_the_block_on_the_loud_feature():
    w = torch.full((4, 8), 0.1)
    w[:, 0] = 0.01  # small weights on feature 0 ...
    s = torch.ones(8)
    s[0] = 100.0  # ... which carries huge activations
    plain = hard_prune({"w": w}, {"w": "4x1"}, None)["w"].keep  # default config: ratio 0.5
    aware = hard_prune({"w": w}, {"w": "4x1"}, None, feature_norms={"w": s})["w"].keep
    assert not bool(plain[0, 0]) and bool(aware[0, 0])


def test_feature_norms_exclude_padding():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.lin = nn.Linear(4, 3)

        def forward(self, input_ids, attention_mask=None):
            return self.lin(self.emb(input_ids))

    net = Net()
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    got = collect_feature_norms(net, ["lin.weight"], [{"input_ids": ids, "attention_mask": mask, "labels": ids}])
    x = net.emb(torch.tensor([1, 2, 3, 4, 5])).detach()
    torch.testing.assert_close(got["lin.weight"], x.norm(dim=0))
    # a cap on examples: only the first sequence counts
    one = collect_feature_norms(net, ["lin.weight"], [{"input_ids": ids, "attention_mask": mask}], max_examples=1)
    torch.testing.assert_close(one["lin.weight"], net.emb(torch.tensor([1, 2, 3])).detach().norm(dim=0))
    with pytest.raises(BlockpruneError, match="nn.Linear"):
        collect_feature_norms(net, ["emb.weight"], [{"input_ids": ids}])


def test_proximal_step_shrinks_by_the_formula_and_reaches_exact_zero():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    reg = ReweightedGroupLasso(lin, {"weight": "1x4"}, GroupLassoConfig(lam=0.05, form="proximal", target_sparsity=0.5))
    w0 = lin.weight.detach().clone()
    norms = w0.reshape(8, 4, 4).norm(dim=2)
    alpha = 1.0 / (norms + 1e-3)
    reg.proximal_step(0.01)
    factor = torch.clamp(1 - 0.01 * 0.05 * alpha / norms, min=0)
    torch.testing.assert_close(lin.weight.detach().reshape(8, 4, 4), w0.reshape(8, 4, 4) * factor[..., None])
    for step in range(1, 150):  # alphas refreshed every 50 steps: reweighting accelerates the weak groups
        reg.proximal_step(0.01)
        reg.on_step_end(step)
        if step % 50 == 0:
            reg.refresh()
    stats = reg.history[-1]
    assert 0.3 < stats["zero_group_fraction"] < 0.9, reg.history
    z = lin.weight.detach().reshape(8, 4, 4).norm(dim=2) == 0
    assert torch.all(lin.weight.detach().reshape(8, 4, 4)[z] == 0.0)  # exact zeros, not tiny values
    assert reg.history[0]["refresh"] == 0 and 0 < reg.history[0]["pruned_kept_norm_ratio"] < 1
    assert stats["pruned_kept_norm_ratio"] < reg.history[0]["pruned_kept_norm_ratio"]
    with pytest.raises(BlockpruneError, match="form"):
        GroupLassoConfig(form="loss")


def test_targeted_proximal_step_zeroes_the_target_share_and_spares_the_rest():
    """Untargeted, lambda 0.5 zeroes nearly every group (the cascade that took STS-B to 2.8);
    targeted, exactly each layer's ratio of groups ends at zero, chosen weakest first as the ramp
    moves, and the kept groups are not shrunk at all."""
    def run(targets):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 8, bias=False), nn.Linear(8, 16, bias=False))
        layers = {"0.weight": "1x4", "1.weight": "4x1"}
        w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        ramp = CubicSchedule(ramp_steps=60, every=10) if targets else None
        reg = ReweightedGroupLasso(model, layers, GroupLassoConfig(lam=0.5, form="proximal"),
                                   targets=targets, ramp=ramp)
        sizes = []
        for step in range(1, 101):
            reg.proximal_step(0.01)
            reg.on_step_end(step)
            if step % 20 == 0:
                reg.refresh()
            if targets:
                sizes.append(int(reg.shrink_set("0.weight").sum()))
        return model, w0, reg, sizes

    model, _, reg, _ = run(None)
    assert reg.history[-1]["zero_group_fraction"] > 0.9

    targets = {"0.weight": 0.5, "1.weight": 0.25}
    model, w0, reg, sizes = run(targets)
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] == 16  # the set grows with the ramp to 50% of 32
    for name, block in (("0.weight", BlockShape.parse("1x4")), ("1.weight", BlockShape.parse("4x1"))):
        w = dict(model.named_parameters())[name].detach()
        norms = w.reshape(w.shape[0] // block.rows, block.rows, w.shape[1] // block.cols, block.cols)
        norms = norms.permute(0, 2, 1, 3).reshape(w.shape[0] // block.rows, w.shape[1] // block.cols, -1).norm(dim=2)
        zero = norms == 0
        assert int(zero.sum()) == int(targets[name] * zero.numel()), name
        full = zero.repeat_interleave(block.rows, 0).repeat_interleave(block.cols, 1)
        torch.testing.assert_close(w[~full], w0[name][~full], rtol=0, atol=0)  # kept groups untouched
        # the zeroed groups are the weakest at the start
        n0 = w0[name].reshape(w.shape[0] // block.rows, block.rows, w.shape[1] // block.cols, block.cols)
        n0 = n0.permute(0, 2, 1, 3).reshape(zero.shape + (-1,)).norm(dim=2)
        assert n0[zero].max() <= n0[~zero].min()
    with pytest.raises(BlockpruneError, match="no target ratio"):
        ReweightedGroupLasso(model, {"0.weight": "1x4", "1.weight": "4x1"}, GroupLassoConfig(form="proximal"),
                             targets={"0.weight": 0.5}, ramp=CubicSchedule(ramp_steps=10))
    with pytest.raises(BlockpruneError, match="ramp"):
        ReweightedGroupLasso(model, {"0.weight": "1x4"}, GroupLassoConfig(form="proximal"), targets={"0.weight": 0.5})


def test_cubic_schedule():
    assert cubic_sparsity(0, 100, 0.0, 0.8) == 0.0
    assert cubic_sparsity(100, 100, 0.0, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(50, 100, 0.0, 0.8) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    sch = CubicSchedule(ramp_steps=100, every=10)
    assert sch.fraction(0) == 0.0 and sch.fraction(100) == 1.0 and sch.fraction(500) == 1.0
    assert sch.fraction(15) == sch.fraction(10) == pytest.approx(1 - 0.9 ** 3)  # moves every 10 steps
    vals = [sch.fraction(t) for t in range(0, 101)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    with pytest.raises(BlockpruneError):
        CubicSchedule(ramp_steps=0)


def test_gradual_pruner_tightens_monotonically_to_per_layer_targets():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    targets = {"0.weight": 0.5, "2.weight": 0.75}
    pruner = GradualPruner(net, {"0.weight": "4x4", "2.weight": "1x8"}, targets, CubicSchedule(ramp_steps=40, every=5))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    pruner.attach_optimizer(opt)
    prev = {n: m.mask.clone() for n, m in pruner.masks().items()}
    assert all(bool(m.all()) for m in prev.values())  # starts dense
    x = torch.randn(64, 16)
    for step in range(1, 51):
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.on_step_end(step)
        cur = {n: m.mask for n, m in pruner.masks().items()}
        for n in cur:
            assert not bool((cur[n] & ~prev[n]).any())  # nothing revived
            w = dict(net.named_parameters())[n]
            assert torch.all(w.detach()[~cur[n]] == 0)
        prev = {n: m.clone() for n, m in cur.items()}
    final = pruner.masks()
    for n, t in targets.items():
        assert final[n].sparsity == pytest.approx(t)
    assert pruner.history[-1]["fraction_of_target"] == 1.0 and len(pruner.history) > 3


def test_allocation_meets_target_and_spares_the_sensitive_layer():
    curves = SensitivityCurves(ratios=[0.25, 0.5, 0.75, 0.9],
                               loss={"robust": [0.0, 0.01, 0.02, 0.05], "fragile": [0.2, 0.5, 0.9, 1.0],
                                     "mid": [0.01, 0.05, 0.2, 0.4]},
                               sizes={"robust": 1000, "fragile": 1000, "mid": 2000})
    for target in (0.3, 0.5, 0.7):
        r = allocate(curves, target)
        assert overall_ratio(r, curves.sizes) == pytest.approx(target, abs=1e-9)
        assert r["robust"] >= r["mid"] >= r["fragile"]
        assert max(r.values()) <= 0.9 + 1e-12
    with pytest.raises(BlockpruneError, match="above"):
        allocate(curves, 0.95)


def test_measure_sensitivity_prunes_one_layer_at_a_time_and_restores():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(32, 8)
    ref = net(x).detach()
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def loss() -> float:
        return float((net(x) - ref).pow(2).mean())

    curves = measure_sensitivity(net, {"0.weight": "1x4", "2.weight": "4x1"}, [0.5, 0.25, 0.9], loss)
    assert curves.ratios == [0.25, 0.5, 0.9]
    for n, row in curves.loss.items():
        assert row[0] > 0 and row[-1] >= row[0]
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_sensitivity_cache_is_used_only_for_the_same_key(tmp_path):
    from blockprune.frontends.allocation import load_curves, save_curves

    curves = SensitivityCurves([0.5], {"a": [0.1]}, {"a": 10}, 0.0, 1.0)
    path = str(tmp_path / "c" / "s.json")
    assert load_curves(path, {"block": "16x1"}) is None
    save_curves(path, {"block": "16x1"}, curves)
    got = load_curves(path, {"block": "16x1"})
    assert got is not None and got.loss == {"a": [0.1]} and got.sizes == {"a": 10}
    assert load_curves(path, {"block": "4x4"}) is None
    save_curves(None, {}, curves)  # no path: nothing written
