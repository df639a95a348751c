"""GLUE data for the recipe: reading and validating both splits up front, length-grouped
training batches, length-sorted evaluation batches, and a fixed calibration slice.

Why sorted evaluation: the collator pads each batch to its longest sequence; sorting the dev set
by length makes every batch nearly padding-free (metrics do not depend on example order, and the
labels travel with their examples).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from blockprune.errors import BlockpruneError
from blockprune.frontends.glue import GlueDataset, TaskSpec, get_task, make_collator, read_glue_split


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


def read_task_data(cfg: Any) -> TaskData:
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
    """Both splits tokenised once per run (SST-2 train takes a while) and their collator;
    ``augmented`` holds the teacher-only perturbed copies (``cfg.augment``, see ``augment.py``)."""

    train: GlueDataset
    dev: GlueDataset
    collate: Any
    augmented: GlueDataset | None = None

    @classmethod
    def build(cls, cfg: Any, data: TaskData, tokenizer: Any) -> "TokenizedData":
        from blockprune.frontends.augment import perturbed_copies

        copies = perturbed_copies(data.train, data.spec, int(getattr(cfg, "augment", 0) or 0), cfg.seed)
        return cls(GlueDataset(data.train, tokenizer, data.spec, max_length=cfg.max_length),
                   GlueDataset(data.dev, tokenizer, data.spec, max_length=cfg.max_length),
                   make_collator(tokenizer, data.spec),
                   GlueDataset(copies, tokenizer, data.spec, max_length=cfg.max_length) if copies else None)

    def train_loader(self, cfg: Any, seed: int, augmented: bool = False):
        """Shuffled (length-grouped by default) batches; a new loader per stage, seeded per stage.
        ``augmented``: the training set plus its teacher-only copies (distilled stages only: a
        stage without a teacher has no loss for them)."""
        from torch.utils.data import ConcatDataset, DataLoader

        parts = [self.train] + ([self.augmented] if augmented and self.augmented is not None else [])
        dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        if cfg.group_by_length:
            lengths = [len(f["input_ids"]) for p in parts for f in p.features]
            return DataLoader(dataset, batch_sampler=LengthGroupedBatches(lengths, cfg.batch_size, seed),
                              collate_fn=self.collate)
        return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, collate_fn=self.collate,
                          generator=torch.Generator().manual_seed(seed))

    def dev_loader(self, cfg: Any):
        """Dev sorted by length, longest first (dynamic padding wastes almost nothing)."""
        from torch.utils.data import DataLoader

        order = sorted(range(len(self.dev)), key=lambda i: -len(self.dev.features[i]["input_ids"]))
        return DataLoader(self.dev, batch_size=cfg.eval_batch_size, sampler=order, collate_fn=self.collate)

    def calib_batches(self, cfg: Any, examples: int, batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
        """The first ``examples`` training examples, in file order, as model inputs (no labels):
        the same slice on every call and every resume, for activation norms and sensitivity."""
        idx = list(range(min(examples, len(self.train))))
        out = []
        for s in range(0, len(idx), batch_size):
            batch = self.collate([self.train[i] for i in idx[s:s + batch_size]])
            batch.pop("labels", None)
            out.append(batch)
        return out


