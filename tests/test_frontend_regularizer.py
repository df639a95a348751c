"""Reweighted group Lasso: alpha formula, refresh schedule, penalty value, per-layer lambda."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from blockprune.blocks import BlockShape
from blockprune.errors import BlockpruneError
from blockprune.frontends.regularizer import GroupLassoConfig, RefreshSchedule, ReweightedGroupLasso


class Tiny(nn.Module):
    """Names shaped like a BERT encoder so the regexes look like real ones."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.query = nn.Linear(8, 6)  # W 6x8
        self.ffn = nn.Linear(6, 10)  # W 10x6 (1x4 leaves an edge block of width 2)
        self.classifier = nn.Linear(10, 2)


LAYERS = {"query.weight": "1x4", "ffn.weight": "1x4", "classifier.weight": "2x5"}


def np_norms(w: np.ndarray, r: int, c: int) -> np.ndarray:
    gr, gc = -(-w.shape[0] // r), -(-w.shape[1] // c)
    return np.array(
        [[np.linalg.norm(w[i * r : (i + 1) * r, j * c : (j + 1) * c]) for j in range(gc)] for i in range(gr)]
    )


def np_penalty(model: nn.Module, alphas: dict[str, np.ndarray], lambdas: dict[str, float]) -> float:
    params = dict(model.named_parameters())
    total = 0.0
    for name, block in LAYERS.items():
        b = BlockShape.parse(block)
        w = params[name].detach().double().numpy()
        total += lambdas[name] * float((alphas[name] * np_norms(w, b.rows, b.cols)).sum())
    return total


def test_alpha_formula_and_buffers():
    model = Tiny()
    reg = ReweightedGroupLasso(model, LAYERS, GroupLassoConfig(eps=1e-3))
    for name, block in LAYERS.items():
        b = BlockShape.parse(block)
        w = dict(model.named_parameters())[name].detach().double().numpy()
        expected = 1.0 / (np_norms(w, b.rows, b.cols) + 1e-3)
        alpha = reg.alpha(name)
        assert not alpha.requires_grad
        np.testing.assert_allclose(alpha.double().numpy(), expected, rtol=1e-5)
    # alphas are buffers: saved in state_dict, not parameters
    assert len(list(reg.parameters())) == 0
    assert any(k.startswith("alpha__") for k in reg.state_dict())
    assert reg.refreshes == 0


def test_penalty_matches_hand_numpy_computation():
    model = Tiny()
    cfg = GroupLassoConfig(lam=1e-2, eps=1e-3)
    reg = ReweightedGroupLasso(model, LAYERS, cfg)
    alphas = {n: reg.alpha(n).double().numpy() for n in LAYERS}
    # Move the weights so the penalty is not just the count of groups (alpha*||W|| ~ 1 at start).
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5).add_(0.01)
    got = float(reg().detach())
    want = np_penalty(model, alphas, {n: 1e-2 for n in LAYERS})
    assert got == pytest.approx(want, rel=1e-5)
    # At construction alpha*||W_g|| = ||W_g|| / (||W_g|| + eps) < 1 for every group.
    assert 0 < got


def test_penalty_gradient_is_lambda_alpha_times_unit_direction():
    model = Tiny()
    reg = ReweightedGroupLasso(model, {"query.weight": "1x4"}, GroupLassoConfig(lam=0.1))
    reg().backward()
    w = model.query.weight.detach()
    alpha = reg.alpha("query.weight")
    seg = w[0, :4]
    torch.testing.assert_close(model.query.weight.grad[0, :4], 0.1 * alpha[0, 0] * seg / seg.norm())
    # alpha is constant: it received no gradient
    assert alpha.grad is None


def test_refresh_recomputes_alpha_only_when_asked():
    model = Tiny()
    reg = ReweightedGroupLasso(model, LAYERS)
    before = reg.alpha("query.weight").clone()
    with torch.no_grad():
        model.query.weight.mul_(0.1)
    # Not refreshed: alpha unchanged although the weights moved.
    assert torch.equal(reg.alpha("query.weight"), before)
    reg.refresh()
    after = reg.alpha("query.weight")
    w = model.query.weight.detach().double().numpy()
    np.testing.assert_allclose(after.double().numpy(), 1 / (np_norms(w, 1, 4) + 1e-3), rtol=1e-5)
    assert (after > before).all()  # smaller groups -> larger coefficients
    assert reg.refreshes == 1


def test_zero_group_gets_alpha_one_over_eps():
    model = Tiny()
    with torch.no_grad():
        model.query.weight[2, 4:8] = 0.0
    reg = ReweightedGroupLasso(model, {"query.weight": "1x4"}, GroupLassoConfig(eps=1e-3))
    assert float(reg.alpha("query.weight")[2, 1]) == pytest.approx(1e3)
    reg().backward()
    assert torch.isfinite(model.query.weight.grad).all()


def test_schedule_every_steps_and_epochs():
    s = RefreshSchedule(every_steps=3)
    assert [k for k in range(0, 10) if s.due_after_step(k)] == [3, 6, 9]
    assert not s.due_after_epoch(1)
    e = RefreshSchedule(every_epochs=2)
    assert [k for k in range(0, 7) if e.due_after_epoch(k)] == [2, 4, 6]
    assert not any(e.due_after_step(k) for k in range(10))
    assert not RefreshSchedule().due_after_step(1)

    model = Tiny()
    reg = ReweightedGroupLasso(model, LAYERS, GroupLassoConfig(schedule=RefreshSchedule(every_steps=2)))
    fired = [reg.on_step_end(k) for k in range(1, 6)]
    assert fired == [False, True, False, True, False]
    assert reg.refreshes == 2
    assert reg.on_epoch_end(1) is False


def test_schedule_refresh_tracks_training():
    model = Tiny()
    cfg = GroupLassoConfig(lam=1e-1, schedule=RefreshSchedule(every_steps=2))
    reg = ReweightedGroupLasso(model, {"query.weight": "1x4"}, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    start = reg.alpha("query.weight").clone()
    for step in range(1, 3):
        opt.zero_grad()
        reg().backward()
        opt.step()
        refreshed = reg.on_step_end(step)
        if step == 1:
            assert not refreshed and torch.equal(reg.alpha("query.weight"), start)
    # after step 2 the alphas reflect the shrunken weights
    assert not torch.equal(reg.alpha("query.weight"), start)
    w = model.query.weight.detach().double().numpy()
    np.testing.assert_allclose(reg.alpha("query.weight").double().numpy(), 1 / (np_norms(w, 1, 4) + 1e-3), rtol=1e-5)


def test_per_layer_lambda_regex_first_match_wins():
    cfg = GroupLassoConfig(
        lam=1e-4,
        layer_lambdas=[(r"^query\.", 1e-3), (r"\.weight$", 1e-5), (r"^ffn\.", 7.0)],
    )
    assert cfg.lambda_for("query.weight") == 1e-3  # first match, although the second matches too
    assert cfg.lambda_for("ffn.weight") == 1e-5  # ffn rule comes after the catch-all: never used
    assert cfg.lambda_for("pooler.bias") == 1e-4  # no match: global lambda

    model = Tiny()
    cfg = GroupLassoConfig(lam=1e-2, layer_lambdas=[(r"classifier", 0.0), (r"ffn", 1.0)])
    reg = ReweightedGroupLasso(model, LAYERS, cfg)
    assert reg.lambdas == {"query.weight": 1e-2, "ffn.weight": 1.0, "classifier.weight": 0.0}
    alphas = {n: reg.alpha(n).double().numpy() for n in LAYERS}
    want = np_penalty(model, alphas, reg.lambdas)
    assert float(reg().detach()) == pytest.approx(want, rel=1e-5)
    per_layer = reg.layer_penalties()
    assert per_layer["classifier.weight"] == 0.0
    assert sum(per_layer.values()) == pytest.approx(want, rel=1e-5)


def test_state_dict_round_trip():
    model = Tiny()
    reg = ReweightedGroupLasso(model, LAYERS)
    with torch.no_grad():
        model.ffn.weight.mul_(3)
    reg.refresh()
    other = ReweightedGroupLasso(Tiny(), LAYERS)
    other.load_state_dict(reg.state_dict())
    assert torch.equal(other.alpha("ffn.weight"), reg.alpha("ffn.weight"))


def test_errors_are_clear():
    model = Tiny()
    with pytest.raises(BlockpruneError, match="no parameter named 'query.wieght'"):
        ReweightedGroupLasso(model, {"query.wieght": "1x4"})
    with pytest.raises(BlockpruneError, match="not a 2-D"):
        ReweightedGroupLasso(model, {"query.bias": "1x2"})
    with pytest.raises(BlockpruneError, match="larger than layer"):
        ReweightedGroupLasso(model, {"classifier.weight": "4x1"})
    with pytest.raises(BlockpruneError, match="eps"):
        GroupLassoConfig(eps=0)
    with pytest.raises(BlockpruneError, match="does not compile"):
        GroupLassoConfig(layer_lambdas=[("(", 1.0)])
    with pytest.raises(BlockpruneError, match=">= 0"):
        GroupLassoConfig(lam=-1)
    with pytest.raises(BlockpruneError, match="positive integer"):
        RefreshSchedule(every_steps=0)
    with pytest.raises(BlockpruneError, match="no layers"):
        ReweightedGroupLasso(model, {})
