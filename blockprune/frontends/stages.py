"""Training stages: one AdamW loop shared by every stage and both training modes.

``train_loop`` is the loop (AdamW with linear warm-up/decay through an ``Accelerator``); what a
stage adds is passed in: a ``loss_fn`` (task loss, distillation, embedding distillation), a
``ReweightedGroupLasso`` (penalty added to the loss, or its proximal step applied after each
optimizer step), fixed ``masks`` (kept exactly zero), or a ``GradualPruner`` (masks tightening on
a cubic schedule). ``train_stage`` is the GLUE stage built on it; ``evaluate`` the GLUE dev
evaluation.

CPU costs handled here: the optimizer is AdamW's fused (or foreach) implementation, one kernel
over all tensors instead of a Python loop over ~100 parameters; the word embeddings can be frozen
(``freeze_embeddings``), which skips their gradient and their AdamW update, about half of
MiniLM's parameters; the attention kernel is chosen by the caller (SDPA in training).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from blockprune.blocks import BlockShape
from blockprune.frontends.distill import distillation_loss, hidden_mse, row_distillation_loss
from blockprune.frontends.glue import TaskSpec
from blockprune.frontends.gradual import CubicSchedule
from blockprune.frontends.hard_prune import LayerMask
from blockprune.frontends.masked import MaskedTraining
from blockprune.frontends.metrics import compute_metrics
from blockprune.frontends.regularizer import ReweightedGroupLasso


@dataclass
class StagePlan:
    name: str
    epochs: int
    lr: float


@dataclass
class StageStats:
    """What one stage did: mean task loss and penalty of its last epoch, steps, refreshes, time,
    and the per-refresh (group Lasso) or per-update (gradual) history."""

    loss: float | None = None
    penalty: float | None = None
    steps: int = 0
    refreshes: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    steps_per_second: float | None = None


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm (the usual BERT fine-tuning setup)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, impl: str = "fused") -> torch.optim.Optimizer:
    """AdamW; ``fused``/``foreach`` where the parameters allow it (fused needs float tensors on
    one supported device), else the reference implementation."""
    groups = _param_groups(model, weight_decay)
    if impl == "fused":
        try:
            return torch.optim.AdamW(groups, lr=lr, fused=True)
        except (RuntimeError, ValueError):
            impl = "foreach"
    if impl == "foreach":
        return torch.optim.AdamW(groups, lr=lr, foreach=True)
    return torch.optim.AdamW(groups, lr=lr, foreach=False)


def set_attention(model: torch.nn.Module, kind: str) -> None:
    """Switch the attention kernel (``sdpa`` to train, ``eager`` to export) when supported."""
    if getattr(model.config, "_attn_implementation", None) != kind and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(kind)


def _freeze_word_embeddings(model: torch.nn.Module, freeze: bool) -> list[torch.nn.Parameter]:
    frozen = []
    if freeze:
        for name, p in model.named_parameters():
            if "word_embeddings" in name and p.requires_grad:
                p.requires_grad_(False)
                frozen.append(p)
    return frozen


LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def train_loop(accelerator: Any, model: torch.nn.Module, loader: Any, plan: StagePlan, cfg: Any, loss_fn: LossFn,
               masks: dict[str, LayerMask] | None = None, reg_layers: dict[str, BlockShape] | None = None,
               feature_norms: dict[str, torch.Tensor] | None = None,
               make_pruner: Callable[[torch.nn.Module, int], Any] | None = None,
               reg_targets: dict[str, float] | None = None,
               ) -> tuple[StageStats, MaskedTraining | None]:
    """Run ``plan.epochs`` epochs of ``loss_fn`` through ``accelerator``.

    ``cfg`` supplies ``weight_decay``, ``warmup_ratio``, ``max_grad_norm``, ``optimizer``,
    ``freeze_embeddings``, ``progress`` and, with ``reg_layers``, ``lasso_config()``.
    ``make_pruner(inner_model, total_steps)`` builds a ``GradualPruner``. Returns the stats and
    the ``MaskedTraining`` holding the masks (fixed or gradual) for the caller to verify/squash.
    ``reg_targets`` (per-layer ratios) restricts the proximal step to the groups due for pruning on
    the gradual ramp (``cfg.ramp_fraction``, ``cfg.prune_every``).
    """
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    stats = StageStats()
    t0 = time.perf_counter()
    frozen = _freeze_word_embeddings(model, bool(getattr(cfg, "freeze_embeddings", False)))
    optimizer = make_optimizer(model, plan.lr, cfg.weight_decay, getattr(cfg, "optimizer", "default"))
    total_steps = plan.epochs * len(loader)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), max(total_steps, 1))
    pmodel, popt, ploader, psched = accelerator.prepare(model, optimizer, loader, scheduler)
    inner = accelerator.unwrap_model(pmodel)
    raw_opt = getattr(popt, "optimizer", popt)
    # the pruner counts this process's optimizer steps: the prepared loader is this rank's shard
    pruner = make_pruner(inner, plan.epochs * len(ploader)) if make_pruner else None
    if pruner is not None:
        pruner.attach_optimizer(raw_opt)
        masked = pruner.masked
    else:
        masked = MaskedTraining(inner, masks, optimizer=raw_opt) if masks else None
    reg = None
    if reg_layers:
        ramp = CubicSchedule.over_run(plan.epochs * len(ploader), cfg.ramp_fraction, cfg.prune_every) \
            if reg_targets is not None else None
        reg = ReweightedGroupLasso(inner, reg_layers, cfg.lasso_config(), feature_norms=feature_norms,
                                   targets=reg_targets, ramp=ramp)
    proximal = reg is not None and reg.config.form == "proximal"
    step = 0
    for epoch in range(1, plan.epochs + 1):
        pmodel.train()
        losses, pens = [], []
        bar = tqdm(ploader, desc=f"{plan.name} epoch {epoch}/{plan.epochs}", leave=False, dynamic_ncols=True,
                   disable=not (cfg.progress and accelerator.is_local_main_process))
        for batch in bar:
            loss = loss_fn(pmodel, batch)
            total = loss
            if reg is not None:
                if proximal:
                    with torch.no_grad():
                        pens.append(float(reg()))
                else:
                    pen = reg()
                    total = loss + pen
                    pens.append(float(pen.detach()))
            accelerator.backward(total)
            if cfg.max_grad_norm is not None:
                accelerator.clip_grad_norm_(pmodel.parameters(), cfg.max_grad_norm)
            lr_used = float(psched.get_last_lr()[0])
            popt.step()
            if proximal:
                reg.proximal_step(lr_used)
            psched.step()
            popt.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(loss.detach()))
            if reg is not None:
                reg.on_step_end(step)
            if pruner is not None:
                pruner.on_step_end(step)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", **({"pen": f"{pens[-1]:.3g}"} if pens else {}))
        bar.close()
        if reg is not None:
            reg.on_epoch_end(epoch)
        stats.loss = float(np.mean(losses)) if losses else None
        stats.penalty = float(np.mean(pens)) if pens else None
    stats.steps = step
    stats.refreshes = reg.refreshes if reg is not None else 0
    stats.history = list(reg.history) if reg is not None else (list(pruner.history) if pruner is not None else [])
    stats.seconds = time.perf_counter() - t0
    stats.steps_per_second = step / stats.seconds if stats.seconds > 0 else None
    for p in frozen:
        p.requires_grad_(True)
    accelerator.free_memory()
    pmodel.eval()
    return stats, masked


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def glue_loss_fn(cfg: Any, teacher: torch.nn.Module | None) -> LossFn:
    """Task loss, blended with the teacher's logits (``cfg.distill``) and hidden states
    (``cfg.distill_hidden``) when a teacher is given. With ``cfg.augment`` the batches may hold
    teacher-only rows (``augment.py``): the loss is then blended per row."""
    dcfg = cfg.distill_config()
    hidden = teacher is not None and dcfg.hidden > 0

    rows = teacher is not None and int(getattr(cfg, "augment", 0) or 0) > 0

    def loss_fn(pmodel: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        feed = _inputs(batch) if rows else batch  # teacher-only rows: the task loss is taken per row
        out = pmodel(**feed, output_hidden_states=hidden) if hidden else pmodel(**feed)
        if teacher is None:
            return out.loss
        with torch.no_grad():
            t = teacher(**_inputs(batch), output_hidden_states=hidden) if hidden else teacher(**_inputs(batch))
        if rows:
            loss = row_distillation_loss(out.logits, t.logits, batch["labels"], dcfg)
        else:
            loss = distillation_loss(out.logits, t.logits, out.loss, dcfg)
        if hidden:
            loss = loss + dcfg.hidden * hidden_mse(out.hidden_states, t.hidden_states, batch.get("attention_mask"))
        return loss

    return loss_fn


def train_stage(
    accelerator: Any,
    model: torch.nn.Module,
    loader: Any,
    plan: StagePlan,
    cfg: Any,
    layers: dict[str, BlockShape] | None = None,
    masks: dict[str, LayerMask] | None = None,
    teacher: torch.nn.Module | None = None,
    feature_norms: dict[str, torch.Tensor] | None = None,
    make_pruner: Callable[[torch.nn.Module, int], Any] | None = None,
    reg_targets: dict[str, float] | None = None,
) -> tuple[StageStats, MaskedTraining | None]:
    """One GLUE stage: with ``layers`` the reweighted group Lasso (``cfg.rgl_form``; alphas from
    the weights as they are now, activation-aware with ``feature_norms``); with ``masks`` the
    pruned weights are kept exactly zero; with ``make_pruner`` the masks tighten gradually; with
    ``teacher`` the loss is distilled (see ``distill.py``)."""
    if teacher is not None:
        teacher = teacher.to(accelerator.device)
    return train_loop(accelerator, model, loader, plan, cfg, glue_loss_fn(cfg, teacher), masks=masks,
                      reg_layers=layers, feature_norms=feature_norms, make_pruner=make_pruner,
                      reg_targets=reg_targets)


@torch.no_grad()
def evaluate(accelerator: Any, model: torch.nn.Module, loader: Any, spec: TaskSpec) -> dict[str, Any]:
    """Task metrics and mean loss on the dev loader (gathered across processes)."""
    model.eval()
    logits, labels, losses = [], [], []
    for batch in loader:
        out = model(**batch)
        lg, lb = accelerator.gather_for_metrics((out.logits.float(), batch["labels"]))
        logits.append(lg.cpu().numpy())
        labels.append(lb.cpu().numpy())
        losses.append(float(out.loss))
    preds = np.concatenate(logits)
    if spec.is_regression:
        preds = preds.reshape(-1)
    m = compute_metrics(spec.name, preds, np.concatenate(labels))
    return {"metric": m.main, "score": m.score, "values": m.values, "loss": float(np.mean(losses))}
