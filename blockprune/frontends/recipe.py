"""The three-stage recipe of ``design/method.md`` as one resumable run on real GLUE data.

    dense fine-tuning -> reweighted group Lasso -> hard prune + masked retraining

``run_recipe(RecipeConfig(...))`` does all of it and writes, under ``out/``:

* ``model/``: the pruned Hugging Face checkpoint (``save_pretrained`` + tokenizer);
* ``model.onnx``: that model exported (weights named after HF parameters);
* ``masks.safetensors``: the block masks keyed by the ONNX initializer names, each in its
  initializer's layout, so ``blockprune prune model.onnx --masks masks.safetensors`` applies them;
* ``report.json``: metric before/after every stage, per-layer density, compression rate as the
  paper counts it, group-norm statistics, timings and the config;
* ``checkpoints/<stage>/`` and ``state.json``: one checkpoint per finished stage, so a run that
  was interrupted resumes at the first unfinished stage (a stage is the unit of resumption).

Why one module owns the whole flow: the stages share a model, data, an ``Accelerator`` and the
run directory, and resumption only works if one place decides what "finished" means. The
building blocks (penalty, hard pruning, masked training, data, metrics, export) live in their
own modules; this one only wires them and keeps the books.

``method="magnitude"`` is the comparison baseline: the reweighted stage is skipped, the dense
weights are pruned one-shot by block L2 norm, and the same masked-retraining budget follows.

Every check on user input (task, data files and their rows, block vs layer shapes, ratio, mode,
an out dir holding a different run) happens before the out dir is created or a step is taken.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from blockprune.blocks import BlockShape, check_sparsity
from blockprune.errors import BlockpruneError
from blockprune.frontends.glue import GlueDataset, TaskSpec, get_task, make_collator, read_glue_split
from blockprune.frontends.grouping import group_norms
from blockprune.frontends.distill import DistillConfig, distillation_loss, frozen_teacher
from blockprune.frontends.hard_prune import (
    DEFAULT_EXCLUDE,
    DEFAULT_INCLUDE,
    MODES,
    HardPruneConfig,
    LayerMask,
    LayerSelection,
    hard_prune,
    select_layers,
)
from blockprune.frontends.masked import MaskedTraining, verify_masked
from blockprune.frontends.metrics import compute_metrics
from blockprune.frontends.regularizer import GroupLassoConfig, RefreshSchedule, ReweightedGroupLasso
from blockprune.io import atomic_path

METHODS = ("rgl", "magnitude")
STAGES = ("dense", "reweighted", "retrain")
MASK_SOURCES = {"rgl": "reweighted-group-lasso", "magnitude": "magnitude"}
#: Pooler and classifier heads; pruned only with ``include_heads`` (always counted in the CR).
HEAD_PATTERN = r"(^|\.)(pooler|pre_classifier|classifier)\."
STATE_FORMAT = "blockprune.recipe-state/1"
#: Config fields that do not change what a run computes, so a resume may differ in them.
_NOT_FINGERPRINTED = ("out", "stop_after", "progress", "threads")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class RecipeConfig:
    """Everything a run needs; the defaults are the paper's (lr 2e-5, batch 32, length 128,
    lambda 1e-4, eps 1e-3, 1x32 row segments, same ratio in every layer).

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
    lam: float = 1e-4
    layer_lambdas: list[tuple[str, float]] = field(default_factory=list)
    eps: float = 1e-3
    refresh_every_epochs: int | None = 1
    refresh_every_steps: int | None = None
    distill: float = 0.0  # share of the teacher term in masked retraining (0: off)
    distill_temperature: float = 2.0
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
        return LayerSelection(include=list(self.include), exclude=exclude, block=self.block,
                              block_overrides=[tuple(x) for x in self.block_overrides])

    def hard_prune_config(self) -> HardPruneConfig:
        return HardPruneConfig(mode=self.prune_mode, sparsity=self.ratio, threshold=self.threshold)

    def distill_config(self) -> DistillConfig:
        return DistillConfig(weight=self.distill, temperature=self.distill_temperature)

    def lasso_config(self) -> GroupLassoConfig:
        schedule = RefreshSchedule(every_steps=self.refresh_every_steps, every_epochs=self.refresh_every_epochs)
        return GroupLassoConfig(lam=self.lam, eps=self.eps, layer_lambdas=[tuple(x) for x in self.layer_lambdas],
                                schedule=schedule)

    def plan(self) -> list["StagePlan"]:
        """The stages this method runs, in order (0-epoch stages included, they are skipped)."""
        stages = [StagePlan("dense", self.epochs_dense, self.lr_dense)]
        if self.method == "rgl":
            stages.append(StagePlan("reweighted", self.epochs_rew, self.lr_rew))
        stages.append(StagePlan("retrain", self.epochs_retrain, self.lr_retrain))
        return stages

    def validate(self) -> None:
        """Refuse bad settings with one clear error each (nothing touches disk before this)."""
        if self.method not in METHODS:
            raise BlockpruneError(f"unknown method {self.method!r}",
                                  "use rgl (reweighted group Lasso) or magnitude (one-shot baseline)")
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
            raise BlockpruneError("stop_after=reweighted, but the magnitude method has no reweighted stage",
                                  "use stop_after=dense or retrain")
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
        if not self.distill:  # off: the fingerprint of runs made before the option existed
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


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | Path, spec: TaskSpec) -> tuple[Path, TaskSpec]:
    """(GLUE root, spec) for ``glue.read_glue_split``. A task folder under any name is accepted:
    when ``data_dir`` itself holds the train file, the spec is pointed at that folder."""
    root = Path(data_dir)
    if not root.is_dir():
        raise BlockpruneError(
            f"GLUE data directory {str(root)!r} does not exist",
            f"pass the {spec.dir_name}/ task folder (holding {spec.splits['train']} and {spec.splits['dev']}) "
            "or the GLUE root above it, e.g. ../shared/data/glue/" + spec.dir_name,
        )
    if (root / spec.dir_name).is_dir():
        return root, spec
    if root.name == spec.dir_name or any((root / f).is_file() for f in spec.splits.values()):
        return root.resolve().parent, dataclasses.replace(spec, dir_name=root.resolve().name)
    return root, spec  # glue.split_path names what is missing


@dataclass
class TaskData:
    spec: TaskSpec
    train: list
    dev: list


def read_task_data(cfg: RecipeConfig) -> TaskData:
    """Read and validate both splits up front, so a bad row fails before any training."""
    spec = get_task(cfg.task)
    root, spec = resolve_data_dir(cfg.data_dir, spec)
    train = read_glue_split(root, spec, "train", limit=cfg.limit_train)
    dev = read_glue_split(root, spec, "dev", limit=cfg.limit_eval)
    for split, rows in (("train", train), ("dev", dev)):
        if not rows:
            raise BlockpruneError(f"the {spec.name} {split} split holds no examples",
                                  "restore the original GLUE file")
    return TaskData(spec, train, dev)


class LengthGroupedBatches:
    """Batch sampler: shuffled batches of similar length (like HF's ``group_by_length``).

    Why: the collator pads each batch to its longest sequence, and on CPU padding is most of
    the cost for RTE-like length spreads. Indices are shuffled, cut into mega-batches of
    ``mega`` batches, each sorted by length and cut into batches, and the batch order is
    shuffled again. Deterministic per (seed, epoch); the epoch advances at each iteration, so a
    stage replays identically when it is rerun after an interruption.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, mega: int = 50) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega = mega
        self.epoch = 0
        self.drop_last = False  # read by accelerate when it shards batches across processes

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        idx = list(range(len(self.lengths)))
        rng.shuffle(idx)
        size = self.batch_size * self.mega
        batches: list[list[int]] = []
        for start in range(0, len(idx), size):
            chunk = sorted(idx[start:start + size], key=lambda i: -self.lengths[i])
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        yield from batches


@dataclass
class TokenizedData:
    """Both splits tokenised once per run (SST-2 train takes a while) and their collator."""

    train: GlueDataset
    dev: GlueDataset
    collate: Any

    @classmethod
    def build(cls, cfg: RecipeConfig, data: TaskData, tokenizer: Any) -> "TokenizedData":
        return cls(GlueDataset(data.train, tokenizer, data.spec, max_length=cfg.max_length),
                   GlueDataset(data.dev, tokenizer, data.spec, max_length=cfg.max_length),
                   make_collator(tokenizer, data.spec))

    def train_loader(self, cfg: RecipeConfig, seed: int):
        """Shuffled (length-grouped by default) batches; a new loader per stage, seeded per stage."""
        from torch.utils.data import DataLoader

        if cfg.group_by_length:
            lengths = [len(f["input_ids"]) for f in self.train.features]
            return DataLoader(self.train, batch_sampler=LengthGroupedBatches(lengths, cfg.batch_size, seed),
                              collate_fn=self.collate)
        return DataLoader(self.train, batch_size=cfg.batch_size, shuffle=True, collate_fn=self.collate,
                          generator=torch.Generator().manual_seed(seed))

    def dev_loader(self, cfg: RecipeConfig):
        """Dev in file order (dynamic padding)."""
        from torch.utils.data import DataLoader

        return DataLoader(self.dev, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=self.collate)


# --------------------------------------------------------------------------------------------
# Run directory: state.json and per-stage checkpoints
# --------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class RunState:
    """``out/state.json``: the config fingerprint and, per finished stage, its record.

    A stage is recorded only after its checkpoint is fully written, so a crash mid-stage leaves
    the previous stage as the resumption point.
    """

    def __init__(self, out: Path, fingerprint: dict[str, Any]) -> None:
        self.out = out
        self.path = out / "state.json"
        self.data: dict[str, Any] = {"format": STATE_FORMAT, "config": fingerprint, "stages": {}}
        if self.path.is_file():
            try:
                stored = json.loads(self.path.read_text())
            except json.JSONDecodeError as exc:
                raise BlockpruneError(f"{self.path} is corrupt ({exc})",
                                      "delete the run directory or choose another --out") from exc
            if stored.get("config") != fingerprint:
                diff = sorted(k for k in set(fingerprint) | set(stored.get("config", {}))
                              if fingerprint.get(k) != stored.get("config", {}).get(k))
                raise BlockpruneError(
                    f"{out} holds a run with different settings ({', '.join(diff)})",
                    "use another --out directory, or delete this one to start over",
                )
            self.data = stored
        elif out.exists() and not out.is_dir():
            raise BlockpruneError(f"output {str(out)!r} is a file", "give a directory for the run")

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def record(self, stage: str, info: dict[str, Any], write: bool = True) -> None:
        self.data["stages"][stage] = info
        if write:
            _write_json(self.path, self.data)

    def get(self, stage: str) -> dict[str, Any] | None:
        return self.data["stages"].get(stage)


def checkpoint_dir(out: Path, stage: str) -> Path:
    return out / "checkpoints" / stage


def _save_pretrained_atomic(model: Any, tokenizer: Any, target: Path, extra: dict[str, Any] | None = None) -> None:
    """``save_pretrained`` into a temp dir beside ``target``, then swap it in: never half a checkpoint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    for name, tensors in (extra or {}).items():
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _load_weights(loaded: Any, ckpt: Path) -> None:
    """Replace ``loaded.model`` by the checkpoint's weights (same class, eager attention)."""
    cls = type(loaded.model)
    model = cls.from_pretrained(str(ckpt), local_files_only=True, attn_implementation="eager")
    model.eval()
    loaded.model = model
    loaded.config = model.config


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class StageStats:
    """What one stage did: mean task loss and penalty of its last epoch, steps, refreshes, time."""

    loss: float | None = None
    penalty: float | None = None
    steps: int = 0
    refreshes: int = 0
    seconds: float = 0.0


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm (the usual BERT fine-tuning setup)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_stage(
    accelerator: Any,
    model: torch.nn.Module,
    loader: Any,
    plan: StagePlan,
    cfg: RecipeConfig,
    layers: dict[str, BlockShape] | None = None,
    masks: dict[str, LayerMask] | None = None,
    teacher: torch.nn.Module | None = None,
) -> tuple[StageStats, MaskedTraining | None]:
    """One stage: AdamW + linear warm-up/decay through ``accelerator``.

    With ``layers`` the reweighted group Lasso penalty is added (alphas from the weights as they
    are now, refreshed on ``cfg``'s schedule). With ``masks`` the pruned weights are zeroed and
    kept exactly zero (gradient hook + re-applied after every optimizer step); the returned
    ``MaskedTraining`` still holds them, for the caller to verify and squash. With ``teacher`` the
    task loss is blended with the teacher's outputs (``cfg.distill``, see ``distill.py``).
    """
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    stats = StageStats()
    t0 = time.perf_counter()
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=plan.lr)
    total_steps = plan.epochs * len(loader)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), max(total_steps, 1))
    pmodel, popt, ploader, psched = accelerator.prepare(model, optimizer, loader, scheduler)
    inner = accelerator.unwrap_model(pmodel)
    masked = MaskedTraining(inner, masks, optimizer=getattr(popt, "optimizer", popt)) if masks else None
    reg = ReweightedGroupLasso(inner, layers, cfg.lasso_config()) if layers else None
    dcfg = cfg.distill_config()
    if teacher is not None:
        teacher = teacher.to(accelerator.device)
    step = 0
    for epoch in range(1, plan.epochs + 1):
        pmodel.train()
        losses, pens = [], []
        bar = tqdm(ploader, desc=f"{plan.name} epoch {epoch}/{plan.epochs}", leave=False, dynamic_ncols=True,
                   disable=not (cfg.progress and accelerator.is_local_main_process))
        for batch in bar:
            out = pmodel(**batch)
            loss = out.loss
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
                loss = distillation_loss(out.logits, t_logits, loss, dcfg)
            total = loss
            if reg is not None:
                pen = reg()
                total = loss + pen
                pens.append(float(pen.detach()))
            accelerator.backward(total)
            if cfg.max_grad_norm is not None:
                accelerator.clip_grad_norm_(pmodel.parameters(), cfg.max_grad_norm)
            popt.step()
            psched.step()
            popt.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(loss.detach()))
            if reg is not None:
                reg.on_step_end(step)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", **({"pen": f"{pens[-1]:.3g}"} if pens else {}))
        bar.close()
        if reg is not None:
            reg.on_epoch_end(epoch)
        stats.loss = float(np.mean(losses)) if losses else None
        stats.penalty = float(np.mean(pens)) if pens else None
    stats.steps = step
    stats.refreshes = reg.refreshes if reg is not None else 0
    stats.seconds = time.perf_counter() - t0
    accelerator.free_memory()
    pmodel.eval()
    return stats, masked


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


# --------------------------------------------------------------------------------------------
# Group norms: does the penalty separate the groups that get pruned from the kept ones?
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def snapshot_group_norms(model: torch.nn.Module, layers: dict[str, BlockShape]) -> dict[str, torch.Tensor]:
    """Plain L2 norm of every group of every selected layer (CPU float32, shape = block grid)."""
    params = dict(model.named_parameters())
    return {n: group_norms(params[n].detach().float().cpu(), b).contiguous() for n, b in layers.items()}


def norm_split(norms: dict[str, torch.Tensor], keep: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean group norm of the groups that are (will be) pruned vs kept, and their ratio."""
    pruned = torch.cat([norms[n][~keep[n]].reshape(-1) for n in keep]) if keep else torch.zeros(0)
    kept = torch.cat([norms[n][keep[n]].reshape(-1) for n in keep]) if keep else torch.zeros(0)
    mp = float(pruned.mean()) if pruned.numel() else float("nan")
    mk = float(kept.mean()) if kept.numel() else float("nan")
    return {"pruned_mean_norm": mp, "kept_mean_norm": mk,
            "ratio": mp / mk if kept.numel() and mk > 0 and pruned.numel() else float("nan")}


# --------------------------------------------------------------------------------------------
# Outputs: masks keyed by ONNX initializer names, compression statistics, report
# --------------------------------------------------------------------------------------------


def build_maskset(onnx_model: Any, masks: dict[str, LayerMask], source: str, extra: dict[str, Any]):
    """A ``MaskSet`` keyed by the exported model's initializer names, in each one's layout.

    The exporter renamed initializers to HF parameter names and recorded the layout in
    ``param_map``; a pruned parameter missing there (e.g. two parameters with identical values,
    which the exporter refuses to guess between) is an error: masks that silently skip a layer
    would make the ONNX model denser than the PyTorch one.
    """
    from blockprune.masks import LayerMaskInfo, MaskSet
    from blockprune.onnx_io import get_meta

    param_map = get_meta(onnx_model, "param_map", {}) or {}
    inits = {t.name for t in onnx_model.graph.initializer}
    out: dict[str, np.ndarray] = {}
    info: dict[str, LayerMaskInfo] = {}
    missing = []
    for name, lm in masks.items():
        entry = param_map.get(name)
        if entry is None or name not in inits:
            missing.append(name)
            continue
        layout = entry.get("layout", "out_in")
        m = lm.mask.numpy().astype(np.uint8)
        if layout == "in_out":
            m = np.ascontiguousarray(m.T)
        out[name] = m
        info[name] = LayerMaskInfo(block=str(lm.block), sparsity=lm.sparsity, hf_name=name, layout=layout)
    if missing:
        raise BlockpruneError(
            f"{len(missing)} pruned weight(s) have no initializer in the exported model: {', '.join(missing[:5])}",
            "export with the other exporter (exporter='legacy'|'dynamo'); report this if it persists",
        )
    return MaskSet(masks=out, source=source, layers=info, extra=extra)


def check_onnx_zeros(onnx_model: Any, maskset: Any) -> None:
    """Every masked entry of the exported initializers is exactly 0 (keys and layouts agree)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in onnx_model.graph.initializer}
    bad = [k for k, m in maskset.masks.items() if np.any(numpy_helper.to_array(inits[k])[m == 0] != 0)]
    if bad:
        raise BlockpruneError(f"exported weights are nonzero under their masks: {', '.join(bad[:5])}",
                              "this is a bug in the mask layout handling; please report it")


def compression_stats(model: torch.nn.Module) -> dict[str, Any]:
    """The paper's count: every 2-D weight except embeddings (encoder Linears, pooler,
    classifier), CR = total / nonzero; biases are not counted."""
    layers, total, nonzero = {}, 0, 0
    for name, p in model.named_parameters():
        if p.dim() != 2 or "embed" in name:
            continue
        nz = int(torch.count_nonzero(p.detach()))
        layers[name] = {"shape": list(p.shape), "density": nz / p.numel(), "nonzero": nz, "total": p.numel()}
        total += p.numel()
        nonzero += nz
    return {"layers": layers, "total": total, "nonzero": nonzero,
            "compression_rate": total / nonzero if nonzero else float("inf"),
            "density": nonzero / max(total, 1)}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


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
        if stage.epochs == 0 and stage.name != "retrain":
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
            _load_weights(loaded, checkpoint_dir(out, last_done))
            weights_of = last_done
        set_seed(cfg.seed + 1000 * (index + 1))
        train_loader = tokenized.train_loader(cfg, seed=cfg.seed + index + 1)
        t0 = time.perf_counter()
        extra: dict[str, dict[str, torch.Tensor]] = {}
        masks = None
        teacher = None
        if stage.name == "retrain":
            if cfg.distill_config().enabled and stage.epochs > 0:
                teacher = frozen_teacher(loaded.model)  # the model right before hard pruning
            masks = hard_prune(loaded.model, layers, hp_config)
            extra["block_masks.safetensors"] = {n: m.mask.to(torch.uint8) for n, m in masks.items()}
        reg_layers = layers if stage.name == "reweighted" else None
        masked = None
        if stage.epochs > 0:
            stats, masked = train_stage(accelerator, loaded.model, train_loader, stage, cfg, reg_layers, masks,
                                        teacher)
            del teacher
        else:
            stats = StageStats()
            if masks:
                masked = MaskedTraining(loaded.model, masks)
        checked = None
        if masked is not None:
            verify_masked(loaded.model)  # attached masks: every pruned entry is exactly 0.0
            kept = masked.squash()
            checked = verify_masked(loaded.model, kept)
            final_masks = masks
        loaded.model.eval()
        ev = eval_now()
        snap = snapshot_group_norms(loaded.model, layers)
        if main:
            _save_pretrained_atomic(loaded.model, tokenizer, ckpt, extra={"group_norms.safetensors": snap, **extra})
        accelerator.wait_for_everyone()
        state.record(stage.name, write=main, info={
            "eval": ev, "epochs": stage.epochs, "lr": stage.lr, "loss": stats.loss, "penalty": stats.penalty,
            "steps": stats.steps, "alpha_refreshes": stats.refreshes, "masked_entries_checked": checked,
            "seconds": time.perf_counter() - t0,
        })
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
        _load_weights(loaded, checkpoint_dir(out, "retrain"))
    if final_masks is None:
        final_masks = _masks_from_file(checkpoint_dir(out, "retrain") / "block_masks.safetensors", layers)
    return _finalise(cfg, spec, loaded, tokenizer, layers, final_masks, state, norms, run, skipped,
                     metrics, metric_name, t_run)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise BlockpruneError(f"checkpoint file {path} is missing although state.json lists its stage as done",
                              "delete the run directory (or that stage's entry in state.json) and rerun")
    return load_file(str(path))


def _masks_from_file(path: Path, layers: dict[str, BlockShape]) -> dict[str, LayerMask]:
    from blockprune.frontends.grouping import keep_from_mask

    raw = _load_tensors(path)
    out = {}
    for n, block in layers.items():
        mask = raw[n].bool()
        out[n] = LayerMask(block=block, keep=keep_from_mask(mask, block), mask=mask)
    return out


def _finalise(cfg, spec, loaded, tokenizer, layers, masks, state, norms, run, skipped, metrics, metric_name,
              t_run) -> RecipeResult:
    from blockprune.masks import save_masks
    from blockprune.models.export import export_onnx

    out = Path(cfg.out)
    model = loaded.model.cpu().eval()
    checked = verify_masked(model, {n: m.mask for n, m in masks.items()})  # raises if any entry is not 0.0
    t0 = time.perf_counter()
    model_dir = out / "model"
    _save_pretrained_atomic(model, tokenizer, model_dir)
    exported = export_onnx(loaded, out / "model.onnx", exporter=cfg.exporter)
    source = MASK_SOURCES[cfg.method]
    maskset = build_maskset(exported.model, masks, source,
                            extra={"task": spec.name, "ratio": cfg.ratio, "prune_mode": cfg.prune_mode,
                                   "method": cfg.method, "model": cfg.model})
    check_onnx_zeros(exported.model, maskset)
    masks_path = save_masks(out / "masks.safetensors", maskset)
    export_seconds = time.perf_counter() - t0

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
                           "seconds": rec.get("seconds"), **norm_split(norms[name], keep)})
    pruned_total = sum(m.mask.numel() for m in masks.values())
    pruned_kept = sum(int(m.mask.sum()) for m in masks.values())
    report = {
        "task": spec.name, "metric": metric_name, "method": cfg.method, "mask_source": source,
        "model": cfg.model, "block": cfg.block, "ratio": cfg.ratio, "prune_mode": cfg.prune_mode,
        "dense_metric": _dense_metric(state), "pruned_metric": state.get("retrain")["eval"]["score"],
        "stages": stage_rows,
        "compression_rate": comp["compression_rate"], "density": comp["density"],
        "counted_weights": {"total": comp["total"], "nonzero": comp["nonzero"],
                            "rule": "every 2-D weight except embeddings; CR = total / nonzero"},
        "pruned_layers_sparsity": 1.0 - pruned_kept / max(pruned_total, 1),
        "layers": {n: {**v, "pruned": n in masks, "block": str(masks[n].block) if n in masks else None}
                   for n, v in comp["layers"].items()},
        "masked_entries_verified_zero": checked,
        "onnx_export_max_abs_diff": exported.max_abs_diff,
        "outputs": {"model_dir": str(model_dir), "onnx": str(exported.path), "masks": str(masks_path)},
        "timings": {"stages": {r["stage"]: r["seconds"] for r in stage_rows}, "finalise_seconds": export_seconds,
                    "this_call_seconds": time.perf_counter() - t_run},
        "stages_run_this_call": run, "stages_skipped_this_call": skipped,
        "config": dataclasses.asdict(cfg),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "python": platform.python_version(), "machine": platform.machine()},
    }
    report_path = out / "report.json"
    _write_json(report_path, report)
    _print_summary(report)
    return RecipeResult(out, True, run, skipped, metrics, metric_name, comp["compression_rate"], model_dir,
                        exported.path, masks_path, report_path, report)


def _dense_metric(state: RunState) -> float:
    """The metric of the dense model: after the dense stage, or the initial one when skipped."""
    rec = state.get("dense")
    if rec is not None and rec.get("epochs", 0) > 0:
        return rec["eval"]["score"]
    return state.get("initial")["eval"]["score"]


def _print_summary(report: dict[str, Any]) -> None:
    from rich.table import Table

    from blockprune.console import console, kv_table

    t = Table(title=f"{report['task']} {report['method']}: per stage (dev {report['metric']})", title_justify="left")
    for col in ("stage", "epochs", "dev metric", "train loss", "dev loss", "norm pruned", "norm kept",
                "pruned/kept", "time"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for r in report["stages"]:
        t.add_row(r["stage"], str(r["epochs"]), f"{r['metric']:.4f}", _fmt(r["train_loss"]), _fmt(r["dev_loss"]),
                  _fmt(r["pruned_mean_norm"]), _fmt(r["kept_mean_norm"]), _fmt(r["ratio"]),
                  f"{r['seconds'] or 0:.0f}s")
    console.print(t)
    console.print(kv_table("result", [
        ("dense -> pruned", f"{report['dense_metric']:.4f} -> {report['pruned_metric']:.4f} ({report['metric']})"),
        ("sparsity of pruned layers", f"{report['pruned_layers_sparsity']:.3f} ({report['block']} blocks, "
                                      f"{report['prune_mode']} mode)"),
        ("compression rate (paper's count)", f"{report['compression_rate']:.2f}x"),
        ("masked entries verified 0.0", str(report["masked_entries_verified_zero"])),
        ("outputs", ", ".join(report["outputs"].values())),
    ]))


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}"
