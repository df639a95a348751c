"""Masked retraining: pruned weights stay exactly 0.0 through AdamW with weight decay."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from blockprune.errors import BlockpruneError
from blockprune.frontends.hard_prune import HardPruneConfig, hard_prune
from blockprune.frontends.masked import (
    MASK_SUFFIX,
    attach_masks,
    attached_masks,
    masked_violations,
    verify_masked,
)

LAYERS = {"0.weight": "1x4", "2.weight": "2x2"}


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)


def train(model, opt, steps: int, start: int = 0):
    for k in range(start, start + steps):
        x, y = batch(k)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def warm_adamw(model):
    """An optimizer with nonzero moments everywhere, as one carried over from stage 2 would be."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, opt, 3, start=100)
    return opt


def masks_for(model):
    return hard_prune(model, LAYERS, HardPruneConfig(sparsity=0.5))


def test_adamw_with_weight_decay_keeps_pruned_weights_exactly_zero():
    model = make_model()
    opt = warm_adamw(model)
    masks = masks_for(model)
    mt = attach_masks(model, masks, optimizer=opt)
    assert verify_masked(model) == sum(int((~m.mask).sum()) for m in masks.values())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, opt, 5)
    for name, lm in masks.items():
        w = dict(model.named_parameters())[name].detach()
        assert torch.all(w[~lm.mask] == 0.0)
        # kept weights did train
        assert not torch.equal(w[lm.mask], before[name][lm.mask])
    assert verify_masked(model) > 0
    assert masked_violations(model) == {n: 0 for n in LAYERS}
    assert mt.names == list(LAYERS)


def test_check_fails_without_masking():
    model = make_model()
    opt = warm_adamw(model)
    masks = masks_for(model)
    with torch.no_grad():  # zero the pruned entries once, but attach nothing
        for name, lm in masks.items():
            dict(model.named_parameters())[name].mul_(lm.mask)
    verify_masked(model, masks)  # holds right after zeroing
    train(model, opt, 2)
    with pytest.raises(BlockpruneError, match="not zero"):
        verify_masked(model, masks)
    with pytest.raises(BlockpruneError, match="no masks are attached"):
        verify_masked(model)


def test_gradient_hooks_alone_leak_with_warm_optimizer_state():
    """Why the post-step re-application exists: masked gradients are not enough when AdamW
    already has moments for the pruned entries (we deliberately do not register the optimizer
    and do not clear its state)."""
    model = make_model()
    opt = warm_adamw(model)
    masks = masks_for(model)
    attach_masks(model, masks)  # grad hooks only
    x, y = batch(0)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for name, lm in masks.items():
        assert torch.all(dict(model.named_parameters())[name].grad[~lm.mask] == 0.0)
    opt.step()
    with pytest.raises(BlockpruneError, match="not zero"):
        verify_masked(model)


def test_post_step_reapplication_covers_state_loaded_after_attach():
    """Resuming from a checkpoint loads warm moments *after* the masks were attached; only the
    re-application after each step keeps the pruned entries at zero then."""
    model = make_model()
    opt = warm_adamw(model)
    warm_state = copy.deepcopy(opt.state_dict())
    masks = masks_for(model)
    attach_masks(model, masks, optimizer=opt)
    opt.load_state_dict(warm_state)  # moments of pruned entries are nonzero again
    for name, lm in masks.items():
        assert torch.any(opt.state[dict(model.named_parameters())[name]]["exp_avg"][~lm.mask] != 0)
    train(model, opt, 3)
    verify_masked(model)


def test_attach_optimizer_clears_moments_of_pruned_entries():
    model = make_model()
    opt = warm_adamw(model)
    masks = masks_for(model)
    attach_masks(model, masks, optimizer=opt)
    for name, lm in masks.items():
        state = opt.state[dict(model.named_parameters())[name]]
        assert torch.all(state["exp_avg"][~lm.mask] == 0)
        assert torch.all(state["exp_avg_sq"][~lm.mask] == 0)


def test_nan_in_pruned_entry_becomes_zero():
    model = make_model()
    masks = masks_for(model)
    with torch.no_grad():
        w = model[0].weight
        w[~masks["0.weight"].mask] = float("nan")
    attach_masks(model, masks)
    verify_masked(model)


def test_squash_bakes_masks_and_removes_hooks_and_buffers():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    masks = masks_for(model)
    mt = attach_masks(model, masks, optimizer=opt)
    assert set(attached_masks(model)) == set(LAYERS)
    # masks are non-persistent: checkpoints stay loadable into a plain model
    assert not any(k.endswith(MASK_SUFFIX) for k in model.state_dict())
    train(model, opt, 2)
    out = mt.squash()
    assert set(out) == set(LAYERS) and all(m.dtype == torch.bool for m in out.values())
    for name, lm in masks.items():
        assert torch.equal(out[name], lm.mask)
    assert attached_masks(model) == {}
    verify_masked(model, out)
    # hooks are gone: gradients of pruned entries flow again and steps move them
    train(model, opt, 1, start=50)
    assert torch.any(model[0].weight.grad[~out["0.weight"]] != 0)
    with pytest.raises(BlockpruneError):
        verify_masked(model, out)
    # and masks can be attached again after squash
    attach_masks(model, out)
    verify_masked(model)


def test_attach_errors():
    model = make_model()
    masks = masks_for(model)
    with pytest.raises(BlockpruneError, match="no parameter named"):
        attach_masks(model, {"5.weight": masks["0.weight"]})
    with pytest.raises(BlockpruneError, match="shape"):
        attach_masks(model, {"0.weight": masks["0.weight"], "2.weight": masks["2.weight"].mask.T})
    assert attached_masks(model) == {}  # a bad entry leaves nothing half attached
    attach_masks(model, masks)
    with pytest.raises(BlockpruneError, match="already attached"):
        attach_masks(model, masks)
    with pytest.raises(BlockpruneError, match="no masks"):
        attach_masks(model, {})
