"""`blockprune plan`: search under a budget, sensitivity preference, Q/K/V sharing, the cost models,
the plan file read back by `compress --plan`, and bad input."""

from __future__ import annotations

import pytest

from blockprune.errors import BlockpruneError
from blockprune.plan.search import Choice, LayerOptions, fastest_ms, least_cost_within, least_time_within


def _synthetic(sens: dict[str, float], blocks=("16x1", "32x32"), qkv: bool = False) -> list[LayerOptions]:
    """Layers whose time falls linearly with ratio (32x32 10% faster) and whose cost is sens * ratio^2
    (32x32 twice as costly)."""
    out = []
    for name, s in sens.items():
        ch = [Choice(blocks[0], 0.0, "dense", 1.2, 0.0)]
        for b in blocks:
            for r in (0.3, 0.5, 0.7, 0.9):
                fast = 0.9 if b == "32x32" else 1.0
                ch.append(Choice(b, r, "bsr", (1.0 - r) * fast, s * r * r * (2.0 if b == "32x32" else 1.0)))
        group = name.split(".")[0] + ".qkv" if qkv and name.split(".")[1] in "qkv" else name
        out.append(LayerOptions(name, group, ch))
    return out


def test_search_respects_the_budget_and_is_optimal_on_a_small_table():
    import itertools

    layers = _synthetic({"a": 1.0, "b": 2.0, "c": 0.5})
    for budget in (3.0, 2.0, 1.5, 1.0):
        res = least_cost_within(layers, budget)
        assert res.ms <= budget + 1e-9
        assert res.ms == pytest.approx(sum(c.ms for c in res.choices.values()))
        # brute force over every combination
        best = min(sum(c.cost for c in combo) for combo in itertools.product(*(lo.choices for lo in layers))
                   if sum(c.ms for c in combo) <= budget)
        assert res.cost <= best + 0.01 * max(best, 1e-3) + 1e-9  # DP rounds times up by < 1/4000 of the budget


def test_search_prefers_insensitive_layers():
    layers = _synthetic({"robust": 0.1, "fragile": 10.0})
    res = least_cost_within(layers, 1.6)
    assert res.choices["robust"].ratio > res.choices["fragile"].ratio
    assert res.choices["fragile"].ratio == 0.0  # robust at 0.7 + fragile dense is the cheapest fit


def test_max_drop_minimises_time_within_the_cost():
    layers = _synthetic({"a": 1.0, "b": 4.0})
    res = least_time_within(layers, 0.5)
    assert res.cost <= 0.5 + 1e-9
    tighter = least_time_within(layers, 0.05)
    assert tighter.ms >= res.ms and tighter.cost <= 0.05 + 1e-9
    assert least_time_within(layers, 0.0).cost == 0.0


def test_qkv_of_one_layer_share_a_block_shape():
    # q prefers 32x32 alone (cheap there), k and v prefer 16x1: sharing forces one block for all three
    layers = []
    for role, pref in (("q", "32x32"), ("k", "16x1"), ("v", "16x1")):
        ch = [Choice("16x1", 0.0, "dense", 1.0, 0.0)]
        for b in ("16x1", "32x32"):
            for r in (0.5, 0.9):
                ch.append(Choice(b, r, "bsr", 1.0 - r, r * (0.1 if b == pref else 1.0)))
        layers.append(LayerOptions(f"0.{role}", "0.qkv", ch))
    res = least_cost_within(layers, 0.4)
    blocks = {res.choices[f"0.{r}"].block for r in "qkv" if res.choices[f"0.{r}"].ratio > 0}
    assert len(blocks) == 1
    free = least_cost_within([LayerOptions(lo.name, lo.name, lo.choices) for lo in layers], 0.4)
    assert {free.choices[f"0.{r}"].block for r in "qkv"} == {"32x32", "16x1"}
    assert free.cost <= res.cost


def test_impossible_budget_is_one_clear_error():
    layers = _synthetic({"a": 1.0, "b": 1.0})
    floor = fastest_ms(layers)
    with pytest.raises(BlockpruneError) as e:
        least_cost_within(layers, floor * 0.5)
    assert "fastest plan" in e.value.problem and "--speedup" in e.value.fix


def test_measured_cost_model_is_monotone_and_matches_the_table():
    from blockprune.backends.tvm.cost.calibrate import default_break_even_table
    from blockprune.backends.tvm.cost.model import MeasuredCost, isotonic

    assert list(isotonic([1, 3, 2, 4])) == [1, 2.5, 2.5, 4]
    table = default_break_even_table()
    cost = MeasuredCost(table)
    e = next(x for x in table.entries if (x.n, x.k, x.block) == (3072, 768, "16x1"))
    assert cost.dense_ms(3072, 768, 128) == pytest.approx(e.dense_ms * cost.in_model_factor(None))
    times = [cost.bsr_ms(3072, 768, "16x1", d, 128) for d in (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)]
    assert times == sorted(times)
    assert cost.bsr_ms(3072, 768, "16x1", 0.2, 256) == pytest.approx(2 * cost.bsr_ms(3072, 768, "16x1", 0.2, 128))
    lt = cost.layer(3072, 768, "16x1", 0.2, 128)
    assert lt.form == "bsr" and lt.ms < lt.dense_ms
    assert cost.layer(3072, 768, "16x1", 1.0, 128).form == "dense"


def test_cost_model_follows_the_tables_vector_unit():
    """Remainder and mixed-build factor come from the host class the table was measured on: the
    Zen 3 (AVX2) builds ran dense kernels 1.6x slower beside BSR ones, the AVX-512 Xeon's did not."""
    from blockprune.backends.tvm.cost.calibrate import default_break_even_table
    from blockprune.backends.tvm.cost.model import AnalyticCost, MeasuredCost, ModelShape

    zen3, xeon = MeasuredCost(default_break_even_table("avx2")), MeasuredCost(default_break_even_table("avx512"))
    assert (zen3.isa, xeon.isa) == ("avx2", "avx512")
    assert zen3.mixed_dense_factor() == pytest.approx(1.6) and xeon.mixed_dense_factor() == pytest.approx(1.0)
    minilm = ModelShape(6, 384, 128)
    assert xeon.remainder_ms(minilm) < zen3.remainder_ms(minilm)
    assert xeon.dense_ms(1536, 384, 128) < zen3.dense_ms(1536, 384, 128)
    # in-model factors (measured on the Xeon from compiled-model kernel shares; none on the Zen 3)
    assert zen3.in_model_factor(None) == 1.0 and zen3.in_model_factor("16x1") == 1.0
    assert xeon.in_model_factor(None) > 1.0 and xeon.in_model_factor("16x1") > xeon.in_model_factor("1x32") > 1.0
    e = next(x for x in xeon.table.entries if (x.n, x.k, x.block) == (384, 384, "16x1"))
    assert xeon.bsr_ms(384, 384, "16x1", 0.5, 128) == pytest.approx(e.sweep_ms["0.5"] * xeon.in_model_factor("16x1"))
    # the analytic model fits its efficiencies against the host core the table came from
    a_zen3 = AnalyticCost("cortex-a72", host_table=default_break_even_table("avx2"))
    a_xeon = AnalyticCost("cortex-a72", host_table=default_break_even_table("avx512"))
    assert a_xeon.isa == "avx512" and a_zen3.isa == "avx2"
    assert 0 < a_xeon.eff.dense < 1 and 0 < a_zen3.eff.dense < 1


def test_analytic_model_states_its_assumptions_and_error():
    from blockprune.backends.tvm.cost.model import AnalyticCost, analytic_error, cost_model_for

    err = analytic_error()
    assert 0 < err["all_mean_abs_rel"] < 0.5 and err["points"] > 100
    a72 = cost_model_for("cortex-a72")
    assert isinstance(a72, AnalyticCost) and not a72.measured
    text = " ".join(a72.assumptions())
    assert "GFLOP/s" in text and "L2" in text and "fitted" in text
    # a slower core than the host, and sparse is faster than dense
    assert a72.dense_ms(768, 768, 128) > cost_model_for("x86-64").dense_ms(768, 768, 128)
    assert a72.layer(768, 768, "16x1", 0.3, 128).form == "bsr"


def test_rpc_and_unknown_target_name_the_fix(tmp_path):
    from blockprune.backends.tvm.cost.model import cost_model_for
    from blockprune.plan.plan_api import PlanRequest, make_plan

    with pytest.raises(BlockpruneError) as e:  # a board table is measured by plan itself, not here
        cost_model_for("cortex-a72", rpc="10.0.0.2:9090")
    assert "board" in e.value.problem and "--cost-table" in e.value.fix and "calibrate" in e.value.fix
    with pytest.raises(BlockpruneError) as e:  # nobody listens there: one clear error, nothing written
        make_plan(PlanRequest("bert-tiny", str(tmp_path / "p.yaml"), target="cortex-a72", rpc="127.0.0.1:1",
                              latency_ms=5.0))
    assert "127.0.0.1:1" in e.value.problem and not list(tmp_path.iterdir())
    with pytest.raises(BlockpruneError) as e:
        make_plan(PlanRequest("bert-tiny", str(tmp_path / "p.yaml"), target="cortex-a72", rpc="board-no-port",
                              latency_ms=5.0))
    assert "HOST:PORT" in e.value.problem
    with pytest.raises(BlockpruneError) as e:  # refused before anything is loaded or measured
        make_plan(PlanRequest("bert-tiny", str(tmp_path / "p.yaml"), latency_ms=5.0, selection="best"))
    assert "best" in e.value.problem and "joint" in e.value.fix and not list(tmp_path.iterdir())
    with pytest.raises(BlockpruneError) as e:
        make_plan(PlanRequest("bert-tiny", str(tmp_path / "p.yaml"), target="cortex-x9", speedup=2.0))
    assert "cortex-x9" in e.value.problem and "cortex-a72" in e.value.fix
    with pytest.raises(BlockpruneError) as e:
        make_plan(PlanRequest("bert-tiny", str(tmp_path / "p.yaml"), speedup=2.0, latency_ms=3.0))
    assert "exactly one goal" in e.value.problem


@pytest.fixture(scope="module")
def tiny_plan(exports, tmp_path_factory):
    """A real plan on bert-tiny (random tokens), written once."""
    from blockprune.plan.plan_api import PlanRequest, make_plan

    path = exports.path("bert-tiny")
    out = tmp_path_factory.mktemp("plan") / "plan.yaml"
    req = PlanRequest(str(path), str(out), latency_ms=0.45, examples=16, sensitivity_ratios=(0.5, 0.9),
                      ratios=(0.0, 0.5, 0.7, 0.9))
    return req, make_plan(req, log=None)


def test_plan_on_a_tiny_model_meets_its_budget_and_caches_the_curves(tiny_plan):
    import time

    from blockprune.plan.plan_api import make_plan

    req, res = tiny_plan
    info = res.info
    assert info["predicted_ms"] <= 0.45 + 1e-6 and info["measured"] is True
    assert res.path.is_file() and (res.path.parent / "plan.sensitivity.json").is_file()
    assert len(res.layers) == 12  # 2 encoder layers x 6 Linears
    for layer in (0, 1):  # the rule the plan states
        blocks = {x["block"] for x in res.layers if x["layer"] == layer and x["role"] in "qkv" and x["ratio"] > 0}
        assert len(blocks) <= 1
    t = time.perf_counter()
    again = make_plan(req, log=None)
    assert again.info["sensitivity_cached"] and time.perf_counter() - t < 30
    assert again.layers == res.layers


def test_joint_selection_scores_whole_plans_within_the_budget(tiny_plan, tmp_path):
    """The written plan is the candidate of least joint loss; every candidate meets the budget; the
    uniform plan is always among them (so a plan is never predicted worse than the paper's rule)."""
    from dataclasses import replace

    from blockprune.plan.plan_api import make_plan

    req, first = tiny_plan
    tight = first.info["dense_predicted_ms"] * 0.75  # a budget that needs real pruning
    res = make_plan(replace(req, output=str(tmp_path / "tight.yaml"), latency_ms=tight,
                            sensitivity_cache=str(first.path.parent / "plan.sensitivity.json")), log=None)
    info = res.info
    assert info["sensitivity_cached"] and info["predicted_ms"] <= tight + 1e-6
    cands = info["candidates"]
    assert info["selection"] == "joint" and len(cands) >= 2
    assert any(c["name"].startswith("uniform ") for c in cands)
    linear_budget = info["budget_ms"] - info["remainder_ms"]
    assert all(c["predicted_linear_ms"] <= linear_budget + 1e-6 for c in cands)
    chosen = [c for c in cands if c["selected"]]
    least = min(c["joint_loss"] for c in cands)
    near = [c for c in cands if c["within_1se"]]
    # the rule: the most even plan among those within one paired standard error of the least loss
    assert len(chosen) == 1 and chosen[0]["within_1se"]
    assert all(c["joint_loss"] - least <= c["se_vs_least"] + 1e-3 for c in near)
    assert chosen[0]["max_ratio"] == min(c["max_ratio"] for c in near)
    assert info["predicted_joint_loss"] == chosen[0]["joint_loss"]
    assert max(x["ratio"] for x in res.layers) == pytest.approx(chosen[0]["max_ratio"])
    assert info["overall_ratio"] == pytest.approx(chosen[0]["overall_ratio"], abs=1e-3)


def test_joint_score_grows_with_pruning_and_restores_the_weights():
    """score_plans prunes every layer of a candidate at once and puts the weights back."""
    import torch

    from blockprune.frontends.plan_sensitivity import load_plan_model, make_batches, score_plans

    pm = load_plan_model("bert-tiny")
    before = {n: p.detach().clone() for n, p in pm.loaded.model.named_parameters()}
    batches = make_batches(pm, None, 32, 16)
    plans = {f"r{r}": {n: ("4x4", r) for n in pm.layers} for r in (0.0, 0.3, 0.9)}
    scores = score_plans(pm, plans, batches)
    assert scores["r0.0"].loss == pytest.approx(0.0, abs=1e-6)
    assert scores["r0.9"].loss > scores["r0.3"].loss > 0.0
    # paired resamples: a plan against itself has no spread; the two plans' difference has some
    assert scores["r0.3"].paired_se(scores["r0.3"]) == 0.0 and scores["r0.9"].paired_se(scores["r0.3"]) > 0.0
    assert len(scores["r0.9"].replicates) == 200
    for n, p in pm.loaded.model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_impossible_latency_on_a_real_model(tiny_plan, tmp_path):
    from blockprune.plan.plan_api import PlanRequest, make_plan

    req, _ = tiny_plan
    bad = PlanRequest(req.model, str(tmp_path / "p.yaml"), latency_ms=0.05, examples=16,
                      sensitivity_ratios=req.sensitivity_ratios, ratios=req.ratios,
                      sensitivity_cache=str(req.output).replace(".yaml", ".sensitivity.json"))
    with pytest.raises(BlockpruneError) as e:
        make_plan(bad, log=None)
    assert "remainder" in e.value.problem or "fastest plan" in e.value.problem


def test_plan_round_trips_through_compress(tiny_plan, exports, tmp_path):
    from blockprune.compress_api import compress_file
    from blockprune.onnx_io import get_meta
    from blockprune.passes.find_weights import find_weights
    from blockprune.plan.plan_file import read_plan

    req, res = tiny_plan
    cfg = read_plan(res.path)
    out = compress_file(req.model, tmp_path / "small.onnx", prune=cfg, reorder=False)
    layers = get_meta(out.model, "layers", {})
    names = {w.initializer: w.display_name for w in find_weights(out.model)}
    planned = {x["name"]: x for x in res.layers}
    seen = 0
    for init, info in layers.items():
        name = names.get(init, init)
        if name not in planned:
            continue
        p = planned[name]
        block_elems = int(p["block"].split("x")[0]) * int(p["block"].split("x")[1])
        assert info.get("sparsity", 0.0) == pytest.approx(p["ratio"], abs=block_elems / (p["shape"][0] * p["shape"][1]))
        if p["ratio"] > 0:
            assert info["form"].endswith(p["form"]) and info["block"] == p["block"]
        seen += 1
    assert seen == sum(1 for x in res.layers if x["ratio"] > 0) or seen == len(res.layers)


def test_cli_plan_for_a_cross_target_says_unmeasured(exports, tmp_path, capsys):
    from blockprune.cli import main

    path = exports.path("bert-tiny")
    rc = main(["plan", str(path), "-o", str(tmp_path / "a72.yaml"), "--target", "cortex-a72", "--max-drop", "5",
               "--examples", "16", "--sensitivity-ratios", "0.5,0.9", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "unmeasured" in out.lower() and "GFLOP/s" in out
    rc = main(["compress", str(path), "-o", str(tmp_path / "small.onnx"), "--plan", str(tmp_path / "a72.yaml")])
    assert rc == 0 and "planned vs achieved" in capsys.readouterr().out
    assert main(["compress", str(path), "-o", str(tmp_path / "x.onnx"), "--plan", str(tmp_path / "a72.yaml"),
                 "--sparsity", "0.5"]) == 2


def test_train_reads_the_plan(tiny_plan, glue_dir):
    """`train --plan`: the recipe's layer selection takes the plan's blocks, its allocation the plan's ratios."""
    from blockprune.frontends.allocation import plan_allocation
    from blockprune.frontends.hard_prune import select_layers
    from blockprune.frontends.train_cli import config_from_args
    from blockprune.models.zoo import load_model
    import argparse

    _, res = tiny_plan
    from blockprune.cli import build_parser

    args = build_parser().parse_args(["train", "--model", "bert-tiny", "--task", "mrpc", "--data-dir",
                                      str(glue_dir / "MRPC"), "--out", "unused", "--plan", str(res.path)])
    cfg = config_from_args(args)
    assert cfg.allocation == "plan" and cfg.plan_file == str(res.path)
    cfg.validate()
    assert "plan_file" not in type(cfg)(model="bert-tiny").fingerprint()  # old runs resume unchanged
    model = load_model("bert-tiny", head="classification").model
    layers = select_layers(model, cfg.selection())
    alloc = plan_allocation(cfg.plan_file, list(layers), {n: 1 for n in layers})
    planned = {x["name"]: x for x in res.layers}
    for name, block in layers.items():
        hf = name.split("bert.", 1)[-1]
        if hf in planned:
            assert alloc["ratios"][name] == pytest.approx(planned[hf]["ratio"])
            assert str(block) == planned[hf]["block"]
    assert alloc["plan"]["predicted_ms"] == res.info["predicted_ms"]
    assert isinstance(args, argparse.Namespace)


def _bench(name: str):
    """A script under benchmarks/ imported as a module (they are not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_same_speed_uniform_ratio_interpolates_measured_rows():
    """The uniform model a plan is trained against is the one of the same *measured* speed."""
    fig = _bench("plan_figure")
    uniform = [{"uniform_ratio": r, "measured_speedup": su} for r, su in ((0.3, 1.3), (0.5, 1.8), (0.7, 2.6))]
    rows = fig.same_speed_uniform([{"measured_speedup": 1.55}, {"measured_speedup": 2.2},
                                   {"measured_speedup": 3.0}], uniform)
    assert [r["uniform_ratio"] for r in rows] == [pytest.approx(0.4), pytest.approx(0.6), None]


def test_uniform_partner_at_the_goal_speed():
    """--uniform-at-goal: the partner's ratio comes from the timed uniform rows at the plan's goal."""
    pt = _bench("plan_training")
    ref = {"uniform": [{"uniform_ratio": r, "measured_speedup": su} for r, su in ((0.4, 1.4), (0.6, 2.0), (0.7, 2.5))]}
    assert pt.uniform_at_goal(ref, 1.7) == pytest.approx(0.5)
    assert pt.uniform_at_goal(ref, 2.5) == pytest.approx(0.7)
    assert pt.uniform_at_goal(ref, 3.0) is None


def test_plan_training_report_pairs_planned_and_uniform(tmp_path):
    """Resumable results: cells added under the lock, the table pairs each plan with its uniform
    model and states the difference; a missing partner shows as running, not as a number."""
    pt = _bench("plan_training")
    out = tmp_path / "pt.json"
    settings = {"epochs_teacher": 3, "epochs_gradual": 2, "epochs_retrain": 1, "lr": 2e-5, "batch_size": 32,
                "distill": 0.5, "distill_hidden": 1.0}
    pt._update(out, "MRPC|teacher", {"task": "MRPC", "kind": "teacher", "metric": 0.85}, settings=settings)
    for kind, goal, metric, ratio in (("plan", 1.5, 0.84, None), ("uniform", 1.5, 0.83, 0.32), ("plan", 2.0, 0.80, None)):
        pt._update(out, f"MRPC|{kind}|{goal:g}", {"task": "MRPC", "kind": kind, "goal": goal, "metric": metric,
                                                  "uniform_ratio": ratio, "plan_overall_ratio": 0.2,
                                                  "measured_speedup": 1.36 if kind == "plan" else None})
    with pt._locked(out):  # what --time adds to a cell
        data = pt._load(out)
        data["cells"]["MRPC|plan|1.5"]["trained_timing"] = {"speedup": 1.41}
        pt._save(out, data)
    md = out.with_suffix(".md").read_text()
    assert "| MRPC | 1.5x | 1.36x / 1.41x / - | 85.00 | 84.00 (0.20) | 83.00 (0.320) | - | +1.00 |" in md
    assert "| MRPC | 2x | 1.36x / - / - | 85.00 | 80.00 (0.20) | running | - | - |" in md
    assert "- MRPC: teacher 3, gradual 2 + retrain 1" in md
    assert "1 of 1 pairs" in md
    assert set(pt._load(out)["cells"]) == {"MRPC|teacher", "MRPC|plan|1.5", "MRPC|uniform|1.5", "MRPC|plan|2"}


def test_plan_patterns_are_stack_relative():
    """A plan made on a task model's graph (``bert.encoder...``) applies to the bare encoder's and back."""
    import re

    from blockprune.plan.plan_file import layer_pattern, portable_name

    assert portable_name("bert.encoder.layer.0.attention.self.query.weight") == \
        "encoder.layer.0.attention.self.query.weight"
    assert portable_name("distilbert.transformer.layer.1.ffn.lin1.weight") == "transformer.layer.1.ffn.lin1.weight"
    assert portable_name("encoder.layer.3.output.dense.weight") == "encoder.layer.3.output.dense.weight"
    pat = re.compile(layer_pattern("bert.encoder.layer.0.attention.self.query.weight"))
    assert pat.search("encoder.layer.0.attention.self.query.weight")
    assert pat.search("roberta.encoder.layer.0.attention.self.query.weight")
    assert not pat.search("encoder.layer.10.attention.self.query.weight")


def test_plan_of_another_model_is_refused_and_nothing_written(exports, tmp_path, capsys):
    """Without the check every layer fell through to the plan's default ratio 0: a silently dense
    'compressed' model."""
    from blockprune.cli import main
    from blockprune.passes.prune_config import check_plan_matches
    from blockprune.plan.plan_file import read_plan, write_plan

    plan = write_plan(tmp_path / "other.yaml",
                      [{"name": "other.blocks.0.mlp.fc1.weight", "block": "16x1", "ratio": 0.5, "form": "bsr"}],
                      {"target": "x86-64", "predicted_ms": 1.0})
    with pytest.raises(BlockpruneError) as e:
        check_plan_matches(read_plan(plan), ["encoder.layer.0.attention.self.query.weight"], "this model")
    assert "match no layer" in e.value.problem and "plan this model" in e.value.fix
    out = tmp_path / "c.onnx"
    assert main(["compress", str(exports.path("bert-tiny", "legacy")), "-o", str(out), "--plan", str(plan)]) == 2
    assert "match no layer" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("c.onnx*"))


def test_sync_speeds_fills_the_trained_plans_timing(tmp_path):
    """--sync-speeds: a plan cell trained before its plan was timed gets the measured speed-up, the
    same-speed uniform ratio and the selected candidate; a plan that is not the trained one is refused."""
    pt = _bench("plan_training")
    out = tmp_path / "pt.json"
    for goal, ratio in ((1.5, 0.41), (2.0, 0.66)):
        pt._update(out, f"STS-B|plan|{goal:g}", {"task": "STS-B", "kind": "plan", "goal": goal, "metric": 0.8,
                                                 "plan_overall_ratio": ratio, "measured_speedup": None})
    timed = {"date": "d", "machine": "m", "rows": [
        {"speedup_goal": 1.5, "overall_ratio": 0.41, "measured_speedup": 1.57, "uniform_ratio": 0.458,
         "candidates": [{"name": "additive, ratios <= 0.8", "selected": True}]},
        {"speedup_goal": 2.0, "overall_ratio": 0.66, "measured_speedup": 2.23, "uniform_ratio": 0.656,
         "candidates": [{"name": "additive", "selected": False}, {"name": "uniform 16x1", "selected": True}]}]}
    pt.sync_speeds(out, "STS-B", timed)
    cells = pt._load(out)["cells"]
    assert cells["STS-B|plan|1.5"]["measured_speedup"] == 1.57
    assert cells["STS-B|plan|2"]["plan_selected"] == "uniform 16x1"
    md = out.with_suffix(".md").read_text()
    assert "| STS-B | 1.5x | 1.57x / - / - | - | 80.00 (0.41; additive, ratios <= 0.8) | running | 0.458 | - |" in md
    assert "| the plan |" in md
    timed["rows"][0]["overall_ratio"] = 0.5
    with pytest.raises(SystemExit):
        pt.sync_speeds(out, "STS-B", timed)
