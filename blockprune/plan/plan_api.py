"""``blockprune plan``: the most accurate per-layer pruning that meets a latency budget on a target.

Steps: (1) the target's cost model (measured calibrate table on x86-64, a given ``--cost-table``,
``--rpc HOST:PORT``: the model's shapes timed on the board, ``cost.model.board_table``; else the
analytic model);
(2) per-layer sensitivity curves for each block of the fast set (forward passes only, cached next
to the plan); (3) per layer the options (block, ratio from the grid, the faster form) with their
predicted time and cost; (4) the knapsack search (``plan.search``) on the summed per-layer costs;
(5) the joint selection: that optimum, the same search under per-layer ratio caps and the uniform
plan of each block, all within the budget, each scored with all its layers pruned at once; of those
within one paired standard error of the least joint loss, the one with the lowest largest per-layer
ratio wins (``--selection additive`` skips it); (6) ``plan.yaml``.

Goals: ``speedup`` over onnxruntime dense on x86-64 (timed here on the model's ONNX at the
plan's thread count, or ``baseline_ms``) or over the predicted dense TVM build on cross targets;
``latency_ms``; or ``max_drop`` (least time whose predicted cost stays within it).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blockprune.errors import BlockpruneError

DEFAULT_BLOCKS = ("16x1", "4x4", "32x32")
DEFAULT_RATIOS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_SENS_RATIOS = (0.3, 0.5, 0.7, 0.9)
DEFAULT_CAPS = (0.5, 0.6, 0.7, 0.8)
SELECTIONS = ("joint", "additive")
QKV_RULE = ("Q, K and V of one encoder layer share a block shape (their rows move together in the head "
            "reorder, and a fused QKV kernel needs one block); their ratios may differ")


@dataclass
class PlanRequest:
    model: str
    output: str
    target: str = "x86-64"
    data: str | None = None
    speedup: float | None = None
    latency_ms: float | None = None
    max_drop: float | None = None
    blocks: tuple[str, ...] = DEFAULT_BLOCKS
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    sensitivity_ratios: tuple[float, ...] = DEFAULT_SENS_RATIOS
    examples: int = 128
    max_length: int = 128
    batch: int = 1
    seq: int = 128
    threads: int = 1
    baseline_ms: float | None = None
    cost_table: str | None = None
    rpc: str | None = None
    share_qkv: bool = True
    sensitivity_cache: str | None = None  # default: <plan stem>.sensitivity.json beside the plan
    selection: str = "joint"  # joint: candidates scored with all their layers pruned at once
    caps: tuple[float, ...] = DEFAULT_CAPS  # per-layer ratio caps of the joint candidates

    def goal(self) -> tuple[str, float]:
        given = [(k, v) for k, v in (("speedup", self.speedup), ("latency_ms", self.latency_ms),
                                     ("max_drop", self.max_drop)) if v is not None]
        if len(given) != 1:
            raise BlockpruneError("plan needs exactly one goal" + (f", got {len(given)}" if given else ""),
                                  "give one of --speedup S (e.g. 2), --latency-ms L or --max-drop P")
        k, v = given[0]
        if k == "speedup" and not v > 0:
            raise BlockpruneError(f"--speedup {v:g} is not positive", "give a factor such as 1.5 or 2")
        if k == "latency_ms" and not v > 0:
            raise BlockpruneError(f"--latency-ms {v:g} is not positive", "give a time in milliseconds, e.g. 20")
        return k, float(v)


@dataclass
class PlanResult:
    path: Path
    layers: list[dict[str, Any]]
    info: dict[str, Any]
    assumptions: list[str] = field(default_factory=list)


def ort_dense_ms(onnx_path: str | Path, batch: int, seq: int, threads: int, runs: int = 20) -> float:
    """Median wall ms of onnxruntime on the dense model (the x86 speed-up baseline)."""
    import onnxruntime as ort

    from blockprune.bench_timing import time_calls
    from blockprune.onnx_io import load_onnx
    from blockprune.sample_inputs import make_feeds

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    feeds = make_feeds(load_onnx(onnx_path), batch, seq)
    feeds = {i.name: feeds[i.name] for i in sess.get_inputs() if i.name in feeds}
    return time_calls(lambda: sess.run(None, feeds), runs)[0] * 1e3


def _check_target(target: str) -> None:
    from blockprune.backends.tvm.cost.hardware import CORES

    if target not in CORES:
        raise BlockpruneError(f"unknown target {target!r} for plan",
                              f"use one of the presets: {', '.join(CORES)}")


def _faster_form(cost, n: int, k: int, block: str, ratio: float, rows: int, dense_ms: float) -> tuple[float, str]:
    """(ms, form) of ``W[n, k]`` pruned at ``ratio``: BSR where the cost model says it beats ``dense_ms``."""
    t = cost.layer(n, k, block, 1.0 - ratio, rows)
    return (t.ms, t.form) if t.form == "bsr" and t.ms <= dense_ms else (dense_ms, "dense")


def layer_options(pm, curves: dict, cost, blocks, ratios, rows: int, share_qkv: bool, mixed: float = 1.0):
    """Per layer the options (block, ratio, faster form) with predicted ms and cost; ``mixed``
    multiplies every dense time (dense kernels are slower in builds that also hold BSR layers)."""
    from blockprune.frontends.allocation import _curve
    from blockprune.plan.search import Choice, LayerOptions

    out = []
    for name, (n, k) in pm.layers.items():
        role, idx = pm.roles.get(name, (None, None))
        group = f"layer{idx}.qkv" if share_qkv and role in ("q", "k", "v") else name
        dense = cost.dense_ms(n, k, rows) * mixed
        choices = []
        for b in blocks:
            c = curves.get(b)
            if c is None or name not in c.loss or cost.bsr_ms(n, k, b, 0.5, rows) is None:
                continue
            x, y = _curve(c.ratios, c.loss[name])
            for r in ratios:
                if r > max(c.ratios) + 1e-9:  # never extrapolate a sensitivity curve
                    continue
                if r == 0.0:
                    choices.append(Choice(b, 0.0, "dense", dense, 0.0))
                    continue
                ms, form = _faster_form(cost, n, k, b, r, rows, dense)
                choices.append(Choice(b, float(r), form, ms, float(np.interp(r, x, y))))
        if not choices:
            choices.append(Choice(blocks[0], 0.0, "dense", dense, 0.0))
        out.append(LayerOptions(name, group, choices, n * k))
    return out


def make_plan(req: PlanRequest, log=print) -> PlanResult:
    """Run the planner and write ``req.output`` (and its sensitivity cache beside it)."""
    from blockprune.backends.tvm.cost.model import ModelShape, analytic_error, cost_model_for
    from blockprune.blocks import BlockShape, check_sparsity
    from blockprune.plan.plan_file import write_plan
    from blockprune.plan.search import least_cost_within, least_time_within

    goal, value = req.goal()
    if req.selection not in SELECTIONS:
        raise BlockpruneError(f"unknown plan selection {req.selection!r}", f"use one of: {', '.join(SELECTIONS)}")
    _check_target(req.target)
    for b in req.blocks:
        BlockShape.parse(b)
    ratios = sorted({0.0, *(check_sparsity(r, "plan ratio") for r in req.ratios)})
    from blockprune.frontends.plan_sensitivity import (JOINT_LOSSES, LOSSES, load_plan_model, make_batches,
                                                       measure_plan_curves, read_plan_texts)

    pm = load_plan_model(req.model)
    board = _board_table(req, pm, log) if req.rpc else None
    cost = cost_model_for(req.target, req.cost_table, req.rpc, board)
    unknown = [b for b in req.blocks if b not in cost.blocks]
    if len(unknown) == len(req.blocks):
        raise BlockpruneError(f"the {req.target} cost model has no times for blocks {', '.join(req.blocks)}",
                              f"use blocks it knows: {', '.join(cost.blocks)}")
    blocks = tuple(b for b in req.blocks if b in cost.blocks)
    rows = req.batch * req.seq

    cfg = pm.loaded.config
    shape = ModelShape(int(cfg.num_hidden_layers if hasattr(cfg, "num_hidden_layers") else cfg.n_layers),
                       int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "dim")), rows)
    texts, examples, data_desc = read_plan_texts(req.data, req.examples)
    batches = make_batches(pm, texts, req.max_length, req.examples, pairs=examples)
    out = Path(req.output)
    cache = Path(req.sensitivity_cache) if req.sensitivity_cache else out.with_name(out.stem + ".sensitivity.json")
    key = {"model": pm.source, "onnx": str(pm.onnx_path) if pm.onnx_path else None, "data": data_desc,
           "examples": req.examples, "max_length": req.max_length}
    curves, cached = measure_plan_curves(pm, blocks, req.sensitivity_ratios, batches, cache, key, log=log)
    # dense layers pay the measured mixed-build factor (plans worth making hold BSR layers); an
    # all-dense result is re-priced without it below
    options = layer_options(pm, curves, cost, blocks, ratios, rows, req.share_qkv, cost.mixed_dense_factor())
    remainder = cost.remainder_ms(shape)
    dense_total = sum(cost.dense_ms(n, k, rows) for n, k in pm.layers.values()) + remainder
    mixed = cost.mixed_dense_factor()

    baseline_ms, baseline_what = None, None
    if goal == "speedup":
        if req.baseline_ms is not None:
            baseline_ms, baseline_what = float(req.baseline_ms), "given (--baseline-ms)"
        elif req.target == "x86-64":
            baseline_ms = _ort_baseline(pm, req)
            baseline_what = f"onnxruntime dense, measured here ({req.threads} thread(s), batch {req.batch} x seq {req.seq})"
        else:
            baseline_ms, baseline_what = dense_total, f"dense TVM build on {req.target}, predicted"
        budget = baseline_ms / value
    elif goal == "latency_ms":
        budget = value
    else:
        budget = None

    if budget is not None:
        linear_budget = budget - remainder
        if linear_budget <= 0:
            raise BlockpruneError(
                f"a budget of {budget:.2f} ms is below the non-linear remainder alone ({remainder:.2f} ms: attention, "
                "softmax, LayerNorm)", "ask for less (a lower --speedup or a higher --latency-ms)")
        res = least_cost_within(options, linear_budget)
        candidates: list[dict[str, Any]] = []
        if req.selection == "joint":
            res, candidates = _select_jointly(pm, options, res, curves, cost, blocks, rows, linear_budget, batches,
                                              req.caps, mixed, log)
    else:
        res = least_time_within(options, value)
        candidates = []
    predicted = res.ms + remainder
    layers = []
    for lo in options:
        c = res.choices[lo.name]
        role, idx = pm.roles.get(lo.name, (None, None))
        n, k = pm.layers[lo.name]
        layers.append({"name": lo.name, "role": role, "layer": idx, "shape": [n, k], "block": c.block,
                       "ratio": c.ratio, "form": c.form, "ms": round(c.ms, 4),
                       "dense_ms": round(cost.dense_ms(n, k, rows), 4), "cost": round(c.cost, 4)})
    if mixed != 1.0 and not any(x["form"] == "bsr" for x in layers):  # all dense: no mixing penalty
        predicted = dense_total
        for x in layers:
            x["ms"] = x["dense_ms"]
    info: dict[str, Any] = {
        "target": req.target, "goal": {goal: value}, "measured": cost.measured, "cost_model": cost.source,
        "batch": req.batch, "seq": req.seq, "threads": req.threads,
        "budget_ms": None if budget is None else round(budget, 4),
        "baseline_ms": None if baseline_ms is None else round(baseline_ms, 4), "baseline": baseline_what,
        "dense_predicted_ms": round(dense_total, 4), "remainder_ms": round(remainder, 4),
        "predicted_ms": round(predicted, 4),
        "predicted_speedup": None if baseline_ms is None else round(baseline_ms / predicted, 4),
        "predicted_speedup_over_dense_tvm": round(dense_total / predicted, 4),
        "predicted_cost": round(res.cost, 4), "cost_unit": LOSSES.get(pm.loaded.head, "proxy"),
        "cost_rule": "sum of per-layer costs, each measured with that layer alone pruned",
        "selection": (req.selection if budget is not None else "additive (a --max-drop goal is in per-layer cost "
                      "points)"),
        "candidates": candidates, "joint_unit": JOINT_LOSSES.get(pm.loaded.head, "proxy"),
        "predicted_joint_loss": next((c["joint_loss"] for c in candidates if c["selected"]), None),
        "model": req.model, "source": pm.source, "data": data_desc, "sensitivity_cache": str(cache),
        "sensitivity_cached": cached, "blocks": list(blocks), "ratios": ratios, "qkv_rule": QKV_RULE if req.share_qkv
        else "none", "overall_ratio": round(sum(x["ratio"] * x["shape"][0] * x["shape"][1] for x in layers)
                                            / max(sum(x["shape"][0] * x["shape"][1] for x in layers), 1), 4),
        "assumptions": cost.assumptions(),
    }
    if not cost.measured:
        err = analytic_error()
        info["analytic_error_on_x86"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in err.items()}
    write_plan(out, layers, info)
    return PlanResult(out, layers, info, cost.assumptions())


def uniform_candidate(pm, curves: dict, cost, block: str, rows: int, linear_budget: float, mixed: float = 1.0,
                      step: float = 0.01):
    """The paper's rule inside the planner: one block and the least uniform ratio (on a ``step`` grid,
    up to the block's largest measured ratio) whose predicted time meets ``linear_budget``; each layer
    in its faster form. None when even the largest ratio is too slow or the block divides no layer."""
    from blockprune.frontends.allocation import _curve
    from blockprune.plan.search import Choice, SearchResult

    c = curves.get(block)
    if c is None or any(name not in c.loss for name in pm.layers):
        return None
    top = max(c.ratios)
    for i in range(int(round(top / step)) + 1):
        r = round(i * step, 6)
        choices, total = {}, 0.0
        for name, (n, k) in pm.layers.items():
            dense = cost.dense_ms(n, k, rows) * mixed
            ms, form = _faster_form(cost, n, k, block, r, rows, dense) if r > 0 else (dense, "dense")
            x, y = _curve(c.ratios, c.loss[name])
            choices[name] = Choice(block, r, form, ms, float(np.interp(r, x, y)))
            total += ms
        if total <= linear_budget + 1e-9:
            return SearchResult(choices, total, sum(ch.cost for ch in choices.values()))
    return None


def _select_jointly(pm, options, additive, curves, cost, blocks, rows, linear_budget, batches, caps, mixed, log):
    """Candidates that all meet the budget — the additive optimum, the same search with each per-layer
    ratio cap, and the uniform plan of each block — scored with every layer pruned at once
    (``score_plans``). Of the candidates within one standard error of the least joint loss (paired
    bootstrap over the examples: on 128 examples a difference of a few points is noise), the one
    with the lowest largest per-layer ratio wins, then the lower loss.

    Why: the search adds per-layer costs, each measured with one layer pruned alone. On MiniLM that
    sum is blind to the joint damage of putting Q/K and whole FFNs at 0.9 (trained, such plans lost
    up to 35 STS-B points to the uniform model of the same speed). Re-measuring a handful of whole
    plans costs a few forward passes; the uniform plan is always a candidate, so the chosen plan is
    never predicted worse than the paper's rule at the same predicted time beyond that noise. Why
    the most even plan among the indistinguishable ones (Breiman's one-standard-error rule, with
    evenness as the simplicity): the joint loss is measured before any retraining, and a layer
    left with a tenth of its weights is what retraining recovered worst (plan_training_additive.md)."""
    from blockprune.frontends.plan_sensitivity import score_plans
    from blockprune.plan.plan_file import portable_name
    from blockprune.plan.search import LayerOptions, least_cost_within

    found: dict[str, Any] = {"additive": additive}
    for cap in sorted(caps):
        capped = [LayerOptions(lo.name, lo.group, [c for c in lo.choices if c.ratio <= cap + 1e-9], lo.size)
                  for lo in options]
        try:
            r = least_cost_within(capped, linear_budget)
        except BlockpruneError:
            continue  # the cap cannot meet the budget
        if r.ms <= linear_budget + 1e-9:
            found[f"additive, ratios <= {cap:g}"] = r
    for b in blocks:
        u = uniform_candidate(pm, curves, cost, b, rows, linear_budget, mixed)
        if u is not None:
            found[f"uniform {b}"] = u
    unique: dict[str, Any] = {}
    seen = set()
    for tag, r in found.items():
        sig = tuple(sorted((n, c.block if c.ratio > 0 else "-", round(c.ratio, 4)) for n, c in r.choices.items()))
        if sig not in seen:
            seen.add(sig)
            unique[tag] = r
    scores = score_plans(pm, {t: {n: (c.block, c.ratio) for n, c in r.choices.items()} for t, r in unique.items()},
                         batches, log=log)
    least = min(unique, key=lambda t: (scores[t].loss, unique[t].cost))
    se = {t: scores[t].paired_se(scores[least]) for t in unique}
    near = [t for t in unique if scores[t].loss - scores[least].loss <= se[t] + 1e-12]
    top = {t: max(c.ratio for c in unique[t].choices.values()) for t in unique}
    best = min(near, key=lambda t: (top[t], scores[t].loss))
    sizes = {n: n_out * n_in for n, (n_out, n_in) in pm.layers.items()}
    table = [{"name": t, "predicted_linear_ms": round(r.ms, 4), "additive_cost": round(r.cost, 4),
              "joint_loss": round(scores[t].loss, 4), "se_vs_least": round(se[t], 4), "within_1se": t in near,
              "max_ratio": top[t],
              "overall_ratio": round(sum(c.ratio * sizes[n] for n, c in r.choices.items()) / sum(sizes.values()), 4),
              "selected": t == best,
              # portable like the plan's own rules, so a check can re-apply every candidate
              "layers": {portable_name(n): [c.block, round(c.ratio, 4)] for n, c in r.choices.items()}}
             for t, r in unique.items()]
    return unique[best], table


def _board_table(req: PlanRequest, pm, log):
    """``--rpc``: the model's Linear shapes x ``--blocks`` timed on the board (cached beside the plan)."""
    from blockprune.backends.tvm.cost.model import board_table

    if req.cost_table:
        raise BlockpruneError("--rpc and --cost-table both given", "give one: --rpc times the board now, "
                                                                    "--cost-table reads a table timed there before")
    shapes = sorted(set(pm.layers.values()))
    out = Path(req.output)
    cache = out.with_name(out.stem + ".board.json")
    table, cached = board_table(req.target, req.rpc, shapes, req.blocks, req.batch * req.seq, cache,
                                progress=log is not None)
    if log:
        log(f"board table for {req.target} over rpc://{req.rpc}: {len(table.entries)} sweeps "
            f"({'cached in ' + str(cache) if cached else 'measured, cached in ' + str(cache)})")
    return table


def _ort_baseline(pm, req: PlanRequest) -> float:
    if pm.onnx_path is not None:
        return ort_dense_ms(pm.onnx_path, req.batch, req.seq, req.threads)
    from blockprune.models.export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dense.onnx"
        export_onnx(pm.loaded, path, exporter="dynamo")
        return ort_dense_ms(path, req.batch, req.seq, req.threads)


def plan_dict(result: PlanResult) -> dict[str, Any]:
    return {"path": str(result.path), "layers": result.layers, "info": result.info}


__all__ = ["PlanRequest", "PlanResult", "make_plan", "layer_options", "ort_dense_ms", "plan_dict",
           "DEFAULT_BLOCKS", "DEFAULT_RATIOS", "DEFAULT_CAPS", "SELECTIONS", "QKV_RULE", "uniform_candidate"]
