"""The recipe of ``design/method.md`` (and its improvements) as one resumable run on GLUE data.

    dense fine-tuning -> [reweighted group Lasso | gradual pruning] -> (hard prune +) masked retraining

``run_recipe(RecipeConfig(...))`` does all of it and writes, under ``out/``:

* ``model/``: the pruned Hugging Face checkpoint (``save_pretrained`` + tokenizer);
* ``model.onnx``: that model exported (weights named after HF parameters);
* ``masks.safetensors``: the block masks keyed by the ONNX initializer names, each in its
  initializer's layout, so ``blockprune prune model.onnx --masks masks.safetensors`` applies them;
  its metadata carries the per-layer ratios (``allocation``);
* ``report.json``: metric before/after every stage, per-layer density, compression rate as the
  paper counts it, group-norm statistics, the group-Lasso refresh log (fraction of groups at
  zero, pruned/kept norm ratio), the allocation and its sensitivity curves, timings and the config;
* ``checkpoints/<stage>/`` and ``state.json``: one checkpoint per finished stage, so a run that
  was interrupted resumes at the first unfinished stage (a stage is the unit of resumption).

This module only wires the stages and keeps the books; the pieces live in their own modules:
``recipe_config`` (settings and validation), ``data`` (GLUE splits, batching, calibration
slice), ``stages`` (the training loop, evaluation), ``run_state`` (state.json, checkpoints),
``outputs`` (export, masks, statistics), ``importance`` (activation-aware scores), ``gradual``
(cubic schedule), ``allocation`` (per-layer ratios from sensitivity). Their public names are
re-exported here.

``method="magnitude"`` is the one-shot baseline: the dense weights are pruned by block score
(activation-aware by default) and the same masked-retraining budget follows.
``method="gradual"`` raises sparsity on a cubic schedule during the sparse stage, then retrains
with the masks fixed; with ``distill``/``distill_hidden`` both stages learn from the dense model.
``method="transfer"`` retrains, masks fixed, from the encoder of an already pruned run
(``sparse_init.py``), distilled from the dense fine-tuned model.

Every check on user input (task, data files and their rows, block vs layer shapes, ratio, mode,
an out dir holding a different run) happens before the out dir is created or a step is taken.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blockprune.blocks import BlockShape
from blockprune.errors import BlockpruneError
from blockprune.frontends.allocation import (allocate, load_curves, measure_sensitivity, overall_ratio, plan_allocation,
                                             save_curves)
from blockprune.frontends.data import (  # noqa: F401  (re-exported)
    LengthGroupedBatches,
    TaskData,
    TokenizedData,
    read_task_data,
    resolve_data_dir,
)
from blockprune.frontends.distill import frozen_teacher
from blockprune.frontends.glue import TaskSpec
from blockprune.frontends.gradual import CubicSchedule, GradualPruner
from blockprune.frontends.hard_prune import LayerMask, hard_prune, select_layers
from blockprune.frontends.importance import collect_feature_norms
from blockprune.frontends.masked import MaskedTraining, verify_masked
from blockprune.frontends.outputs import (  # noqa: F401  (re-exported)
    _fmt,
    _print_summary,
    build_maskset,
    check_onnx_zeros,
    compression_stats,
    export_outputs,
    norm_split,
    snapshot_group_norms,
)
from blockprune.frontends.recipe_config import (  # noqa: F401  (re-exported)
    HEAD_PATTERN,
    MASK_SOURCES,
    METHODS,
    STAGES,
    RecipeConfig,
)
from blockprune.frontends.run_state import (  # noqa: F401  (re-exported)
    STATE_FORMAT,
    RunState,
    _json_default,
    _load_tensors,
    _load_weights,
    _masks_from_file,
    _save_pretrained_atomic,
    _save_tensors,
    _write_json,
    checkpoint_dir,
)
from blockprune.frontends.sparse_init import load_sparse_init
from blockprune.frontends.stages import (  # noqa: F401  (re-exported; tests patch train_stage here)
    StagePlan,
    StageStats,
    _param_groups,
    evaluate,
    set_attention,
    train_stage,
)


@dataclass
class RecipeResult:
    """Where everything went and the headline numbers. ``finished`` is False when the run
    stopped early (``stop_after``); then only checkpoints and ``state.json`` exist."""

    out: Path
    finished: bool
    stages_run: list[str]
    stages_skipped: list[str]
    metrics: dict[str, float]  # "initial" and every finished stage -> main dev metric
    metric_name: str
    compression_rate: float | None = None
    model_dir: Path | None = None
    onnx_path: Path | None = None
    masks_path: Path | None = None
    report_path: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)


def _head_for(spec: TaskSpec) -> str:
    return "regression" if spec.is_regression else "classification"


def _make_accelerator():
    from accelerate import Accelerator

    return Accelerator()


class _Calibration:
    """The fixed calibration slice of a run and what is computed from it: activation norms (for
    activation-aware scores) and the per-layer allocation (uniform or from sensitivity)."""

    def __init__(self, cfg: RecipeConfig, tokenized: TokenizedData, spec: TaskSpec,
                 layers: dict[str, BlockShape]) -> None:
        self.cfg, self.tokenized, self.spec, self.layers = cfg, tokenized, spec, layers

    def feature_norms(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        if self.cfg.score != "activation":
            return None
        batches = self.tokenized.calib_batches(self.cfg, self.cfg.calib_examples)
        return collect_feature_norms(model, self.layers, batches, self.cfg.calib_examples)

    @torch.no_grad()
    def allocation(self, model: torch.nn.Module, fn: dict[str, torch.Tensor] | None) -> dict[str, Any] | None:
        """``{"rule", "ratios", "overall", "curves"}`` for layer mode, None otherwise."""
        cfg = self.cfg
        if cfg.prune_mode != "layer":
            return None
        sizes = {n: int(dict(model.named_parameters())[n].numel()) for n in self.layers}
        if cfg.allocation == "plan":  # per-layer ratios (and blocks, via the selection) from `blockprune plan`
            return plan_allocation(cfg.plan_file, list(self.layers), sizes)
        if cfg.allocation == "uniform":
            ratios = {n: float(cfg.ratio) for n in self.layers}
            return {"rule": "uniform", "ratios": ratios, "overall": overall_ratio(ratios, sizes), "curves": None}
        device = next(model.parameters()).device
        batches = [{k: v.to(device) for k, v in b.items()}
                   for b in self.tokenized.calib_batches(cfg, cfg.sensitivity_examples)]
        model.eval()
        teacher = [model(**b).logits.float() for b in batches]
        regression = self.spec.is_regression

        def loss() -> float:
            tot, n = 0.0, 0
            for b, t in zip(batches, teacher):
                s = model(**b).logits.float()
                if regression:
                    tot += float(((s - t) ** 2).sum())
                else:
                    tot += float(torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1),
                                                            reduction="sum", log_target=True))
                n += s.shape[0]
            return tot / max(n, 1)

        log = print if cfg.progress else None
        key = {"model": cfg.model, "task": self.spec.name, "blocks": {n: str(b) for n, b in self.layers.items()},
               "ratios": sorted(cfg.sensitivity_ratios), "examples": cfg.sensitivity_examples, "score": cfg.score,
               "calib_examples": cfg.calib_examples, "max_length": cfg.max_length, "limit_train": cfg.limit_train}
        curves = load_curves(cfg.sensitivity_file, key)
        if curves is None:
            curves = measure_sensitivity(model, self.layers, cfg.sensitivity_ratios, loss, fn, log=log)
            save_curves(cfg.sensitivity_file, key, curves)
        ratios = allocate(curves, cfg.ratio, max_ratio=cfg.max_layer_ratio)
        return {"rule": "sensitivity", "ratios": ratios, "overall": overall_ratio(ratios, sizes),
                "curves": curves.to_json(), "measure": "logit KL to the unpruned model" if not regression
                else "squared error to the unpruned model's score"}


def _dense_teacher(cfg: RecipeConfig, spec: TaskSpec, loaded: Any, out: Path, state: RunState) -> torch.nn.Module:
    """The dense fine-tuned model (teacher of the gradual method's retraining): the dense stage's
    checkpoint, or the model as given when that stage trained nothing."""
    from accelerate.utils import set_seed

    from blockprune.models.zoo import load_model

    rec = state.get("dense")
    if rec is not None and not rec.get("same_weights_as"):
        model = type(loaded.model).from_pretrained(str(checkpoint_dir(out, "dense")), local_files_only=True,
                                                   attn_implementation=cfg.attention)
    else:
        set_seed(cfg.seed)
        model = load_model(cfg.model, head=_head_for(spec), num_labels=spec.num_labels, seed=cfg.seed).model
        set_attention(model, cfg.attention)
    return frozen_teacher(model)


def _given_teacher(cfg: RecipeConfig, loaded: Any) -> torch.nn.Module:
    """``cfg.teacher`` as a frozen model: a fine-tuned checkpoint of the same architecture to
    distil from instead of the model the run starts from.

    Why: the accuracy grid compares a pruned cell (3 dense + 5 sparse epochs) with a dense model
    fine-tuned 8 epochs; distilling from the 3-epoch start caps the student near a teacher that
    is ~2 points under that baseline (MRPC 83.07 vs 84.92, STS-B 83.38 vs 85.54 on the CPU)."""
    return frozen_teacher(type(loaded.model).from_pretrained(str(cfg.teacher), local_files_only=True,
                                                             attn_implementation=cfg.attention))


def _check_teacher(cfg: RecipeConfig, spec: TaskSpec, loaded: Any) -> None:
    """A given teacher must match the model's head and depth/width (logit and hidden-state
    distillation); checked on its config before anything is written."""
    from transformers import AutoConfig

    theirs = AutoConfig.from_pretrained(str(cfg.teacher), local_files_only=True)
    mine = loaded.model.config
    for key in ("num_labels", "num_hidden_layers", "hidden_size"):
        if getattr(mine, key) != getattr(theirs, key, None):
            raise BlockpruneError(f"the teacher {cfg.teacher} has {key}={getattr(theirs, key, None)}, the model "
                                  f"{getattr(mine, key)}", "distil from a checkpoint of the same model fine-tuned "
                                  f"on {spec.name} (e.g. the accuracy grid's dense-baseline checkpoint)")


def run_recipe(cfg: RecipeConfig) -> RecipeResult:
    """Run (or resume) the recipe; see the module docstring for what is written where."""
    from accelerate.utils import set_seed

    from blockprune.models.zoo import load_model

    t_run = time.perf_counter()
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # -- every check before anything touches the out dir ------------------------------------
    data = read_task_data(cfg)
    spec = data.spec
    set_seed(cfg.seed)  # a freshly initialised classifier head must be the same on resume
    loaded = load_model(cfg.model, head=_head_for(spec), num_labels=spec.num_labels, seed=cfg.seed)
    set_attention(loaded.model, cfg.attention)
    if cfg.teacher:
        _check_teacher(cfg, spec, loaded)
    tokenizer = loaded.tokenizer()
    layers = select_layers(loaded.model, cfg.selection())
    hp_config = cfg.hard_prune_config()
    out = Path(cfg.out)
    state = RunState(out, cfg.fingerprint())
    plan = cfg.plan()

    # -- setup ---------------------------------------------------------------------------------
    accelerator = _make_accelerator()
    tokenized = TokenizedData.build(cfg, data, tokenizer)
    dev_loader = accelerator.prepare(tokenized.dev_loader(cfg))
    calib = _Calibration(cfg, tokenized, spec, layers)
    # With several processes (multi-GPU) only the main one writes; the others train in step.
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)

    def eval_now() -> dict[str, Any]:
        return evaluate(accelerator, loaded.model.to(accelerator.device), dev_loader, spec)

    norms: dict[str, dict[str, torch.Tensor]] = {}
    if not state.done("initial"):
        ev = eval_now()
        snap = snapshot_group_norms(loaded.model, layers)
        ckpt = checkpoint_dir(out, "initial")
        if main:
            _save_tensors(ckpt / "group_norms.safetensors", snap)
        state.record("initial", {"eval": ev, "epochs": 0, "seconds": 0.0}, write=main)
        norms["initial"] = snap
    else:
        norms["initial"] = _load_tensors(checkpoint_dir(out, "initial") / "group_norms.safetensors")

    run, skipped = [], []
    weights_of = "initial"  # the stage whose weights loaded.model holds now
    last_done = "initial"  # the latest finished stage with its own weights
    final_masks: dict[str, LayerMask] | None = None
    gradual_masks: dict[str, LayerMask] | None = None
    given_teacher: list[torch.nn.Module] = []  # cfg.teacher, loaded once for every stage that distils

    def teacher_or(default: Any) -> torch.nn.Module:
        """The stage's teacher: ``cfg.teacher`` when given (the default is then never built)."""
        if not cfg.teacher:
            return default()
        if not given_teacher:
            given_teacher.append(_given_teacher(cfg, loaded))
        return given_teacher[0]

    for index, stage in enumerate(plan):
        ckpt = checkpoint_dir(out, stage.name)
        if state.done(stage.name):
            skipped.append(stage.name)
            rec = state.get(stage.name)
            last_done = rec.get("same_weights_as") or stage.name
            norms[stage.name] = norms[last_done] if rec.get("same_weights_as") else \
                _load_tensors(ckpt / "group_norms.safetensors")
            if cfg.stop_after == stage.name:
                break
            continue
        if stage.epochs == 0 and stage.name not in ("retrain", "gradual"):
            # Nothing to train: the stage's result is the previous one (no copy on disk).
            prev = state.get(last_done)
            state.record(stage.name, {"eval": prev["eval"], "epochs": 0, "same_weights_as": last_done,
                                      "seconds": 0.0}, write=main)
            norms[stage.name] = norms[last_done]
            run.append(stage.name)
            if cfg.stop_after == stage.name:
                break
            continue
        if weights_of != last_done:
            _load_weights(loaded, checkpoint_dir(out, last_done), cfg.attention)
            weights_of = last_done
        set_seed(cfg.seed + 1000 * (index + 1))
        t0 = time.perf_counter()
        extra: dict[str, dict[str, torch.Tensor]] = {}
        masks = None
        teacher = None
        fn = None
        make_pruner = None
        allocation = None
        pruner_box: list[GradualPruner] = []
        distilled = cfg.distill_config().enabled
        reg_targets = None
        if stage.name == "reweighted":
            if distilled and cfg.distill_rgl_stage and stage.epochs > 0:
                teacher = teacher_or(lambda: frozen_teacher(loaded.model))  # the dense model: the stage starts from it
            fn = calib.feature_norms(loaded.model)
            if cfg.scope == "target":  # the ratios the later hard pruning will use, chosen on the dense model
                allocation = calib.allocation(loaded.model, fn)
                reg_targets = allocation["ratios"]
        elif stage.name == "gradual":
            if distilled:
                teacher = teacher_or(lambda: frozen_teacher(loaded.model))  # the dense model: the stage starts from it
            fn = calib.feature_norms(loaded.model)
            allocation = calib.allocation(loaded.model, fn)
            targets = allocation["ratios"]

            def make_pruner(inner: torch.nn.Module, total_steps: int) -> GradualPruner:
                schedule = CubicSchedule.over_run(total_steps, cfg.ramp_fraction, cfg.prune_every)
                pruner_box.append(GradualPruner(inner, layers, targets, schedule, fn))
                return pruner_box[-1]
        elif stage.name == "retrain":
            if cfg.method == "transfer":
                if distilled:
                    teacher = teacher_or(lambda: frozen_teacher(loaded.model))  # the dense model, before its encoder
                    # is replaced
                masks, allocation = load_sparse_init(loaded.model, cfg.sparse_init, layers)
            elif cfg.method == "gradual":
                if distilled and stage.epochs > 0:
                    teacher = teacher_or(lambda: _dense_teacher(cfg, spec, loaded, out, state))
                masks = gradual_masks or _masks_from_file(checkpoint_dir(out, "gradual") / "block_masks.safetensors",
                                                          layers)
            else:
                if distilled and stage.epochs > 0:
                    teacher = teacher_or(lambda: frozen_teacher(loaded.model))  # the model right before hard pruning
                fn = calib.feature_norms(loaded.model)
                rew = state.get("reweighted") if cfg.scope == "target" else None
                # targeted: prune to the ratios the reweighted stage shrank towards, not re-chosen ones
                allocation = rew["allocation"] if rew and rew.get("allocation") else calib.allocation(loaded.model, fn)
                masks = hard_prune(loaded.model, layers, hp_config, feature_norms=fn,
                                   layer_ratios=allocation["ratios"] if allocation else None)
            extra["block_masks.safetensors"] = {n: m.mask.to(torch.uint8) for n, m in masks.items()}
        reg_layers = layers if stage.name == "reweighted" else None
        masked = None
        if stage.epochs > 0:
            # the perturbed copies have only the teacher's word: in distilled stages only
            train_loader = tokenized.train_loader(cfg, seed=cfg.seed + index + 1, augmented=teacher is not None)
            stats, masked = train_stage(accelerator, loaded.model, train_loader, stage, cfg, reg_layers, masks,
                                        teacher, feature_norms=fn, make_pruner=make_pruner, reg_targets=reg_targets)
            del teacher
        else:
            stats = StageStats()
            if masks:
                masked = MaskedTraining(loaded.model, masks)
        if pruner_box:
            gradual_masks = pruner_box[-1].masks()
            extra["block_masks.safetensors"] = {n: m.mask.to(torch.uint8) for n, m in gradual_masks.items()}
        checked = None
        if masked is not None:
            verify_masked(loaded.model)  # attached masks: every pruned entry is exactly 0.0
            kept = masked.squash()
            checked = verify_masked(loaded.model, kept)
            if stage.name == "retrain":
                final_masks = masks
        loaded.model.eval()
        ev = eval_now()
        snap = snapshot_group_norms(loaded.model, layers)
        if main:
            _save_pretrained_atomic(loaded.model, tokenizer, ckpt, extra={"group_norms.safetensors": snap, **extra})
        accelerator.wait_for_everyone()
        info = {"eval": ev, "epochs": stage.epochs, "lr": stage.lr, "loss": stats.loss, "penalty": stats.penalty,
                "steps": stats.steps, "alpha_refreshes": stats.refreshes, "masked_entries_checked": checked,
                "seconds": time.perf_counter() - t0, "steps_per_second": stats.steps_per_second}
        if stats.history:
            info["history"] = stats.history
        if allocation is not None:
            info["allocation"] = allocation
        state.record(stage.name, write=main, info=info)
        norms[stage.name] = snap
        run.append(stage.name)
        weights_of = last_done = stage.name
        if cfg.stop_after == stage.name:
            break

    metrics = {k: v["eval"]["score"] for k, v in state.data["stages"].items()}
    metric_name = state.get("initial")["eval"]["metric"]
    if not state.done("retrain") or cfg.stop_after not in (None, "retrain") or not main:
        return RecipeResult(out, False, run, skipped, metrics, metric_name)

    # -- finalise: pruned model, ONNX, masks, report -----------------------------------------
    if weights_of != "retrain":  # resumed after the last stage: the final weights are on disk
        _load_weights(loaded, checkpoint_dir(out, "retrain"), cfg.attention)
    if final_masks is None:
        final_masks = _masks_from_file(checkpoint_dir(out, "retrain") / "block_masks.safetensors", layers)
    return _finalise(cfg, spec, loaded, tokenizer, layers, final_masks, state, norms, run, skipped,
                     metrics, metric_name, t_run)


def _allocation_of(state: RunState) -> dict[str, Any] | None:
    for stage in ("gradual", "retrain"):
        rec = state.get(stage)
        if rec is not None and rec.get("allocation"):
            return rec["allocation"]
    return None


def _finalise(cfg, spec, loaded, tokenizer, layers, masks, state, norms, run, skipped, metrics, metric_name,
              t_run) -> RecipeResult:
    out = Path(cfg.out)
    source = MASK_SOURCES[cfg.method]
    allocation = _allocation_of(state)
    exported = export_outputs(loaded, tokenizer, masks, out, cfg.exporter, source, extra={
        "task": spec.name, "ratio": cfg.ratio, "prune_mode": cfg.prune_mode, "method": cfg.method,
        "model": cfg.model, "score": cfg.score, "rgl_form": cfg.rgl_form if cfg.method == "rgl" else None,
        "allocation": None if allocation is None else {"rule": allocation["rule"], "ratios": allocation["ratios"]}})
    model = loaded.model

    keep = {n: m.keep for n, m in masks.items()}
    comp = compression_stats(model)
    stage_rows = []
    for name in ["initial", *[p.name for p in cfg.plan()]]:
        rec = state.get(name)
        if rec is None:
            continue
        stage_rows.append({"stage": name, "epochs": rec.get("epochs", 0), "lr": rec.get("lr"),
                           "metric": rec["eval"]["score"], "metrics": rec["eval"]["values"],
                           "dev_loss": rec["eval"]["loss"], "train_loss": rec.get("loss"),
                           "penalty": rec.get("penalty"), "alpha_refreshes": rec.get("alpha_refreshes"),
                           "history": rec.get("history"), "steps": rec.get("steps"),
                           "steps_per_second": rec.get("steps_per_second"),
                           "seconds": rec.get("seconds"), **norm_split(norms[name], keep)})
    pruned_total = sum(m.mask.numel() for m in masks.values())
    pruned_kept = sum(int(m.mask.sum()) for m in masks.values())
    report = {
        "task": spec.name, "metric": metric_name, "method": cfg.method, "mask_source": source,
        "model": cfg.model, "block": cfg.block, "ratio": cfg.ratio, "prune_mode": cfg.prune_mode,
        "score": cfg.score, "rgl_form": cfg.rgl_form if cfg.method == "rgl" else None,
        "lambda": cfg.lam_value if cfg.method == "rgl" else None,
        "rgl_scope": cfg.scope if cfg.method == "rgl" else None,
        "rgl_distilled": cfg.distill_rgl_stage if cfg.method == "rgl" else None,
        "dense_metric": _dense_metric(state), "pruned_metric": state.get("retrain")["eval"]["score"],
        "stages": stage_rows,
        "rgl_refreshes": (state.get("reweighted") or {}).get("history"),
        "allocation": allocation,
        "compression_rate": comp["compression_rate"], "density": comp["density"],
        "counted_weights": {"total": comp["total"], "nonzero": comp["nonzero"],
                            "rule": "every 2-D weight except embeddings; CR = total / nonzero"},
        "pruned_layers_sparsity": 1.0 - pruned_kept / max(pruned_total, 1),
        "layers": {n: {**v, "pruned": n in masks, "block": str(masks[n].block) if n in masks else None}
                   for n, v in comp["layers"].items()},
        "masked_entries_verified_zero": exported.masked_entries_checked,
        "onnx_export_max_abs_diff": exported.max_abs_diff,
        "outputs": {"model_dir": str(exported.model_dir), "onnx": str(exported.onnx_path),
                    "masks": str(exported.masks_path)},
        "timings": {"stages": {r["stage"]: r["seconds"] for r in stage_rows}, "finalise_seconds": exported.seconds,
                    "this_call_seconds": time.perf_counter() - t_run},
        "stages_run_this_call": run, "stages_skipped_this_call": skipped,
        "config": dataclasses.asdict(cfg),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "python": platform.python_version(), "machine": platform.machine()},
    }
    report_path = out / "report.json"
    _write_json(report_path, report)
    _print_summary(report)
    return RecipeResult(out, True, run, skipped, metrics, metric_name, comp["compression_rate"],
                        exported.model_dir, exported.onnx_path, exported.masks_path, report_path, report)


def _dense_metric(state: RunState) -> float:
    """The metric of the dense model: after the dense stage, or the initial one when skipped."""
    rec = state.get("dense")
    if rec is not None and rec.get("epochs", 0) > 0:
        return rec["eval"]["score"]
    return state.get("initial")["eval"]["score"]
