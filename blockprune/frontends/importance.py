"""Activation-aware group importance on the PyTorch side: gather per-input-feature activation
norms with forward hooks, and score blocks by ``||W_g ⊙ s||`` (see ``blockprune.importance``).

Why hooks on the prunable Linears: the norm that matters for weight ``W[out, in]`` is that of
the layer's own input, feature by feature, over real tokens; padding tokens are excluded (their
hidden states are not zero and would bias the norms towards short batches). A few hundred
training examples are enough: the large-activation dimensions are a property of the model, not
of the example.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from blockprune.blocks import BlockShape
from blockprune.errors import BlockpruneError
from blockprune.frontends.grouping import group_norms, group_scores

SCORES = ("activation", "weight")


def _linear_of(model: nn.Module, param_name: str) -> nn.Module:
    prefix, _, local = param_name.rpartition(".")
    try:
        module = model.get_submodule(prefix)
    except AttributeError:
        module = None
    if module is None or local != "weight" or not isinstance(module, nn.Linear):
        raise BlockpruneError(f"{param_name!r} is not the weight of an nn.Linear",
                              "activation-aware scores need Linear layers; use --score weight for others")
    return module


@torch.no_grad()
def collect_feature_norms(model: nn.Module, names: Iterable[str], batches: Iterable[Mapping[str, torch.Tensor]],
                          max_examples: int = 256) -> dict[str, torch.Tensor]:
    """Per prunable weight name, the L2 norm of each input feature over the non-padding tokens of
    the first ``max_examples`` examples of ``batches`` (CPU float32, shape ``[in_features]``).

    ``batches`` yields model inputs (a ``labels`` key is dropped); the model runs in eval mode and
    is put back in its previous mode.
    """
    names = list(names)
    sums: dict[str, torch.Tensor] = {}
    current_mask: list[torch.Tensor | None] = [None]
    handles = []

    def hook_for(name: str):
        def hook(_module: nn.Module, inputs: tuple[Any, ...], _output: Any) -> None:
            x = inputs[0].detach().float()
            x2 = x * x
            m = current_mask[0]
            if m is not None and x2.dim() == 3 and tuple(x2.shape[:2]) == tuple(m.shape):
                x2 = x2 * m.to(x2.dtype).unsqueeze(-1)
            acc = x2.reshape(-1, x2.shape[-1]).sum(0).cpu()
            sums[name] = acc if name not in sums else sums[name] + acc

        return hook

    was_training = model.training
    model.eval()
    try:
        for n in names:
            handles.append(_linear_of(model, n).register_forward_hook(hook_for(n)))
        seen = 0
        device = next(model.parameters()).device
        for batch in batches:
            if seen >= max_examples:
                break
            feeds = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            take = min(max_examples - seen, int(feeds["input_ids"].shape[0]))
            feeds = {k: v[:take] for k, v in feeds.items()}
            current_mask[0] = feeds.get("attention_mask")
            model(**feeds)
            seen += take
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not sums:
        raise BlockpruneError("no calibration examples reached the prunable layers",
                              "give at least one training example for the activation statistics")
    return {n: torch.sqrt(s) for n, s in sums.items()}


def normalised(feature_norms: torch.Tensor) -> torch.Tensor:
    """``s / rms(s)``: activation-aware scores stay on the scale of plain block norms."""
    s = feature_norms.detach().to(torch.float64)
    rms = torch.sqrt(torch.mean(s * s))
    return torch.ones_like(s) if float(rms) == 0 else s / rms


def weighted(w: torch.Tensor, feature_norms: torch.Tensor | None) -> torch.Tensor:
    """``W[out, in] ⊙ s[None, :]`` (``None``: ``W`` itself)."""
    if feature_norms is None:
        return w
    s = normalised(feature_norms).to(device=w.device, dtype=w.dtype)
    if s.shape[0] != w.shape[1]:
        raise BlockpruneError(f"{s.shape[0]} feature norms for a weight with {w.shape[1]} input features",
                              "collect the norms on this model's prunable Linear layers")
    return w * s[None, :]


def importance_norms(w: torch.Tensor, block: BlockShape, feature_norms: torch.Tensor | None) -> torch.Tensor:
    """``||W_g ⊙ s||`` per group (plain norms of the weighted matrix; the reweighting's input)."""
    return group_norms(weighted(w, feature_norms), block)


def importance_scores(w: torch.Tensor, block: BlockShape, feature_norms: torch.Tensor | None) -> torch.Tensor:
    """Pruning scores of ``W ⊙ s`` (edge blocks scaled like ``blocks.block_scores``)."""
    return group_scores(weighted(w, feature_norms), block)
