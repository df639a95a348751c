"""Task-agnostic pruning of a sentence-embedding model: distil the dense model's embeddings into
its pruned self on plain text, judged by zero-shot STS-B.

Why: the bundled MiniLM (sentence-transformers all-MiniLM-L6-v2: mean pooling + L2 normalise) is
deployed as an embedding model, not as a GLUE classifier. What must survive pruning is its
embedding geometry, and that needs no labels: the dense model is the teacher, any text is
training data (``extract_glue_sentences`` turns the local GLUE train files into one sentence a
line), and the loss is ``cosine_weight * (1 - cos(e_s, e_t)) + mse_weight * MSE(e_s, e_t) +
hidden_weight * MSE(hidden states) + relation_weight * MSE(in-batch cosine matrices)`` on
mean-pooled, L2-normalised embeddings (the last term distils the similarity structure that STS
scores, not just each embedding's direction). Pruning is
gradual (cubic schedule to the target, ``gradual.py``) followed by distillation with the masks
fixed. The score is the Spearman correlation between the cosine similarity of the two sentences
of each STS-B dev pair and the gold score (zero-shot: STS-B labels are never trained on; the
dense model gives ~0.867).

``run_embedding(EmbeddingConfig(...))`` writes what a GLUE run writes (``model/``,
``model.onnx``, ``masks.safetensors`` keyed by ONNX initializer names, ``report.json``) and
resumes from ``state.json`` like it (stages ``initial``, ``gradual``, ``retrain``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from blockprune.blocks import BlockShape, check_sparsity
from blockprune.errors import BlockpruneError
from blockprune.frontends.allocation import (
    ALLOCATIONS,
    allocate,
    load_curves,
    measure_sensitivity,
    overall_ratio,
    save_curves,
)
from blockprune.frontends.data import LengthGroupedBatches, resolve_data_dir
from blockprune.frontends.distill import frozen_teacher, hidden_mse
from blockprune.frontends.gradual import CubicSchedule, GradualPruner
from blockprune.frontends.hard_prune import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, LayerMask, LayerSelection, select_layers
from blockprune.frontends.importance import SCORES, collect_feature_norms
from blockprune.frontends.outputs import compression_stats, export_outputs, pruned_layers_sparsity
from blockprune.frontends.recipe_config import ATTENTIONS, HEAD_PATTERN, OPTIMIZERS, _check_int
from blockprune.frontends.run_state import (
    RunState,
    _load_weights,
    _masks_from_file,
    _save_pretrained_atomic,
    _write_json,
    checkpoint_dir,
)
from blockprune.frontends.stages import StagePlan, set_attention, train_loop
from blockprune.io import atomic_path

STAGES = ("gradual", "retrain")
MASK_SOURCE = "gradual-embedding-distillation"
# Weights the embedding ONNX does not contain (it outputs the token states, not the pooled CLS),
# so they are left out of the compression count.
UNUSED_IN_EMBEDDING = ("pooler.",)
_NOT_FINGERPRINTED = ("out", "stop_after", "progress", "threads", "attention", "optimizer", "sensitivity_file")


@dataclass
class EmbeddingConfig:
    """Settings of a task-agnostic run. ``text``: one sentence per line. ``sts_dir``: the STS-B
    folder (or GLUE root) whose ``dev.tsv`` gives the score. ``epochs_gradual`` epochs of
    distillation while sparsity rises to ``ratio`` (over ``ramp_fraction`` of them), then
    ``epochs_retrain`` with the masks fixed."""

    text: str
    out: str
    model: str = "minilm"
    sts_dir: str = "../shared/data/glue/STS-B"
    block: str = "16x1"
    ratio: float = 0.5
    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    block_overrides: list[tuple[str, str]] = field(default_factory=list)
    epochs_gradual: int = 3
    epochs_retrain: int = 2
    lr: float = 5e-5
    batch_size: int = 32
    eval_batch_size: int = 128
    max_length: int = 128
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    cosine_weight: float = 1.0
    mse_weight: float = 0.0
    hidden_weight: float = 1.0
    relation_weight: float = 0.0
    score: str = "activation"
    calib_examples: int = 256
    prune_every: int = 10
    ramp_fraction: float = 0.75
    allocation: str = "uniform"
    sensitivity_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 0.9])
    sensitivity_examples: int = 128
    max_layer_ratio: float = 0.9
    sensitivity_file: str | None = None  # cache of the curves, shared by runs with the same key
    seed: int = 0
    limit_train: int | None = None
    limit_eval: int | None = None
    exporter: str = "dynamo"
    stop_after: str | None = None
    progress: bool = True
    threads: int | None = None
    freeze_embeddings: bool = False
    attention: str = "sdpa"
    optimizer: str = "fused"
    plan_file: str | None = None  # plan.yaml from `blockprune plan` (with allocation "plan")

    def validate(self) -> None:
        check_sparsity(self.ratio, what="pruning ratio")
        BlockShape.parse(self.block)
        _check_int(self.epochs_gradual, "epochs_gradual", 1)
        _check_int(self.epochs_retrain, "epochs_retrain", 0)
        for what in ("batch_size", "eval_batch_size", "max_length", "calib_examples", "prune_every",
                     "sensitivity_examples"):
            _check_int(getattr(self, what), what, 1)
        for what in ("limit_train", "limit_eval", "threads"):
            if getattr(self, what) is not None:
                _check_int(getattr(self, what), what, 1)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise BlockpruneError(f"lr={self.lr!r} is not a positive learning rate", "use e.g. 5e-5")
        for what in ("cosine_weight", "mse_weight", "hidden_weight", "relation_weight"):
            v = getattr(self, what)
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise BlockpruneError(f"{what}={v!r} is not a number >= 0", "use e.g. 1.0, or 0 to drop the term")
        if self.cosine_weight + self.mse_weight + self.hidden_weight + self.relation_weight <= 0:
            raise BlockpruneError("every distillation weight is 0, so nothing would be learnt",
                                  "keep --cosine-weight 1 (default) or set another weight > 0")
        for what, allowed in (("score", SCORES), ("allocation", ALLOCATIONS), ("attention", ATTENTIONS),
                              ("optimizer", OPTIMIZERS), ("exporter", ("dynamo", "legacy"))):
            if getattr(self, what) not in allowed:
                raise BlockpruneError(f"{what}={getattr(self, what)!r} is unknown", f"use one of: {', '.join(allowed)}")
        if self.stop_after is not None and self.stop_after not in STAGES:
            raise BlockpruneError(f"stop_after={self.stop_after!r} is not a stage of the embedding mode",
                                  f"use one of: {', '.join(STAGES)}")
        if not (0.0 < float(self.ramp_fraction) <= 1.0):
            raise BlockpruneError(f"ramp_fraction={self.ramp_fraction!r} is outside (0, 1]", "use e.g. 0.75")
        check_sparsity(self.max_layer_ratio, what="max_layer_ratio")
        for r in self.sensitivity_ratios:
            check_sparsity(r, what="sensitivity ratio")
        if self.allocation == "sensitivity" and self.ratio > self.max_layer_ratio:
            raise BlockpruneError(f"ratio {self.ratio:g} is above max_layer_ratio {self.max_layer_ratio:g}",
                                  "raise --max-layer-ratio or lower --ratio")
        if (self.allocation == "plan") != bool(self.plan_file):
            raise BlockpruneError("allocation 'plan' and a plan file go together",
                                  "use `blockprune train --plan plan.yaml` (it sets both)")
        self.selection()

    def selection(self) -> LayerSelection:
        from blockprune.frontends.allocation import plan_overrides

        return LayerSelection(include=list(self.include), exclude=list(self.exclude) + [HEAD_PATTERN],
                              block=self.block, block_overrides=plan_overrides(self.plan_file)
                              + [tuple(x) for x in self.block_overrides])

    def fingerprint(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in _NOT_FINGERPRINTED:
            d.pop(k, None)
        if d.get("plan_file") is None:  # runs from before `--plan` existed resume unchanged
            d.pop("plan_file", None)
        if not d.get("relation_weight"):  # likewise runs from before the relation term
            d.pop("relation_weight", None)
        return json.loads(json.dumps(d))


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def read_sentences(path: str | Path, limit: int | None = None) -> list[str]:
    """Non-empty stripped lines of a UTF-8 text file (the first ``limit``)."""
    p = Path(path)
    if not p.is_file():
        raise BlockpruneError(f"text file {str(p)!r} does not exist",
                              "give a file with one sentence per line; build one from GLUE with "
                              "`python -m blockprune.frontends.embedding extract --out runs/embedding/sentences.txt`")
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise BlockpruneError(f"{p} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                              "convert it to UTF-8, one sentence per line") from exc
    out = [ln for ln in lines if ln]
    if limit is not None:
        out = out[:limit]
    if not out:
        raise BlockpruneError(f"{p} holds no sentences", "put one sentence per line")
    return out


def extract_glue_sentences(glue_root: str | Path, out: str | Path, per_task: int | None = 20000,
                           seed: int = 0) -> tuple[Path, dict[str, int]]:
    """Write the unique sentences of every ``<task>/train.tsv`` under ``glue_root`` to ``out``
    (one a line, shuffled with ``seed``; at most ``per_task`` per task), atomically. Only train
    splits are read, so the STS-B dev pairs used for scoring are never seen in training."""
    from blockprune.frontends.glue import TASKS, read_glue_split

    root = Path(glue_root)
    if not root.is_dir():
        raise BlockpruneError(f"GLUE root {str(root)!r} does not exist", "pass the folder holding CoLA/, SST-2/, ...")
    seen: set[str] = set()
    sentences: list[str] = []
    counts: dict[str, int] = {}
    for spec in TASKS.values():
        if spec.name == "MNLI-MM" or not (root / spec.dir_name / spec.splits["train"]).is_file():
            continue
        n = 0
        for ex in read_glue_split(root, spec, "train"):
            for s in (ex.text_a, ex.text_b):
                s = (s or "").strip()
                if s and s not in seen and (per_task is None or n < per_task):
                    seen.add(s)
                    sentences.append(s)
                    n += 1
        counts[spec.name] = n
    if not sentences:
        raise BlockpruneError(f"no GLUE train.tsv found under {root}", "pass the GLUE root (../shared/data/glue)")
    random.Random(seed).shuffle(sentences)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target, suffix=".txt") as tmp:
        Path(tmp).write_text("\n".join(s.replace("\n", " ") for s in sentences) + "\n", encoding="utf-8")
    return target, counts


class _Texts(torch.utils.data.Dataset):
    def __init__(self, texts: Sequence[str], tokenizer: Any, max_length: int) -> None:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        self.features = [{k: enc[k][i] for k in keys} for i in range(len(texts))]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]


def _collate(pad_id: int):
    def collate(batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(b["input_ids"]) for b in batch)
        out = {}
        for key, pad in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in batch[0]:
                out[key] = torch.tensor([list(b[key]) + [pad] * (longest - len(b[key])) for b in batch])
        return out

    return collate


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' pooling: mean over non-padding tokens, then L2 normalise."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


@dataclass
class StsPairs:
    a: list[str]
    b: list[str]
    gold: np.ndarray


def read_sts_dev(sts_dir: str | Path, limit: int | None = None) -> StsPairs:
    from blockprune.frontends.glue import get_task, read_glue_split

    root, spec = resolve_data_dir(sts_dir, get_task("STS-B"))
    rows = read_glue_split(root, spec, "dev", limit=limit)
    if not rows:
        raise BlockpruneError("the STS-B dev split holds no pairs", "restore the original GLUE STS-B/dev.tsv")
    return StsPairs([r.text_a for r in rows], [r.text_b or "" for r in rows], np.array([float(r.label) for r in rows]))


@torch.no_grad()
def embed(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 128,
          max_length: int = 128) -> torch.Tensor:
    """Mean-pooled, normalised embeddings, batches sorted by length (little padding)."""
    model.eval()
    ds = _Texts(texts, tokenizer, max_length)
    order = sorted(range(len(ds)), key=lambda i: -len(ds.features[i]["input_ids"]))
    collate = _collate(tokenizer.pad_token_id or 0)
    device = next(model.parameters()).device
    out = torch.empty(len(ds), model.config.hidden_size)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        b = {k: v.to(device) for k, v in collate([ds[i] for i in idx]).items()}
        out[idx] = mean_pool(model(**b).last_hidden_state, b["attention_mask"]).float().cpu()
    return out


def sts_spearman(model: torch.nn.Module, tokenizer: Any, pairs: StsPairs, cfg: EmbeddingConfig) -> dict[str, float]:
    from blockprune.frontends.metrics import pearson, spearman

    ea = embed(model, tokenizer, pairs.a, cfg.eval_batch_size, cfg.max_length)
    eb = embed(model, tokenizer, pairs.b, cfg.eval_batch_size, cfg.max_length)
    cos = (ea * eb).sum(-1).numpy()
    return {"metric": "spearman", "score": spearman(cos, pairs.gold), "values": {
        "spearman": spearman(cos, pairs.gold), "pearson": pearson(cos, pairs.gold)}, "loss": float("nan")}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def relation_mse(es: torch.Tensor, et: torch.Tensor) -> torch.Tensor:
    """MSE between the student's and the teacher's in-batch cosine-similarity matrices (off the
    diagonal; both inputs L2-normalised, ``[batch, dim]``).

    Why: zero-shot STS ranks pairs by their cosine, so what must survive pruning is how sentences
    relate to each other; ``1 - cos(e_s, e_t)`` pulls each embedding towards its teacher but does
    not weigh the errors that reorder pairs. 0 for a batch of one sentence."""
    n = es.shape[0]
    if n < 2:
        return es.sum() * 0.0
    off = ~torch.eye(n, dtype=torch.bool, device=es.device)
    return F.mse_loss((es @ es.T)[off], (et @ et.T).detach().to(es.dtype)[off])


def embedding_loss_fn(cfg: EmbeddingConfig, teacher: torch.nn.Module):
    """``cos_w (1 - cos) + mse_w MSE(embeddings) + hidden_w MSE(hidden states) + rel_w
    relation_mse`` to the teacher."""
    hidden = cfg.hidden_weight > 0

    def loss_fn(pmodel: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        s = pmodel(**batch, output_hidden_states=hidden)
        with torch.no_grad():
            t = teacher(**batch, output_hidden_states=hidden)
        mask = batch["attention_mask"]
        es, et = mean_pool(s.last_hidden_state, mask), mean_pool(t.last_hidden_state, mask)
        loss = cfg.cosine_weight * (1.0 - (es * et).sum(-1)).mean()
        if cfg.mse_weight:
            loss = loss + cfg.mse_weight * F.mse_loss(es, et) * es.shape[-1]
        if hidden:
            loss = loss + cfg.hidden_weight * hidden_mse(s.hidden_states, t.hidden_states, mask)
        if cfg.relation_weight:
            loss = loss + cfg.relation_weight * relation_mse(es, et)
        return loss

    return loss_fn


@dataclass
class EmbeddingResult:
    out: Path
    finished: bool
    stages_run: list[str]
    stages_skipped: list[str]
    metrics: dict[str, float]
    compression_rate: float | None = None
    model_dir: Path | None = None
    onnx_path: Path | None = None
    masks_path: Path | None = None
    report_path: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)


def _calib_batches(ds: _Texts, collate: Any, n: int, bs: int = 32) -> list[dict[str, torch.Tensor]]:
    idx = list(range(min(n, len(ds))))
    return [collate([ds[i] for i in idx[s:s + bs]]) for s in range(0, len(idx), bs)]


def run_embedding(cfg: EmbeddingConfig) -> EmbeddingResult:
    """Run (or resume) a task-agnostic embedding run; see the module docstring."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from blockprune.models.zoo import load_model

    t_run = time.perf_counter()
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    texts = read_sentences(cfg.text, cfg.limit_train)
    pairs = read_sts_dev(cfg.sts_dir, cfg.limit_eval)
    set_seed(cfg.seed)
    loaded = load_model(cfg.model, head="encoder", seed=cfg.seed)
    set_attention(loaded.model, cfg.attention)
    tokenizer = loaded.tokenizer()
    layers = select_layers(loaded.model, cfg.selection())
    out = Path(cfg.out)
    state = RunState(out, cfg.fingerprint())

    accelerator = Accelerator()
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
    ds = _Texts(texts, tokenizer, cfg.max_length)
    collate = _collate(tokenizer.pad_token_id or 0)
    dense = frozen_teacher(loaded.model)

    def eval_now() -> dict[str, Any]:
        return sts_spearman(loaded.model, tokenizer, pairs, cfg)

    if not state.done("initial"):
        state.record("initial", {"eval": eval_now(), "epochs": 0, "seconds": 0.0}, write=main)
    plan = [StagePlan("gradual", cfg.epochs_gradual, cfg.lr), StagePlan("retrain", cfg.epochs_retrain, cfg.lr)]
    run, skipped = [], []
    weights_of = last_done = "initial"
    masks: dict[str, LayerMask] | None = None
    for index, stage in enumerate(plan):
        if state.done(stage.name):
            skipped.append(stage.name)
            last_done = stage.name
            if cfg.stop_after == stage.name:
                break
            continue
        if weights_of != last_done:
            _load_weights(loaded, checkpoint_dir(out, last_done), cfg.attention)
            weights_of = last_done
        set_seed(cfg.seed + 1000 * (index + 1))
        lengths = [len(f["input_ids"]) for f in ds.features]
        loader = DataLoader(ds, batch_sampler=LengthGroupedBatches(lengths, cfg.batch_size, cfg.seed + index + 1),
                            collate_fn=collate)
        teacher = dense.to(accelerator.device)
        t0 = time.perf_counter()
        info: dict[str, Any] = {}
        box: list[GradualPruner] = []
        make_pruner = None
        if stage.name == "gradual":
            fn = None
            if cfg.score == "activation":
                fn = collect_feature_norms(loaded.model, layers, _calib_batches(ds, collate, cfg.calib_examples),
                                           cfg.calib_examples)
            allocation = _allocation(cfg, loaded.model, layers, fn, _calib_batches(ds, collate,
                                                                                   cfg.sensitivity_examples))
            info["allocation"] = allocation

            def make_pruner(inner: torch.nn.Module, total_steps: int) -> GradualPruner:
                sch = CubicSchedule.over_run(total_steps, cfg.ramp_fraction, cfg.prune_every)
                box.append(GradualPruner(inner, layers, allocation["ratios"], sch, fn))
                return box[-1]
            stage_masks = None
        else:
            masks = masks or _masks_from_file(checkpoint_dir(out, "gradual") / "block_masks.safetensors", layers)
            stage_masks = masks
        if stage.epochs > 0:
            stats, masked = train_loop(accelerator, loaded.model, loader, stage, cfg,
                                       embedding_loss_fn(cfg, teacher), masks=stage_masks, make_pruner=make_pruner)
        else:
            from blockprune.frontends.masked import MaskedTraining
            from blockprune.frontends.stages import StageStats

            stats, masked = StageStats(), MaskedTraining(loaded.model, stage_masks)
        if box:
            masks = box[-1].masks()
        kept = masked.squash()
        from blockprune.frontends.masked import verify_masked

        checked = verify_masked(loaded.model, kept)
        loaded.model.eval()
        ev = eval_now()
        if main:
            _save_pretrained_atomic(loaded.model, tokenizer, checkpoint_dir(out, stage.name), extra={
                "block_masks.safetensors": {n: m.mask.to(torch.uint8) for n, m in masks.items()}})
        accelerator.wait_for_everyone()
        info.update({"eval": ev, "epochs": stage.epochs, "lr": stage.lr, "loss": stats.loss, "steps": stats.steps,
                     "steps_per_second": stats.steps_per_second, "masked_entries_checked": checked,
                     "history": stats.history, "seconds": time.perf_counter() - t0})
        state.record(stage.name, info, write=main)
        run.append(stage.name)
        weights_of = last_done = stage.name
        if cfg.stop_after == stage.name:
            break
    metrics = {k: v["eval"]["score"] for k, v in state.data["stages"].items()}
    if not state.done("retrain") or cfg.stop_after not in (None, "retrain") or not main:
        return EmbeddingResult(out, False, run, skipped, metrics)
    if weights_of != "retrain":
        _load_weights(loaded, checkpoint_dir(out, "retrain"), cfg.attention)
    masks = _masks_from_file(checkpoint_dir(out, "retrain") / "block_masks.safetensors", layers)
    allocation = state.get("gradual").get("allocation")
    exported = export_outputs(loaded, tokenizer, masks, out, cfg.exporter, MASK_SOURCE, extra={
        "mode": "embedding", "ratio": cfg.ratio, "model": cfg.model, "score": cfg.score,
        "allocation": {"rule": allocation["rule"], "ratios": allocation["ratios"]}})
    comp = compression_stats(loaded.model, unused=UNUSED_IN_EMBEDDING)
    report = {
        "mode": "embedding", "metric": "stsb_spearman_zero_shot", "method": "gradual", "mask_source": MASK_SOURCE,
        "model": cfg.model, "block": cfg.block, "ratio": cfg.ratio, "score": cfg.score,
        "dense_metric": state.get("initial")["eval"]["score"], "pruned_metric": state.get("retrain")["eval"]["score"],
        "task": "STS-B (zero-shot embedding)", "prune_mode": "layer",
        "stages": [_stage_row(s, state.get(s)) for s in ("initial", *STAGES) if state.get(s)],
        "allocation": allocation, "compression_rate": comp["compression_rate"], "density": comp["density"],
        "counted_weights": {"total": comp["total"], "nonzero": comp["nonzero"],
                            "rule": "every 2-D weight except embeddings and the pooler (not in the "
                                    "embedding ONNX); CR = total / nonzero"},
        "pruned_layers_sparsity": pruned_layers_sparsity(masks),
        "layers": {n: {**v, "pruned": n in masks, "block": str(masks[n].block) if n in masks else None}
                   for n, v in comp["layers"].items()},
        "masked_entries_verified_zero": exported.masked_entries_checked,
        "onnx_export_max_abs_diff": exported.max_abs_diff,
        "outputs": {"model_dir": str(exported.model_dir), "onnx": str(exported.onnx_path),
                    "masks": str(exported.masks_path)},
        "training_sentences": len(texts), "sts_pairs": len(pairs.a),
        "timings": {"this_call_seconds": time.perf_counter() - t_run, "finalise_seconds": exported.seconds},
        "stages_run_this_call": run, "stages_skipped_this_call": skipped, "config": dataclasses.asdict(cfg),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "python": platform.python_version(), "machine": platform.machine()},
    }
    report_path = out / "report.json"
    _write_json(report_path, report)
    from blockprune.console import console

    console.print(f"STS-B dev Spearman (zero-shot): dense {report['dense_metric']:.4f} -> pruned "
                  f"{report['pruned_metric']:.4f} at {comp['compression_rate']:.2f}x ({cfg.block}, ratio {cfg.ratio:g})")
    return EmbeddingResult(out, True, run, skipped, metrics, comp["compression_rate"], exported.model_dir,
                           exported.onnx_path, exported.masks_path, report_path, report)


def _stage_row(stage: str, rec: dict[str, Any]) -> dict[str, Any]:
    """A report row in the GLUE report's shape (``blockprune report`` renders both)."""
    return {"stage": stage, "epochs": rec.get("epochs", 0), "lr": rec.get("lr"), "metric": rec["eval"]["score"],
            "metrics": rec["eval"]["values"], "dev_loss": None, "train_loss": rec.get("loss"), "penalty": None,
            "steps": rec.get("steps"), "steps_per_second": rec.get("steps_per_second"),
            "history": rec.get("history"), "seconds": rec.get("seconds")}


@torch.no_grad()
def _allocation(cfg: EmbeddingConfig, model: torch.nn.Module, layers: dict[str, BlockShape],
                fn: dict[str, torch.Tensor] | None, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    sizes = {n: int(dict(model.named_parameters())[n].numel()) for n in layers}
    if cfg.allocation == "plan":  # per-layer ratios (and blocks, via the selection) from `blockprune plan`
        from blockprune.frontends.allocation import plan_allocation

        return plan_allocation(cfg.plan_file, list(layers), sizes)
    if cfg.allocation == "uniform":
        ratios = {n: float(cfg.ratio) for n in layers}
        return {"rule": "uniform", "ratios": ratios, "overall": overall_ratio(ratios, sizes), "curves": None}
    model.eval()
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    ref = [mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for b in batches]

    def loss() -> float:
        cos = [(mean_pool(model(**b).last_hidden_state, b["attention_mask"]) * r).sum(-1) for b, r in zip(batches, ref)]
        return float(1.0 - torch.cat(cos).mean())

    key = {"model": cfg.model, "mode": "embedding", "text": str(cfg.text), "limit_train": cfg.limit_train,
           "blocks": {n: str(b) for n, b in layers.items()}, "ratios": sorted(cfg.sensitivity_ratios),
           "examples": cfg.sensitivity_examples, "score": cfg.score, "calib_examples": cfg.calib_examples,
           "max_length": cfg.max_length}
    curves = load_curves(cfg.sensitivity_file, key)
    if curves is None:
        curves = measure_sensitivity(model, layers, cfg.sensitivity_ratios, loss, fn,
                                     log=print if cfg.progress else None)
        save_curves(cfg.sensitivity_file, key, curves)
    ratios = allocate(curves, cfg.ratio, max_ratio=cfg.max_layer_ratio)
    return {"rule": "sensitivity", "ratios": ratios, "overall": overall_ratio(ratios, sizes),
            "curves": curves.to_json(), "measure": "1 - mean cosine to the unpruned embedding"}


def embedding_config_from_args(args: argparse.Namespace) -> EmbeddingConfig:
    """``EmbeddingConfig`` from ``blockprune train --mode embedding`` flags."""
    from blockprune.frontends.train_cli import _ratios

    if not args.text:
        raise BlockpruneError("--mode embedding needs --text FILE (one sentence per line)",
                              "build one from GLUE: python -m blockprune.frontends.embedding extract "
                              "--out runs/embedding/sentences.txt")
    sts = args.sts_dir or (str(Path(args.data_dir) / "STS-B") if args.data_dir else "../shared/data/glue/STS-B")
    return EmbeddingConfig(
        text=args.text, out=args.out, model=args.model, sts_dir=sts, block=args.block or "16x1",
        ratio=args.ratio, include=list(args.include or DEFAULT_INCLUDE), exclude=list(args.exclude or DEFAULT_EXCLUDE),
        block_overrides=list(args.block_override), epochs_gradual=args.epochs_rew, epochs_retrain=args.epochs_retrain,
        lr=args.lr if args.lr is not None else 5e-5, batch_size=args.batch_size, max_length=args.max_length,
        weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, cosine_weight=args.cosine_weight,
        mse_weight=args.mse_weight, hidden_weight=args.hidden_weight,
        relation_weight=args.relation_weight, score=args.score,
        calib_examples=args.calib_examples, prune_every=args.prune_every, ramp_fraction=args.ramp_fraction,
        allocation="plan" if getattr(args, "plan", None) else args.allocation,
        sensitivity_ratios=_ratios(args.sensitivity_ratios),
        sensitivity_examples=args.sensitivity_examples, max_layer_ratio=args.max_layer_ratio, seed=args.seed,
        limit_train=args.limit_train, limit_eval=args.limit_eval, exporter=args.exporter, stop_after=args.stop_after,
        progress=not args.no_progress, threads=args.threads, freeze_embeddings=args.freeze_embeddings,
        attention=args.attention, optimizer=args.optimizer, plan_file=getattr(args, "plan", None))


def main(argv: list[str] | None = None) -> int:
    """``python -m blockprune.frontends.embedding extract --glue DIR --out FILE``."""
    ap = argparse.ArgumentParser(description="helpers of the embedding mode")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("extract", help="GLUE train sentences -> one sentence a line (for --text)")
    ex.add_argument("--glue", default="../shared/data/glue", help="GLUE root")
    ex.add_argument("--out", default="runs/embedding/sentences.txt")
    ex.add_argument("--per-task", type=int, default=20000, help="at most N sentences per task (0: all)")
    ex.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        path, counts = extract_glue_sentences(args.glue, args.out, args.per_task or None, args.seed)
    except BlockpruneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {sum(counts.values())} sentences to {path} ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
