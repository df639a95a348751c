"""Gradual block pruning (Zhu & Gupta 2017): sparsity rises on a cubic schedule while training.

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / T)^3        for t0 <= t <= t0 + T

with the masks recomputed every ``every`` optimizer steps from the current weights. Why: a
one-shot cut of half a small model's weights destroys more than retraining can recover (the
MiniLM keeps ~0.24 embedding cosine at 16x1/0.5 one-shot); removing a little at a time lets the
remaining weights take over the work of each removed block while the loss still sees the model
whole. The cubic shape prunes fast while many redundant blocks exist and slowly near the target.

Masks only grow: a pruned block is zero, scores zero, and is the first to be chosen again, so the
schedule never revives weights (and per-layer ratios of an allocation are met exactly at the end,
by the same ``choose_pruned`` rule as one-shot hard pruning). Masked entries are kept exactly
zero between updates by ``MaskedTraining`` (gradient hook + re-applied after every step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from blockprune.blocks import BlockShape, check_sparsity
from blockprune.errors import BlockpruneError
from blockprune.frontends.hard_prune import LayerMask, prune_per_layer
from blockprune.frontends.masked import MaskedTraining


@dataclass
class CubicSchedule:
    """Sparsity factor in [0, 1] of the target over optimizer steps: 0 before ``start``, the
    cubic ramp over ``ramp_steps`` steps, 1 after; changes only at multiples of ``every``."""

    ramp_steps: int
    every: int = 10
    start: int = 0
    initial: float = 0.0  # s_i as a fraction of the target (0: start dense)

    def __post_init__(self) -> None:
        for what in ("ramp_steps", "every"):
            v = getattr(self, what)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BlockpruneError(f"gradual pruning {what}={v!r} is not an integer >= 1",
                                      "give the ramp length and the mask-update interval in optimizer steps")
        if not isinstance(self.start, int) or self.start < 0:
            raise BlockpruneError(f"gradual pruning start={self.start!r} is not an integer >= 0",
                                  "give the first step of the ramp (0: from the beginning)")
        if not 0.0 <= float(self.initial) <= 1.0:
            raise BlockpruneError(f"gradual pruning initial fraction {self.initial!r} is outside [0, 1]",
                                  "use 0 to start from the dense model")

    @classmethod
    def over_run(cls, total_steps: int, ramp_fraction: float, every: int) -> "CubicSchedule":
        """The ramp over the first ``ramp_fraction`` of a stage of ``total_steps`` steps (at least one)."""
        return cls(ramp_steps=max(1, int(round(ramp_fraction * total_steps))), every=every)

    def fraction(self, step: int) -> float:
        """Share of the target sparsity reached after ``step`` optimizer steps."""
        t = min(max(step - self.start, 0), self.ramp_steps)
        if t < self.ramp_steps:
            t -= t % self.every  # masks move only every ``every`` steps
        return 1.0 + (float(self.initial) - 1.0) * (1.0 - t / self.ramp_steps) ** 3


def cubic_sparsity(step: int, total: int, s_initial: float, s_final: float) -> float:
    """Zhu & Gupta's ``s_t = s_f + (s_i - s_f)(1 - t/T)^3`` (``t`` clipped to ``[0, T]``)."""
    t = min(max(step, 0), total)
    return s_final + (s_initial - s_final) * (1.0 - t / max(total, 1)) ** 3


class GradualPruner:
    """Masks that tighten on a ``CubicSchedule`` towards per-layer target ratios.

    ``targets`` maps parameter name -> final ratio; ``blocks`` name -> block shape;
    ``feature_norms`` (optional) name -> per-input-feature activation norms for activation-aware
    scores. Attach the training optimizer (``attach_optimizer``), then call ``on_step_end(step)``
    after every optimizer step. ``masks()`` gives the current ``LayerMask``s.
    """

    def __init__(self, model: nn.Module, blocks: Mapping[str, BlockShape | str], targets: Mapping[str, float],
                 schedule: CubicSchedule, feature_norms: Mapping[str, torch.Tensor] | None = None) -> None:
        missing = [n for n in blocks if n not in targets]
        if missing:
            raise BlockpruneError(f"no target ratio for {len(missing)} layer(s), e.g. {missing[0]!r}",
                                  "give every pruned layer a ratio (uniform or from the allocation)")
        self.model = model
        self.blocks = {n: BlockShape.parse(b) for n, b in blocks.items()}
        self.targets = {n: check_sparsity(targets[n], what=f"target ratio of {n}") for n in self.blocks}
        self.schedule = schedule
        self.feature_norms = dict(feature_norms or {})
        params = dict(model.named_parameters())
        self._current: dict[str, LayerMask] = {}
        ones = {n: torch.ones_like(params[n], dtype=torch.bool) for n in self.blocks}
        self.masked = MaskedTraining(model, ones)
        self.fraction = -1.0
        self.updates = 0
        self.history: list[dict[str, float]] = []
        self.update(0)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.masked.attach_optimizer(optimizer)

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Recompute the masks for ``step`` if the schedule moved; says whether it did."""
        frac = self.schedule.fraction(step)
        if frac == self.fraction:
            return False
        self.fraction = frac
        params = dict(self.model.named_parameters())
        weights = {n: params[n].detach() for n in self.blocks}
        ratios = {n: min(self.targets[n] * frac, self.targets[n]) for n in self.blocks}
        new = prune_per_layer(weights, self.blocks, ratios, self.feature_norms)
        for name, lm in new.items():
            prev = self._current.get(name)
            mask = lm.mask if prev is None else (lm.mask & prev.mask)  # never revive a pruned block
            module, local = name.rpartition(".")[0], name.rpartition(".")[2]
            buf = getattr(self.model.get_submodule(module), local + "_blockprune_mask")
            buf.copy_(mask.to(buf.device))
            self._current[name] = LayerMask(block=lm.block, keep=lm.keep if prev is None else lm.keep & prev.keep,
                                            mask=mask)
        self.masked.apply_masks()
        self.updates += 1
        total = sum(m.mask.numel() for m in self._current.values())
        kept = sum(int(m.mask.sum()) for m in self._current.values())
        self.history.append({"step": step, "fraction_of_target": frac, "sparsity": 1.0 - kept / max(total, 1)})
        return True

    def on_step_end(self, step: int) -> bool:
        return self.update(step)

    def masks(self) -> dict[str, LayerMask]:
        return dict(self._current)
