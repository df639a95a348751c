"""Per-layer pruning ratios from measured sensitivity.

Why: one ratio for every layer wastes accuracy. On the bundled MiniLM, pruning the FFN input
projections or the last encoder layer alone costs several times what pruning layers 0-2 costs,
so at the same overall compression a model that prunes the robust layers harder and the fragile
ones less keeps more of its behaviour.

Two steps:

1. ``measure_sensitivity``: prune each layer *alone* at a few ratios (forward passes only, the
   same block scores as the real pruning) and record how much the model's agreement with its
   unpruned self drops (``loss()``: embedding cosine distance, or logit KL, on a few hundred
   examples). Ratio 0 costs 0 by definition.
2. ``allocate``: choose per-layer ratios that remove the target fraction of all pruned-layer
   weights with the least summed predicted loss. The curves are interpolated linearly between
   measured ratios and made non-decreasing; removal is bought greedily in small steps from the
   layer whose next step costs least per removed weight (a discrete Lagrangian: every layer ends
   where its marginal cost per weight is about the same), and the last step is cut so the total
   hits the target exactly.

Summing per-layer losses assumes the damage of different layers adds up; it does not exactly,
but the ranking it produces is what matters, and the gradual schedule plus distillation recover
the interaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from blockprune.blocks import BlockShape, check_sparsity
from blockprune.errors import BlockpruneError
from blockprune.frontends.hard_prune import prune_per_layer

ALLOCATIONS = ("uniform", "sensitivity", "plan")


@dataclass
class SensitivityCurves:
    """``loss[name][i]`` is the measured loss when only ``name`` is pruned at ``ratios[i]``."""

    ratios: list[float]
    loss: dict[str, list[float]]
    sizes: dict[str, int]
    baseline: float = 0.0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"ratios": self.ratios, "loss": self.loss, "sizes": self.sizes, "baseline": self.baseline,
                "seconds": self.seconds}


@torch.no_grad()
def measure_sensitivity(model: nn.Module, blocks: Mapping[str, BlockShape | str], ratios: Sequence[float],
                        loss: Callable[[], float], feature_norms: Mapping[str, torch.Tensor] | None = None,
                        log: Callable[[str], None] | None = None) -> SensitivityCurves:
    """Prune each layer alone at each ratio (in place, restored after), calling ``loss()``.

    ``loss()`` evaluates the model as it currently is against fixed teacher outputs; the value
    with nothing pruned is subtracted, so curves start at 0."""
    import time

    ratios = sorted({check_sparsity(r, what="sensitivity ratio") for r in ratios if r > 0})
    if not ratios:
        raise BlockpruneError("no positive sensitivity ratio to measure", "give e.g. 0.3,0.5,0.7,0.9")
    t0 = time.perf_counter()
    params = dict(model.named_parameters())
    parsed = {n: BlockShape.parse(b) for n, b in blocks.items()}
    base = float(loss())
    curves: dict[str, list[float]] = {}
    for i, name in enumerate(parsed):
        w = params[name]
        saved = w.detach().clone()
        fn = {name: feature_norms[name]} if feature_norms and name in feature_norms else None
        row = []
        for r in ratios:
            m = prune_per_layer({name: saved}, {name: parsed[name]}, r, fn)
            w.copy_(saved.masked_fill(~m[name].mask.to(w.device), 0))
            row.append(max(float(loss()) - base, 0.0))
        w.copy_(saved)
        curves[name] = row
        if log:
            log(f"sensitivity {i + 1}/{len(parsed)} {name}: " + ", ".join(f"{r:g}->{v:.4f}" for r, v in zip(ratios, row)))
    return SensitivityCurves(list(ratios), curves, {n: int(params[n].numel()) for n in parsed}, base,
                             time.perf_counter() - t0)


def _curve(ratios: Sequence[float], losses: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([[0.0], np.asarray(ratios, dtype=np.float64)])
    y = np.maximum.accumulate(np.concatenate([[0.0], np.asarray(losses, dtype=np.float64)]))
    return x, y


def allocate(curves: SensitivityCurves, target: float, max_ratio: float | None = None,
             step: float = 0.01) -> dict[str, float]:
    """Per-layer ratios whose element-weighted mean is ``target``, at least predicted loss.

    Ratios stay within ``[0, max_ratio]`` (default: the largest measured ratio, so nothing is
    extrapolated). Raises when the target cannot be met under that cap."""
    target = check_sparsity(target, what="target ratio")
    cap = float(max(curves.ratios) if max_ratio is None else max_ratio)
    names = list(curves.loss)
    sizes = np.array([curves.sizes[n] for n in names], dtype=np.float64)
    if target > cap + 1e-12:
        raise BlockpruneError(f"target ratio {target:g} is above the largest per-layer ratio allowed ({cap:g})",
                              "measure sensitivity at higher ratios (e.g. add 0.95) or lower the target")
    fns = [_curve(curves.ratios, curves.loss[n]) for n in names]
    ratio = np.zeros(len(names))
    need = target * sizes.sum()
    removed = 0.0
    while removed < need - 1e-9:
        best, best_cost = -1, np.inf
        for i, (x, y) in enumerate(fns):
            if ratio[i] >= cap - 1e-12:
                continue
            nxt = min(ratio[i] + step, cap)
            cost = (np.interp(nxt, x, y) - np.interp(ratio[i], x, y)) / ((nxt - ratio[i]) * sizes[i])
            if cost < best_cost - 1e-18:
                best, best_cost = i, cost
        if best < 0:
            break
        add = min(min(ratio[best] + step, cap) - ratio[best], (need - removed) / sizes[best])
        ratio[best] += add
        removed += add * sizes[best]
    return {n: float(min(r, cap)) for n, r in zip(names, ratio)}


def predicted_loss(curves: SensitivityCurves, ratios: Mapping[str, float]) -> float:
    """Summed interpolated per-layer loss of an allocation (how ``allocate`` ranks them)."""
    total = 0.0
    for n, r in ratios.items():
        x, y = _curve(curves.ratios, curves.loss[n])
        total += float(np.interp(r, x, y))
    return total


def overall_ratio(ratios: Mapping[str, float], sizes: Mapping[str, int]) -> float:
    """Element-weighted mean ratio (= the fraction of pruned-layer weights removed)."""
    tot = sum(sizes[n] for n in ratios)
    return sum(ratios[n] * sizes[n] for n in ratios) / max(tot, 1)


def load_curves(path: str | None, key: dict) -> SensitivityCurves | None:
    """Curves cached in ``path`` for exactly ``key`` (anything else: None, measure again)."""
    import json
    from pathlib import Path

    if not path or not Path(path).is_file():
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("key") != json.loads(json.dumps(key)):
        return None
    c = data["curves"]
    return SensitivityCurves(c["ratios"], c["loss"], c["sizes"], c.get("baseline", 0.0), c.get("seconds", 0.0))


def save_curves(path: str | None, key: dict, curves: SensitivityCurves) -> None:
    """Write ``{"key", "curves"}`` to ``path`` atomically (no-op without a path)."""
    import json
    from pathlib import Path

    from blockprune.io import atomic_path

    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(path), suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps({"key": key, "curves": curves.to_json()}, indent=1) + "\n")


def plan_overrides(plan_path: str | None) -> list[tuple[str, str]]:
    """(regex, block) per layer of a ``blockprune plan`` file, for ``LayerSelection.block_overrides``."""
    if not plan_path:
        return []
    from blockprune.plan.plan_file import read_plan

    return [(r.pattern.pattern, str(r.block)) for r in read_plan(plan_path).rules if r.block is not None]


def plan_allocation(plan_path: str, names: Sequence[str], sizes: Mapping[str, int]) -> dict:
    """Per-layer ratios of a ``blockprune plan`` file (``--allocation plan``), with its predictions,
    so the run report shows planned next to achieved."""
    from blockprune.passes.prune_config import check_plan_matches
    from blockprune.plan.plan_file import read_plan

    cfg = read_plan(plan_path)
    check_plan_matches(cfg, list(names), "the model being trained")
    ratios = {n: float(cfg.resolve(n).sparsity) for n in names}
    info = cfg.plan or {}
    keep = ("target", "goal", "predicted_ms", "predicted_speedup", "predicted_cost", "cost_unit", "baseline_ms",
            "measured")
    return {"rule": "plan", "ratios": ratios, "overall": overall_ratio(ratios, sizes), "curves": None,
            "plan": {"path": str(plan_path), **{k: info.get(k) for k in keep}}}
