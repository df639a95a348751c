"""``blockprune plan`` on the command line, and the planned-vs-achieved tables of ``compress``/``bench``."""

from __future__ import annotations

import argparse
from typing import Any

from blockprune.errors import BlockpruneError


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise BlockpruneError(f"{text!r} is not a comma-separated list of numbers", "e.g. 0,0.3,0.5,0.7,0.9")


def cmd_plan(args: argparse.Namespace) -> int:
    from blockprune.console import console, kv_table
    from blockprune.plan.plan_api import PlanRequest, make_plan

    req = PlanRequest(model=args.model, output=args.output, target=args.target, data=args.data,
                      speedup=args.speedup, latency_ms=args.latency_ms, max_drop=args.max_drop,
                      blocks=tuple(b.strip() for b in args.blocks.split(",") if b.strip()),
                      ratios=_floats(args.ratios), sensitivity_ratios=_floats(args.sensitivity_ratios),
                      examples=args.examples, max_length=args.max_length, batch=args.batch, seq=args.seq,
                      threads=args.threads, baseline_ms=args.baseline_ms, cost_table=args.cost_table, rpc=args.rpc,
                      share_qkv=not args.no_share_qkv, sensitivity_cache=args.sensitivity_cache,
                      selection=args.selection, caps=_floats(args.caps))
    res = make_plan(req, log=None if args.quiet else console.print)
    console.print(plan_table(res.layers, res.info))
    info = res.info
    if info.get("candidates"):
        console.print(candidates_table(info))
    rows = [("plan", str(res.path)), ("target", info["target"]),
            ("cost model", info["cost_model"] + ("" if info["measured"] else "  [UNMEASURED: analytic predictions]")),
            ("goal", ", ".join(f"{k} {v:g}" for k, v in info["goal"].items()))]
    if info["baseline_ms"] is not None:
        rows.append(("baseline", f"{info['baseline_ms']:.2f} ms ({info['baseline']})"))
    rows += [("predicted whole-model time", f"{info['predicted_ms']:.2f} ms (Linear layers "
                                            f"{info['predicted_ms'] - info['remainder_ms']:.2f} + remainder "
                                            f"{info['remainder_ms']:.2f})"),
             ("predicted dense TVM time", f"{info['dense_predicted_ms']:.2f} ms")]
    if info["predicted_speedup"] is not None:
        rows.append(("predicted speed-up", f"{info['predicted_speedup']:.2f}x over the baseline"))
    rows += [("predicted accuracy cost", f"{info['predicted_cost']:.3f} ({info['cost_unit']}; {info['cost_rule']})"),
             ("overall ratio", f"{info['overall_ratio']:.3f} of the Linear weights removed"),
             ("sensitivity", f"{info['sensitivity_cache']} ({'cached' if info['sensitivity_cached'] else 'measured'}; "
                             f"{info['data']})"),
             ("shared structure", info["qkv_rule"])]
    for i, a in enumerate(info["assumptions"]):
        rows.append(("assumptions" if i == 0 else "", a))
    if "analytic_error_on_x86" in info:
        e = info["analytic_error_on_x86"]
        rows.append(("analytic model vs x86 measurement", f"mean |error| dense {100 * e['dense_mean_abs_rel']:.0f}%, "
                                                          f"BSR {100 * e['bsr_mean_abs_rel']:.0f}% ({e['points']} points)"))
    console.print(kv_table("plan", rows))
    if not info["measured"]:
        console.print(f"[bold yellow]These predictions are unmeasured[/]: no board timings for {info['target']}. "
                      "Measure on the board (`blockprune calibrate` there, then `plan --cost-table FILE`) or check "
                      "the plan with `blockprune bench ARTIFACT --rpc HOST:PORT --plan PLAN`.")
    return 0


def plan_table(layers: list[dict[str, Any]], info: dict[str, Any]):
    from rich.table import Table

    from blockprune.console import short_name

    t = Table(title=f"plan for {info['target']} ({'measured' if info['measured'] else 'analytic, unmeasured'} cost model)")
    for col in ("layer", "shape", "block", "ratio", "form", "dense ms", "planned ms", "acc. cost"):
        t.add_column(col, justify="left" if col in ("layer", "block", "form") else "right")
    for x in layers:
        t.add_row(short_name(x["name"]), f"{x['shape'][0]}x{x['shape'][1]}", x["block"] if x["ratio"] > 0 else "-",
                  f"{x['ratio']:.2f}", x["form"], f"{x['dense_ms']:.3f}", f"{x['ms']:.3f}", f"{x['cost']:.3f}")
    t.add_row("remainder", "", "", "", "", f"{info['remainder_ms']:.3f}", f"{info['remainder_ms']:.3f}", "")
    t.add_row("[bold]total", "", "", f"{info['overall_ratio']:.2f}", "", f"{info['dense_predicted_ms']:.2f}",
              f"[bold]{info['predicted_ms']:.2f}", f"[bold]{info['predicted_cost']:.3f}")
    return t


def candidates_table(info: dict[str, Any]):
    """The whole plans the joint selection compared, all within the budget."""
    from rich.table import Table

    t = Table(title=f"candidate plans (joint loss: {info['joint_unit']})")
    for col in ("candidate", "predicted Linear ms", "summed per-layer cost", "joint loss", "paired SE",
                "max ratio", "overall ratio", ""):
        t.add_column(col, justify="left" if col in ("candidate", "") else "right")
    for c in info["candidates"]:
        mark = "[bold]selected" if c["selected"] else ("within 1 SE" if c.get("within_1se") else "")
        t.add_row(c["name"], f"{c['predicted_linear_ms']:.2f}", f"{c['additive_cost']:.2f}", f"{c['joint_loss']:.3f}",
                  f"{c.get('se_vs_least', 0.0):.3f}", f"{c['max_ratio']:.2f}", f"{c['overall_ratio']:.3f}", mark)
    return t


def planned_vs_achieved(plan_cfg, model) -> tuple[Any, list[str]]:
    """Table: per layer the plan's ratio and form next to what the compressed model holds."""
    from rich.table import Table

    from blockprune.console import short_name
    from blockprune.onnx_io import get_meta

    planned = (plan_cfg.plan or {}).get("layers", {})
    layers = get_meta(model, "layers", {}) or {}
    by_hf = {}
    pm = get_meta(model, "param_map", {}) or {}
    for hf in pm:
        by_hf[hf] = layers.get(hf, {})
    t = Table(title="planned vs achieved (compressed model)")
    for col in ("layer", "planned ratio", "achieved ratio", "planned form", "achieved form"):
        t.add_column(col, justify="left" if "form" in col or col == "layer" else "right")
    mismatches = []
    for name, p in planned.items():
        got = by_hf.get(name) or layers.get(name) or {}
        ach = got.get("sparsity", 0.0) or 0.0
        form = got.get("form", "dense")
        if abs(ach - p["ratio"]) > 0.02 or (p["ratio"] > 0 and p["form"] not in form):
            mismatches.append(name)
        t.add_row(short_name(name), f"{p['ratio']:.2f}", f"{ach:.2f}", p["form"], form)
    return t, mismatches


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="per-layer blocks and ratios that meet a latency budget on a target, "
                                    "with the least predicted accuracy cost")
    p.add_argument("model", help="ONNX from `blockprune export`, 'minilm', a named config or a local HF directory")
    p.add_argument("-o", "--output", default="plan.yaml", help="plan file (default plan.yaml); the sensitivity "
                                                               "cache is written beside it")
    p.add_argument("--data", help="a GLUE task folder (e.g. ../shared/data/glue/STS-B) or a text file, one sentence "
                                  "per line (encoder models); default random tokens")
    p.add_argument("--target", default="x86-64", help="x86-64, aarch64, cortex-a53, cortex-a72, cortex-a76, "
                                                      "android-arm64")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--speedup", type=float, help="x over onnxruntime dense (x86-64) or the dense TVM build (cross)")
    g.add_argument("--latency-ms", type=float, help="whole-model time budget in ms")
    g.add_argument("--max-drop", type=float, help="largest predicted accuracy cost allowed (proxy points)")
    p.add_argument("--blocks", default="16x1,4x4,32x32", help="block shapes to choose from (the fast set)")
    p.add_argument("--ratios", default="0,0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="per-layer ratio grid")
    p.add_argument("--sensitivity-ratios", default="0.3,0.5,0.7,0.9", help="ratios measured per layer and block")
    p.add_argument("--examples", type=int, default=128, help="sentences / examples for the sensitivity")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="threads of the timed baseline (the tables are 1-thread)")
    p.add_argument("--baseline-ms", type=float, help="the speed-up baseline in ms (default: measured / predicted)")
    p.add_argument("--cost-table", help="a `blockprune calibrate` JSON measured on the target")
    p.add_argument("--rpc", metavar="HOST:PORT", help="time the model's Linear shapes on a board through its TVM RPC "
                                                      "server (cached in PLAN.board.json) and plan on those times")
    p.add_argument("--sensitivity-cache", help="JSON of measured curves (default: PLAN.sensitivity.json beside the "
                                               "plan); reused when model, data and grid match")
    p.add_argument("--selection", choices=("joint", "additive"), default="joint",
                   help="joint (default): the additive optimum, its capped variants and the uniform plans, each "
                        "scored with all its layers pruned at once (the most even plan within one standard error of "
                        "the least joint loss wins); additive: the summed per-layer costs alone")
    p.add_argument("--caps", default="0.5,0.6,0.7,0.8", help="per-layer ratio caps of the joint candidates")
    p.add_argument("--no-share-qkv", action="store_true", help="let Q, K, V of a layer take different blocks")
    p.add_argument("--quiet", action="store_true", help="no per-layer sensitivity log")
    p.set_defaults(func=cmd_plan)
