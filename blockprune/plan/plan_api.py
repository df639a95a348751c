"""``blockprune plan``: the most accurate per-layer pruning that meets a latency budget on a target.

Steps: (1) the target's cost model (measured calibrate table on x86-64, a given ``--cost-table``,
else the analytic model; ``--rpc`` is refused with the fix, see ``cost.model.cost_model_for``);
(2) per-layer sensitivity curves for each block of the fast set (forward passes only, cached next
to the plan); (3) per layer the options (block, ratio from the grid, the faster form) with their
predicted time and cost; (4) the knapsack search (``plan.search``); (5) ``plan.yaml``.

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
                t = cost.layer(n, k, b, 1.0 - r, rows)
                ms, form = (t.ms, t.form) if t.form == "bsr" and t.ms <= dense else (dense, "dense")
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
    _check_target(req.target)
    for b in req.blocks:
        BlockShape.parse(b)
    ratios = sorted({0.0, *(check_sparsity(r, "plan ratio") for r in req.ratios)})
    cost = cost_model_for(req.target, req.cost_table, req.rpc)
    unknown = [b for b in req.blocks if b not in cost.blocks]
    if len(unknown) == len(req.blocks):
        raise BlockpruneError(f"the {req.target} cost model has no times for blocks {', '.join(req.blocks)}",
                              f"use blocks it knows: {', '.join(cost.blocks)}")
    blocks = tuple(b for b in req.blocks if b in cost.blocks)
    rows = req.batch * req.seq

    from blockprune.frontends.plan_sensitivity import (LOSSES, load_plan_model, make_batches,
                                                       measure_plan_curves, read_plan_texts)

    pm = load_plan_model(req.model)
    cfg = pm.loaded.config
    shape = ModelShape(int(cfg.num_hidden_layers if hasattr(cfg, "num_hidden_layers") else cfg.n_layers),
                       int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "dim")), rows)
    texts, _, data_desc = read_plan_texts(req.data, req.examples)
    batches = make_batches(pm, texts, req.max_length, req.examples)
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
    else:
        res = least_time_within(options, value)
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
           "DEFAULT_BLOCKS", "DEFAULT_RATIOS", "QKV_RULE"]
