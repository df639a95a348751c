"""``RecipeConfig``: every setting of a ``blockprune train`` run, validated in one place.

Why its own module: the config is what a resumed run is compared against (``fingerprint``), what
the CLI, the Python API and the accuracy grid build, and what the report stores; keeping it free
of the training code lets all of them import it cheaply.

Methods (``method``):

* ``rgl``: dense -> reweighted group Lasso (``rgl_form`` proximal by default, or the paper's
  penalty in the loss; ``rgl_scope`` target - the default wherever it applies - shrinks only the
  groups due for pruning, on the gradual method's ramp, and ``rgl_distill`` - on by default when
  the recipe distils - distils this stage from the dense model; ``all``/``False`` is the paper's
  stage) -> hard prune -> masked retraining;
* ``magnitude``: dense -> one-shot hard prune (``score`` activation-aware by default) -> retraining;
* ``gradual``: dense -> sparse training whose masks tighten on a cubic schedule to the target
  (``epochs_rew`` epochs; distilled from the dense model when ``distill``/``distill_hidden``)
  -> retraining with the masks fixed (``epochs_retrain``, distilled from the dense model too);
* ``transfer``: dense -> the encoder and masks of an already pruned run (``sparse_init``, e.g. a
  task-agnostic ``--mode embedding`` run) replace the dense encoder -> masked retraining
  (``epochs_retrain``), distilled from the dense model (``sparse_init.py`` says why).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockprune.blocks import BlockShape, check_sparsity
from blockprune.errors import BlockpruneError
from blockprune.frontends.allocation import ALLOCATIONS
from blockprune.frontends.distill import DistillConfig
from blockprune.frontends.glue import get_task
from blockprune.frontends.hard_prune import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, MODES, HardPruneConfig, LayerSelection
from blockprune.frontends.importance import SCORES
from blockprune.frontends.regularizer import FORMS, GroupLassoConfig, RefreshSchedule

METHODS = ("rgl", "magnitude", "gradual", "transfer")
STAGES = ("dense", "reweighted", "gradual", "retrain")
MASK_SOURCES = {"rgl": "reweighted-group-lasso", "magnitude": "magnitude", "gradual": "gradual-magnitude",
                "transfer": "transferred"}
#: Pooler and classifier heads; pruned only with ``include_heads`` (always counted in the CR).
HEAD_PATTERN = r"(^|\.)(pooler|pre_classifier|classifier)\."
#: Config fields that do not change what a run computes, so a resume may differ in them.
_NOT_FINGERPRINTED = ("out", "stop_after", "progress", "threads", "attention", "optimizer", "sensitivity_file")
#: lambda when none is given: the penalty form's is the paper's; the proximal step shrinks each
#: group by lr * lambda * alpha_g per step, so zeroing a group of norm ~0.3 within a few hundred
#: steps at lr 2e-5 needs lambda ~10 (measured on MiniLM 16x1: pure proximal steps zero ~half the
#: groups in 300 steps at lambda 10).
RGL_SCOPES = ("auto", "all", "target")
DEFAULT_LAMBDA = {"penalty": 1e-4, "proximal": 10.0}
ATTENTIONS = ("sdpa", "eager")
OPTIMIZERS = ("fused", "foreach", "default")


@dataclass
class RecipeConfig:
    """Everything a run needs; the defaults are the paper's (lr 2e-5, batch 32, length 128,
    eps 1e-3, 1x32 row segments, same ratio in every layer), except where measurement showed
    better: the proximal group-Lasso step (lambda 10; 1e-4 for the penalty form) and
    activation-aware block scores.

    ``data_dir`` is the task folder (holding ``train.tsv``/``dev.tsv``) or the GLUE root.
    An ``epochs_*`` of 0 skips that stage (``epochs_dense=0`` when ``model`` is already
    fine-tuned). ``layer_lambdas`` is an ordered ``[(regex, lambda)]`` list, first match wins.
    ``stop_after`` ends the run after that stage (its checkpoint is kept; a later call with the
    same config resumes), e.g. to share one dense fine-tune between several pruning runs.
    """

    model: str = "minilm"
    task: str = "RTE"
    data_dir: str = "../shared/data/glue"
    out: str = "runs/recipe"
    method: str = "rgl"
    block: str = "1x32"
    ratio: float = 0.5
    prune_mode: str = "layer"
    threshold: float | None = None
    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    include_heads: bool = False
    block_overrides: list[tuple[str, str]] = field(default_factory=list)
    epochs_dense: int = 3
    epochs_rew: int = 3
    epochs_retrain: int = 3
    lr_dense: float = 2e-5
    lr_rew: float = 2e-5
    lr_retrain: float = 2e-5
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int = 128
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    lam: float | None = None  # None: DEFAULT_LAMBDA of rgl_form
    rgl_form: str = "proximal"
    #: proximal step over every group ("all") or only over the groups hard pruning would remove at
    #: the ramp's current share of each layer's ratio ("target"; see regularizer.py for why).
    #: "auto" (default) is "target" wherever it applies (proximal form, per-layer ratios): on STS-B
    #: 16x1 0.7 shrinking every group left 6.3 points, the targeted step 69.2 (ablation, README)
    rgl_scope: str = "auto"
    #: distil the reweighted stage from the dense model too; None (default): whenever the recipe
    #: distils at all (distill/distill_hidden), like the gradual method's sparse stage
    rgl_distill: bool | None = None
    layer_lambdas: list[tuple[str, float]] = field(default_factory=list)
    eps: float = 1e-3
    refresh_every_epochs: int | None = 1
    refresh_every_steps: int | None = None
    distill: float = 0.0  # share of the teacher term in masked retraining (0: off)
    distill_temperature: float = 2.0
    distill_hidden: float = 0.0  # weight of the hidden-state MSE to the teacher (0: off)
    score: str = "activation"  # block importance: activation-aware ||W_g * s|| or plain ||W_g||
    calib_examples: int = 256  # training examples for the activation norms and the sensitivity
    prune_every: int = 10  # gradual: optimizer steps between mask updates
    ramp_fraction: float = 0.75  # gradual: share of the sparse stage's steps spent raising sparsity
    allocation: str = "uniform"  # per-layer ratios: uniform, or from measured sensitivity
    sensitivity_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 0.9])
    sensitivity_examples: int = 128
    max_layer_ratio: float = 0.9
    #: reuse sensitivity curves across runs: JSON written on first use, read when its key (model,
    #: block, ratios, examples, score) matches; the accuracy grid shares one per task and block
    sensitivity_file: str | None = None
    #: teacher-only perturbed copies of each training example in the distilled stages (0: off;
    #: ``augment.py`` says why); each copy costs one more pass over the training set per epoch
    augment: int = 0
    #: fine-tuned checkpoint (same architecture) to distil from instead of the model the run
    #: starts from; None: the start model (see ``recipe._given_teacher`` for why one would)
    teacher: str | None = None
    freeze_embeddings: bool = False  # word embeddings not trained (a third of MiniLM's AdamW work)
    attention: str = "sdpa"  # attention kernel while training/evaluating; export always uses eager
    optimizer: str = "fused"  # AdamW implementation (fused/foreach: one kernel over all tensors)
    plan_file: str | None = None  # plan.yaml from `blockprune plan`: per-layer blocks and ratios (allocation "plan")
    sparse_init: str | None = None  # method "transfer": the pruned run (or checkpoint) whose encoder and masks start retraining
    seed: int = 0
    limit_train: int | None = None
    limit_eval: int | None = None
    group_by_length: bool = True
    exporter: str = "dynamo"
    stop_after: str | None = None
    progress: bool = True
    threads: int | None = None

    # -- derived pieces, each validated by the module that owns the concept ------------------

    def selection(self) -> LayerSelection:
        exclude = list(self.exclude) + ([] if self.include_heads else [HEAD_PATTERN])
        from blockprune.frontends.allocation import plan_overrides

        return LayerSelection(include=list(self.include), exclude=exclude, block=self.block,
                              block_overrides=plan_overrides(self.plan_file) + [tuple(x) for x in self.block_overrides])

    def hard_prune_config(self) -> HardPruneConfig:
        return HardPruneConfig(mode=self.prune_mode, sparsity=self.ratio, threshold=self.threshold)

    def distill_config(self) -> DistillConfig:
        return DistillConfig(weight=self.distill, temperature=self.distill_temperature, hidden=self.distill_hidden)

    @property
    def lam_value(self) -> float:
        return DEFAULT_LAMBDA.get(self.rgl_form, 1e-4) if self.lam is None else float(self.lam)

    def lasso_config(self) -> GroupLassoConfig:
        schedule = RefreshSchedule(every_steps=self.refresh_every_steps, every_epochs=self.refresh_every_epochs)
        return GroupLassoConfig(lam=self.lam_value, eps=self.eps,
                                layer_lambdas=[tuple(x) for x in self.layer_lambdas], schedule=schedule,
                                form=self.rgl_form,
                                target_sparsity=self.ratio if self.prune_mode != "threshold" else None)

    def plan(self) -> list["StagePlan"]:
        """The stages this method runs, in order (0-epoch stages included, they are skipped)."""
        stages = [StagePlan("dense", self.epochs_dense, self.lr_dense)]
        if self.method == "rgl":
            stages.append(StagePlan("reweighted", self.epochs_rew, self.lr_rew))
        if self.method == "gradual":
            stages.append(StagePlan("gradual", self.epochs_rew, self.lr_rew))
        stages.append(StagePlan("retrain", self.epochs_retrain, self.lr_retrain))
        return stages

    @property
    def _has_rgl_stage(self) -> bool:
        # not stop_after: it is not fingerprinted, so `--stop-after dense` then the full run must resolve alike
        return self.method == "rgl" and self.epochs_rew > 0

    @property
    def scope(self) -> str:
        """``rgl_scope`` resolved: "auto" is "target" for a proximal RGL stage with per-layer
        ratios, "all" otherwise (the penalty form and threshold pruning have no per-layer target)."""
        if self.rgl_scope != "auto":
            return self.rgl_scope
        fits = self._has_rgl_stage and self.rgl_form == "proximal" and self.prune_mode == "layer"
        return "target" if fits else "all"

    @property
    def distill_rgl_stage(self) -> bool:
        """``rgl_distill`` resolved: None follows whether the recipe distils at all."""
        on = self._has_rgl_stage and bool(self.distill or self.distill_hidden)
        return on if self.rgl_distill is None else bool(self.rgl_distill) and on

    def validate(self) -> None:
        """Refuse bad settings with one clear error each (nothing touches disk before this)."""
        if self.method not in METHODS:
            raise BlockpruneError(f"unknown method {self.method!r}",
                                  "use rgl (reweighted group Lasso), magnitude (one-shot), gradual (cubic schedule) "
                                  "or transfer (masks of a pruned run)")
        if (self.method == "transfer") != bool(self.sparse_init):
            raise BlockpruneError("method 'transfer' and a pruned source (sparse_init) go together",
                                  "use `blockprune train --method transfer --sparse-init RUN_DIR`")
        if self.method == "transfer":
            from blockprune.frontends.sparse_init import resolve_source

            resolve_source(self.sparse_init)  # a missing source fails here, before the out dir exists
        if self.method == "transfer" and self.epochs_retrain < 1:
            raise BlockpruneError("the transfer method trains only in masked retraining, and epochs_retrain is 0",
                                  "use --epochs-retrain 1 or more")
        for what, allowed in (("rgl_form", FORMS), ("score", SCORES), ("allocation", ALLOCATIONS),
                              ("attention", ATTENTIONS), ("optimizer", OPTIMIZERS)):
            if getattr(self, what) not in allowed:
                raise BlockpruneError(f"{what}={getattr(self, what)!r} is unknown", f"use one of: {', '.join(allowed)}")
        if (self.rgl_scope not in ("auto", "all") or self.rgl_distill) and self.method != "rgl":
            raise BlockpruneError(f"--rgl-scope/--rgl-distill shape the reweighted stage, which the {self.method} "
                                  "method does not have", "use --method rgl, or drop those options")
        if self.rgl_scope not in RGL_SCOPES:
            raise BlockpruneError(f"rgl_scope={self.rgl_scope!r} is unknown", f"use one of: {', '.join(RGL_SCOPES)}")
        if self.rgl_scope == "target" and (self.rgl_form != "proximal" or self.prune_mode != "layer"):
            raise BlockpruneError("--rgl-scope target shrinks the groups of each layer's target ratio, so it needs "
                                  f"the proximal form and per-layer ratios (got {self.rgl_form}, {self.prune_mode})",
                                  "use --rgl-form proximal --prune-mode layer, or --rgl-scope all")
        if self.rgl_distill and not (self.distill or self.distill_hidden):
            raise BlockpruneError("--rgl-distill distils the reweighted stage, but distillation is off",
                                  "add --distill 0.5 (and/or --distill-hidden 1.0), or drop --rgl-distill")
        if self.teacher is not None:
            if not (Path(self.teacher) / "config.json").is_file():
                raise BlockpruneError(f"teacher {self.teacher!r} is not a saved model directory (no config.json)",
                                      "pass a fine-tuned checkpoint directory, e.g. RUN/checkpoints/dense")
            if not (self.distill or self.distill_hidden):
                raise BlockpruneError("a teacher is given, but distillation is off",
                                      "add --distill 0.5 (and/or --distill-hidden 1.0), or drop --teacher")
        _check_int(self.augment, "augment", 0)
        if self.augment and not self.distill:
            raise BlockpruneError(f"augment={self.augment} adds teacher-only copies, but logit distillation is off",
                                  "add --distill 0.5 (the copies learn from the teacher's logits), or drop --augment")
        if self.method == "gradual" and self.prune_mode != "layer":
            raise BlockpruneError(f"gradual pruning needs per-layer ratios, not prune_mode={self.prune_mode!r}",
                                  "use --prune-mode layer (with --allocation uniform or sensitivity)")
        if (self.allocation == "plan") != bool(self.plan_file):
            raise BlockpruneError("allocation 'plan' and a plan file go together",
                                  "use `blockprune train --plan plan.yaml` (it sets both)")
        if self.allocation in ("sensitivity", "plan") and self.prune_mode != "layer":
            raise BlockpruneError("--allocation sensitivity chooses per-layer ratios, so it needs --prune-mode layer",
                                  "use --prune-mode layer, or --allocation uniform")
        if self.method == "gradual" and self.epochs_rew < 1:
            raise BlockpruneError("gradual pruning needs at least one epoch of sparse training (epochs_rew)",
                                  "use --epochs-rew 1 or more (the masks tighten during it)")
        if not (0.0 < float(self.ramp_fraction) <= 1.0):
            raise BlockpruneError(f"ramp_fraction={self.ramp_fraction!r} is outside (0, 1]",
                                  "give the share of the sparse stage spent raising sparsity, e.g. 0.75")
        for what in ("calib_examples", "sensitivity_examples", "prune_every"):
            _check_int(getattr(self, what), what, minimum=1)
        check_sparsity(self.max_layer_ratio, what="max_layer_ratio")
        for r in self.sensitivity_ratios:
            check_sparsity(r, what="sensitivity ratio")
        if self.allocation == "sensitivity" and self.ratio > self.max_layer_ratio:
            raise BlockpruneError(f"ratio {self.ratio:g} is above max_layer_ratio {self.max_layer_ratio:g}",
                                  "raise --max-layer-ratio or lower --ratio")
        if self.prune_mode not in MODES:
            raise BlockpruneError(f"hard pruning mode {self.prune_mode!r} is unknown", f"use one of: {', '.join(MODES)}")
        if self.prune_mode != "threshold":
            check_sparsity(self.ratio, what="pruning ratio")
        BlockShape.parse(self.block)
        for what in ("epochs_dense", "epochs_rew", "epochs_retrain"):
            _check_int(getattr(self, what), what, minimum=0)
        for what in ("batch_size", "eval_batch_size", "max_length"):
            _check_int(getattr(self, what), what, minimum=1)
        for what in ("limit_train", "limit_eval", "threads"):
            if getattr(self, what) is not None:
                _check_int(getattr(self, what), what, minimum=1)
        for what in ("lr_dense", "lr_rew", "lr_retrain"):
            v = getattr(self, what)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise BlockpruneError(f"{what}={v!r} is not a positive learning rate", "use e.g. 2e-5 (paper default)")
        if not (0.0 <= float(self.warmup_ratio) < 1.0):
            raise BlockpruneError(f"warmup_ratio={self.warmup_ratio!r} is outside [0, 1)",
                                  "use the fraction of steps spent warming up, e.g. 0.1")
        if self.weight_decay < 0:
            raise BlockpruneError(f"weight_decay={self.weight_decay!r} is negative", "use 0.01 or 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise BlockpruneError(f"max_grad_norm={self.max_grad_norm!r} is not > 0", "use 1.0, or None for no clipping")
        if self.exporter not in ("dynamo", "legacy"):
            raise BlockpruneError(f"unknown exporter {self.exporter!r}", "use dynamo or legacy")
        if self.stop_after is not None and self.stop_after not in STAGES:
            raise BlockpruneError(f"stop_after={self.stop_after!r} is not a stage", f"use one of: {', '.join(STAGES)}")
        if self.stop_after == "reweighted" and self.method != "rgl":
            raise BlockpruneError(f"stop_after=reweighted, but the {self.method} method has no reweighted stage",
                                  "use stop_after=dense or retrain")
        if self.stop_after == "gradual" and self.method != "gradual":
            raise BlockpruneError(f"stop_after=gradual, but the {self.method} method has no gradual stage",
                                  "use --method gradual, or stop_after=dense or retrain")
        self.selection()
        self.hard_prune_config()
        self.lasso_config()
        self.distill_config()
        get_task(self.task)

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a resume: every setting that changes what is computed."""
        d = dataclasses.asdict(self)
        for k in _NOT_FINGERPRINTED:
            d.pop(k, None)
        for opt in ("plan_file", "sparse_init", "augment", "teacher"):  # runs from before these options existed resume unchanged
            if not d.get(opt):
                d.pop(opt, None)
        d["rgl_scope"], d["rgl_distill"] = self.scope, self.distill_rgl_stage  # what is computed, not how asked
        for opt, before in (("rgl_scope", "all"), ("rgl_distill", False)):  # likewise, at their old behaviour
            if d.get(opt) == before:
                d.pop(opt, None)
        if not self.distill and not self.distill_hidden:  # off: the temperature does not matter
            d.pop("distill", None)
            d.pop("distill_temperature", None)
        return json.loads(json.dumps(d))  # tuples -> lists, so it compares equal to the stored JSON


def _check_int(v: Any, what: str, minimum: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise BlockpruneError(f"{what}={v!r} is not an integer >= {minimum}", f"give {what} as a whole number >= {minimum}")


@dataclass
class StagePlan:
    name: str
    epochs: int
    lr: float


