"""The planner's search: per layer a (block, ratio, form) that minimises predicted accuracy cost
under a latency budget, or time under an accuracy-cost budget. Pure numpy, no torch, no TVM.

Why a knapsack DP and not greedy: the options of one layer are not convex (a block whose kernel
is slow at high density may be the best choice at low density), and greedy marginal steps get
stuck on such curves. The time axis is cut into ``bins`` steps; every option's time is rounded
*up* to a whole step, so a plan the DP calls feasible is feasible in exact arithmetic too (the
rounding costs at most ``groups x step`` of budget, about 1%).

Shared structure: layers in one *group* must use the same block shape. The rule applied by
``plan`` is that Q, K and V of one encoder layer form a group — their rows move together when
``compress`` reorders heads (one objective block for the three), and a fused QKV kernel (as the
contrib ``Attention`` import builds) needs one block; their ratios may still differ. A group's
options are built per block by combining its members' options (Pareto-pruned after each member),
then merged over blocks; a layer at ratio 0 is dense, whatever the group's block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from blockprune.errors import BlockpruneError


@dataclass(frozen=True)
class Choice:
    """One option for one layer: pruned at ``ratio`` in ``block`` blocks, run in ``form``."""

    block: str
    ratio: float
    form: str
    ms: float  # predicted time of this layer
    cost: float  # predicted accuracy cost (points of the sensitivity proxy)


@dataclass
class LayerOptions:
    name: str
    group: str  # layers of one group share a block shape
    choices: list[Choice]
    size: int = 0  # weights (for the element-weighted ratio)


@dataclass
class SearchResult:
    choices: dict[str, Choice]
    ms: float  # summed predicted time of the searched layers
    cost: float
    frontier: list[tuple[float, float]] = field(default_factory=list)  # (ms, cost) Pareto points


def _pareto(opts: list[tuple[float, float, tuple]]) -> list[tuple[float, float, tuple]]:
    """Keep options not dominated in (time, cost); sorted by time."""
    out: list[tuple[float, float, tuple]] = []
    best = math.inf
    for t, c, what in sorted(opts, key=lambda o: (o[0], o[1])):
        if c < best - 1e-12:
            out.append((t, c, what))
            best = c
    return out


def group_options(members: list[LayerOptions]) -> list[tuple[float, float, tuple]]:
    """(time, cost, per-member Choice tuple) Pareto options of a group sharing one block."""
    blocks = sorted({c.block for m in members for c in m.choices})
    merged: list[tuple[float, float, tuple]] = []
    for b in blocks:
        acc: list[tuple[float, float, tuple]] = [(0.0, 0.0, ())]
        for m in members:
            mine = [c for c in m.choices if c.block == b or c.ratio == 0.0]
            if not mine:
                acc = []
                break
            acc = _pareto([(t + c.ms, k + c.cost, what + (c,)) for t, k, what in acc for c in mine])
        merged.extend(acc)
    return _pareto(merged)


def _groups(layers: list[LayerOptions]) -> list[tuple[list[LayerOptions], list[tuple[float, float, tuple]]]]:
    by: dict[str, list[LayerOptions]] = {}
    for layer in layers:
        by.setdefault(layer.group, []).append(layer)
    out = []
    for name, members in by.items():
        opts = group_options(members)
        if not opts:
            raise BlockpruneError(f"layer group {name!r} has no block shape every member can use",
                                  "add a block that divides all of Q/K/V's shapes to --blocks")
        out.append((members, opts))
    return out


def _steps(t: float, step: float, up: bool) -> int:
    return int(math.ceil(t / step - 1e-9)) if up else int(math.floor(t / step + 1e-9))


def _dp(groups, horizon_ms: float, bins: int, up: bool = True):
    """dp[t] = least cost with summed (rounded) time exactly t steps; backpointers per group."""
    step = horizon_ms / bins
    dp = np.full(bins + 1, np.inf)
    dp[0] = 0.0
    back = []
    for _, opts in groups:
        new = np.full(bins + 1, np.inf)
        arg = np.full(bins + 1, -1, dtype=np.int64)
        for j, (t, c, _) in enumerate(opts):
            s = _steps(t, step, up)
            if s > bins:
                continue
            cand = np.full(bins + 1, np.inf)
            cand[s:] = dp[: bins + 1 - s] + c
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        dp = new
        back.append(arg)
    return dp, back, step, up


def _walk(groups, back, step: float, t_idx: int, up: bool = True) -> dict[str, Choice]:
    out: dict[str, Choice] = {}
    for (members, opts), arg in zip(reversed(groups), reversed(back)):
        j = int(arg[t_idx])
        t, _, what = opts[j]
        for m, c in zip(members, what):
            out[m.name] = c
        t_idx -= _steps(t, step, up)
    return out


def _result(choices: dict[str, Choice], frontier: list[tuple[float, float]]) -> SearchResult:
    return SearchResult(choices, sum(c.ms for c in choices.values()), sum(c.cost for c in choices.values()), frontier)


def _frontier(dp: np.ndarray, step: float) -> list[tuple[float, float]]:
    pts, best = [], math.inf
    for i, c in enumerate(dp):
        if c < best - 1e-12:
            pts.append((i * step, float(c)))
            best = c
    return pts


def fastest_ms(layers: list[LayerOptions]) -> float:
    """The least summed time any plan can reach (each group at its fastest option)."""
    return sum(min(t for t, _, _ in opts) for _, opts in _groups(layers))


def least_cost_within(layers: list[LayerOptions], budget_ms: float, bins: int = 4000) -> SearchResult:
    """Minimise summed cost subject to summed time <= ``budget_ms``."""
    groups = _groups(layers)
    floor = sum(min(t for t, _, _ in opts) for _, opts in groups)
    if budget_ms < floor:
        raise BlockpruneError(
            f"the budget leaves {budget_ms:.2f} ms for the Linear layers, but the fastest plan the cost model "
            f"knows needs {floor:.2f} ms",
            "ask for less (a lower --speedup or a higher --latency-ms), or allow higher ratios (--ratios up to 0.95) "
            "or faster blocks (--blocks)")
    dp, back, step, up = _dp(groups, budget_ms, bins, up=False)
    choices = _walk(groups, back, step, int(np.argmin(dp)), up)
    if sum(c.ms for c in choices.values()) > budget_ms + 1e-9:  # the relaxation overshot: round up
        dp, back, step, up = _dp(groups, budget_ms, bins, up=True)
        if not np.isfinite(dp.min()):  # rounding up pushed even the fastest plan past the budget
            dp, back, step, up = _dp(groups, floor * (1 + 1e-6) + 1e-9, bins, up=True)
        choices = _walk(groups, back, step, int(np.argmin(dp)), up)
    return _result(choices, _frontier(dp, step))


def least_time_within(layers: list[LayerOptions], max_cost: float, bins: int = 4000) -> SearchResult:
    """Minimise summed time subject to summed cost <= ``max_cost``."""
    if max_cost < 0:
        raise BlockpruneError(f"--max-drop {max_cost:g} is negative", "give the accuracy cost allowed, e.g. 1.0")
    groups = _groups(layers)
    horizon = sum(max(t for t, _, _ in opts) for _, opts in groups)
    dp, back, step, up = _dp(groups, horizon * (1 + 1e-6), bins)
    ok = np.nonzero(dp <= max_cost + 1e-12)[0]
    if not ok.size:  # cannot happen while ratio 0 (cost 0) is an option; kept for custom grids
        raise BlockpruneError(f"no plan keeps the predicted cost within {max_cost:g}",
                              "raise --max-drop, or include ratio 0 in --ratios")
    return _result(_walk(groups, back, step, int(ok[0]), up), _frontier(dp, step))
