"""Reweighted group Lasso: the training-time penalty that pushes whole blocks towards zero.

    penalty = sum_l lambda_l * sum_g alpha_g * ||W_g||_2          (plain L2 norm, not squared)
    alpha_g = 1 / (||W_g||_2 + eps)                              (constant between refreshes)

Why reweighting: with alpha held fixed the penalty is a weighted group Lasso, and re-estimating
alpha from the current weights approximates an L0-like penalty (Candes, Wakin & Boyd 2008): small
groups get a large coefficient and are pushed to zero, large groups are barely penalised, so the
later hard pruning removes groups that carry little. Alphas are buffers (no gradient): they are
part of the regularizer's state, move with ``.to(device)`` and are saved in its ``state_dict``.

Lifecycle, in the spirit of ``torch.ao.pruning`` (everything keyed by parameter name):
construct (= prepare: computes alphas from the current, fine-tuned weights), add ``reg()`` to the
loss every step, call ``on_step_end(step)`` / ``on_epoch_end(epoch)`` so the schedule can refresh
alphas, then hard-prune (``hard_prune``) and drop the regularizer.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from blockprune.blocks import BlockShape
from blockprune.errors import BlockpruneError
from blockprune.frontends.grouping import group_norms


@dataclass
class RefreshSchedule:
    """When to recompute the alphas: every ``every_steps`` optimizer steps and/or every
    ``every_epochs`` epochs. Both ``None`` means never (alphas stay those of the fine-tuned
    model). The authors refresh at fixed epochs; with 3-4 epochs that is about once."""

    every_steps: int | None = None
    every_epochs: int | None = None

    def __post_init__(self) -> None:
        for what in ("every_steps", "every_epochs"):
            v = getattr(self, what)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise BlockpruneError(
                    f"refresh schedule {what}={v!r} is not a positive integer",
                    f"set {what} to 1 or more, or leave it unset to never refresh on that clock",
                )

    def due_after_step(self, step: int) -> bool:
        """``step`` counts completed optimizer steps, starting at 1."""
        return self.every_steps is not None and step > 0 and step % self.every_steps == 0

    def due_after_epoch(self, epoch: int) -> bool:
        """``epoch`` counts completed epochs, starting at 1."""
        return self.every_epochs is not None and epoch > 0 and epoch % self.every_epochs == 0


@dataclass
class GroupLassoConfig:
    """Penalty strength and reweighting.

    ``lam`` is the global lambda (paper default 1e-4). ``layer_lambdas`` is an ordered list of
    ``(regex, lambda)``; the first regex that ``re.search``-matches a parameter name gives its
    lambda (first match wins), otherwise ``lam`` applies. ``eps`` keeps alpha finite for groups
    that are already zero (paper: 1e-3).
    """

    lam: float = 1e-4
    eps: float = 1e-3
    layer_lambdas: list[tuple[str, float]] = field(default_factory=list)
    schedule: RefreshSchedule = field(default_factory=RefreshSchedule)

    def __post_init__(self) -> None:
        if not (self.eps > 0):
            raise BlockpruneError(
                f"group Lasso eps={self.eps!r} must be > 0",
                "eps keeps 1/(||W_g|| + eps) finite for zero groups; the paper uses 1e-3",
            )
        _check_lambda(self.lam, "lam")
        parsed: list[tuple[str, float]] = []
        for item in self.layer_lambdas:
            try:
                pattern, lam = item
            except (TypeError, ValueError):
                raise BlockpruneError(
                    f"layer_lambdas entry {item!r} is not a (regex, lambda) pair",
                    'write each entry as ["attention\\\\.self", 1e-5]',
                ) from None
            try:
                re.compile(pattern)
            except re.error as exc:
                raise BlockpruneError(
                    f"layer_lambdas regex {pattern!r} does not compile ({exc})",
                    "fix the regular expression (dots in parameter names must be escaped as \\.)",
                ) from exc
            _check_lambda(lam, f"lambda for {pattern!r}")
            parsed.append((pattern, float(lam)))
        self.layer_lambdas = parsed

    def lambda_for(self, name: str) -> float:
        """Lambda of parameter ``name``: first matching ``layer_lambdas`` regex, else ``lam``."""
        for pattern, lam in self.layer_lambdas:
            if re.search(pattern, name):
                return lam
        return float(self.lam)


def _check_lambda(value: float, what: str) -> None:
    try:
        ok = float(value) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise BlockpruneError(
            f"group Lasso {what}={value!r} is not a number >= 0",
            "use a small positive value such as 1e-4 (paper default), or 0 to leave a layer unpenalised",
        )


def _buffer_name(param_name: str) -> str:
    # Buffer names may not contain dots; parameter names always do.
    return "alpha__" + param_name.replace(".", "__")


def resolve_parameters(
    model: nn.Module | Mapping[str, torch.Tensor], names: list[str]
) -> dict[str, torch.Tensor]:
    """Look parameters up by name, with one clear error listing close names for a typo."""
    params = dict(model.named_parameters()) if isinstance(model, nn.Module) else dict(model)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name not in params:
            close = difflib.get_close_matches(name, list(params), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "list them with model.named_parameters()"
            raise BlockpruneError(f"the model has no parameter named {name!r}", hint)
        out[name] = params[name]
    return out


class ReweightedGroupLasso(nn.Module):
    """The stage-2 penalty over a set of Linear weights, addressed by parameter name.

    ``layers`` maps parameter name (``bert.encoder.layer.0.attention.self.query.weight``) to its
    block shape (``BlockShape`` or ``"1x32"``). Call the module to get the penalty to add to the
    task loss. Alphas are computed at construction from the current weights.
    """

    def __init__(
        self,
        model: nn.Module | Mapping[str, torch.Tensor],
        layers: Mapping[str, BlockShape | str],
        config: GroupLassoConfig | None = None,
    ) -> None:
        super().__init__()
        if not layers:
            raise BlockpruneError(
                "no layers selected for the group Lasso penalty",
                "select at least one Linear weight (check the include/exclude patterns)",
            )
        self.config = config or GroupLassoConfig()
        # A plain dict, so the model's parameters are not re-registered as ours.
        self._params: dict[str, torch.Tensor] = resolve_parameters(model, list(layers))
        self.blocks: dict[str, BlockShape] = {}
        self.lambdas: dict[str, float] = {}
        for name, block in layers.items():
            block = BlockShape.parse(block)
            w = self._params[name]
            if w.dim() != 2:
                raise BlockpruneError(
                    f"parameter {name!r} has shape {tuple(w.shape)}, not a 2-D Linear weight",
                    "exclude biases, LayerNorm and other non-matrix parameters from the selection",
                )
            block.check_fits(tuple(w.shape), name)
            self.blocks[name] = block
            self.lambdas[name] = self.config.lambda_for(name)
            self.register_buffer(_buffer_name(name), torch.empty(0), persistent=True)
        self.refreshes = 0
        self.refresh()
        self.refreshes = 0  # the initial computation is not a refresh

    @property
    def names(self) -> list[str]:
        return list(self.blocks)

    def alpha(self, name: str) -> torch.Tensor:
        """Current alpha of every group of layer ``name`` (shape ``grid``)."""
        return getattr(self, _buffer_name(name))

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute ``alpha_g = 1 / (||W_g||_2 + eps)`` from the current weights."""
        for name, block in self.blocks.items():
            w = self._params[name].detach()
            alpha = 1.0 / (group_norms(w, block) + self.config.eps)
            setattr(self, _buffer_name(name), alpha)
        self.refreshes += 1

    def layer_penalty(self, name: str) -> torch.Tensor:
        """``sum_g alpha_g * ||W_g||_2`` for one layer (lambda not applied); differentiable."""
        w = self._params[name]
        alpha = self.alpha(name)
        return (alpha.to(device=w.device, dtype=w.dtype) * group_norms(w, self.blocks[name])).sum()

    def forward(self) -> torch.Tensor:
        """The penalty ``sum_l lambda_l * sum_g alpha_g ||W_g||_2`` as a scalar tensor."""
        total: torch.Tensor | None = None
        for name in self.blocks:
            lam = self.lambdas[name]
            if lam == 0.0:
                continue
            term = lam * self.layer_penalty(name)
            total = term if total is None else total + term.to(total.device)
        if total is None:
            first = next(iter(self._params.values()))
            return torch.zeros((), dtype=first.dtype, device=first.device)
        return total

    penalty = forward

    @torch.no_grad()
    def layer_penalties(self) -> dict[str, float]:
        """``lambda_l * sum_g alpha_g ||W_g||`` per layer, as floats, for logging."""
        return {n: float(self.lambdas[n] * self.layer_penalty(n)) for n in self.blocks}

    def on_step_end(self, step: int) -> bool:
        """Call after each optimizer step (``step`` from 1); refreshes when due, says if it did."""
        if self.config.schedule.due_after_step(step):
            self.refresh()
            return True
        return False

    def on_epoch_end(self, epoch: int) -> bool:
        """Call after each epoch (``epoch`` from 1); refreshes when due, says if it did."""
        if self.config.schedule.due_after_epoch(epoch):
            self.refresh()
            return True
        return False

    def extra_repr(self) -> str:
        return f"layers={len(self.blocks)}, lam={self.config.lam}, eps={self.config.eps}"
