"""GLUE tasks from the original local TSV files: specs, a validating reader, dataset, collate.

Why our own reader: the files are not quite CSV. Quotes are literal text (STS-B, QNLI and MRPC
contain unbalanced ``"``), so every file is read with ``csv.QUOTE_NONE``; MRPC headers start
with a UTF-8 byte-order mark (read as ``utf-8-sig``); CoLA has no header at all. Every problem
with the data (missing folder or file, unknown task, a row with the wrong number of columns, a
label outside the task's label set) is raised as a ``BlockpruneError`` naming file and line
*while reading*, i.e. before any training starts, instead of as a shape error an hour later.

Column count: files with a header must have, on every row, as many fields as the header (MNLI
train has 12 columns and its dev files 16, so a fixed count per task would be wrong); CoLA rows
must have 4.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from blockprune.errors import BlockpruneError

@dataclass(frozen=True)
class TaskSpec:
    """How to read one GLUE task.

    Columns are header names, or 0-based indices for headerless files (CoLA). ``labels`` is the
    ordered label set (label id = position) or ``None`` for regression (STS-B, scores in
    ``score_range``). ``splits`` maps split name to file name inside ``dir_name``.
    """

    name: str
    dir_name: str
    text_a: str | int
    text_b: str | int | None
    label: str | int
    labels: tuple[str, ...] | None
    metric: str
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train.tsv", "dev": "dev.tsv"})
    has_header: bool = True
    n_columns: int | None = None  # only for headerless files
    score_range: tuple[float, float] | None = None

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        """Output width of the classifier head (1 for regression)."""
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_pair(self) -> bool:
        return self.text_b is not None


_BIN = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
_MNLI_SPLITS = {
    "train": "train.tsv",
    "dev": "dev_matched.tsv",
    "dev_matched": "dev_matched.tsv",
    "dev_mismatched": "dev_mismatched.tsv",
}

TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        TaskSpec("CoLA", "CoLA", 3, None, 1, _BIN, "mcc", has_header=False, n_columns=4),
        TaskSpec("SST-2", "SST-2", "sentence", None, "label", _BIN, "accuracy"),
        TaskSpec("MRPC", "MRPC", "#1 String", "#2 String", "Quality", _BIN, "f1"),
        TaskSpec("QQP", "QQP", "question1", "question2", "is_duplicate", _BIN, "f1"),
        TaskSpec("STS-B", "STS-B", "sentence1", "sentence2", "score", None, "pearson_spearman",
                 score_range=(0.0, 5.0)),
        TaskSpec("MNLI", "MNLI", "sentence1", "sentence2", "gold_label",
                 ("contradiction", "entailment", "neutral"), "accuracy", splits=_MNLI_SPLITS),
        TaskSpec("MNLI-MM", "MNLI", "sentence1", "sentence2", "gold_label",
                 ("contradiction", "entailment", "neutral"), "accuracy",
                 splits={"train": "train.tsv", "dev": "dev_mismatched.tsv"}),
        TaskSpec("QNLI", "QNLI", "question", "sentence", "label", _NLI2, "accuracy"),
        TaskSpec("RTE", "RTE", "sentence1", "sentence2", "label", _NLI2, "accuracy"),
        TaskSpec("WNLI", "WNLI", "sentence1", "sentence2", "label", _BIN, "accuracy"),
    )
}

_ALIASES = {"MNLIM": "MNLI", "MNLIMATCHED": "MNLI", "MNLIMISMATCHED": "MNLI-MM"}


def _key(name: str) -> str:
    return "".join(ch for ch in name.upper() if ch.isalnum())


def get_task(name: str) -> TaskSpec:
    """Spec for ``name``, case- and punctuation-insensitive (``sst2``, ``sts-b``, ``mnli_mm``)."""
    k = _key(str(name))
    k = _key(_ALIASES.get(k, k))
    for spec in TASKS.values():
        if _key(spec.name) == k:
            return spec
    raise BlockpruneError(
        f"unknown GLUE task {name!r}",
        f"use one of: {', '.join(TASKS)}",
    )


@dataclass
class GlueExample:
    """One example; ``guid`` is ``file:line`` so any later problem can be traced to the data."""

    guid: str
    text_a: str
    text_b: str | None
    label: int | float


def split_path(data_dir: str | Path, task: str | TaskSpec, split: str = "train") -> Path:
    """The TSV file of ``task``/``split`` under the GLUE root ``data_dir``, checked to exist.

    ``data_dir`` is the folder holding ``CoLA/``, ``SST-2/``, ...; the task folder itself is
    accepted too.
    """
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    root = Path(data_dir)
    if not root.is_dir():
        raise BlockpruneError(
            f"GLUE data directory {str(root)!r} does not exist",
            "pass the folder that holds the task folders CoLA/, SST-2/, MRPC/, ... "
            "(e.g. ../shared/data/glue)",
        )
    if split not in spec.splits:
        raise BlockpruneError(
            f"task {spec.name} has no split {split!r}",
            f"use one of: {', '.join(spec.splits)} (GLUE test files carry no labels)",
        )
    task_dir = root if root.name == spec.dir_name and not (root / spec.dir_name).is_dir() else root / spec.dir_name
    if not task_dir.is_dir():
        raise BlockpruneError(
            f"GLUE data directory {str(root)!r} has no {spec.dir_name}/ folder for task {spec.name}",
            f"put {spec.dir_name}/{spec.splits[split]} under {str(root)!r}, or pick a task that is there: "
            f"{', '.join(sorted(p.name for p in root.iterdir() if p.is_dir())) or 'none'}",
        )
    path = task_dir / spec.splits[split]
    if not path.is_file():
        present = sorted(p.name for p in task_dir.glob("*.tsv"))
        raise BlockpruneError(
            f"split file {str(path)!r} for {spec.name} {split} does not exist",
            f"files present in {str(task_dir)!r}: {', '.join(present) or 'none'}; "
            "download the GLUE data or choose another split",
        )
    return path


def _column_index(spec: TaskSpec, header: list[str] | None, col: str | int, path: Path) -> int:
    if isinstance(col, int):
        return col
    assert header is not None
    if col not in header:
        raise BlockpruneError(
            f"{path}:1: header has no column {col!r} needed by task {spec.name} (header: {header})",
            "check that the file is the original GLUE TSV of this task",
        )
    return header.index(col)


def _parse_label(spec: TaskSpec, raw: str, path: Path, line: int) -> int | float:
    value = raw.strip()
    if spec.labels is not None:
        if value not in spec.labels:
            raise BlockpruneError(
                f"{path}:{line}: label {value!r} is not in the {spec.name} label set {list(spec.labels)}",
                "fix or remove that row; the file may belong to another task or be corrupted",
            )
        return spec.labels.index(value)
    try:
        score = float(value)
    except ValueError:
        score = math.nan
    lo, hi = spec.score_range or (-math.inf, math.inf)
    if not (lo <= score <= hi):
        raise BlockpruneError(
            f"{path}:{line}: label {value!r} is not a {spec.name} score in [{lo:g}, {hi:g}]",
            "fix or remove that row; the file may belong to another task or be corrupted",
        )
    return score


def read_glue_split(
    data_dir: str | Path, task: str | TaskSpec, split: str = "train", limit: int | None = None
) -> list[GlueExample]:
    """Read and validate ``task``/``split``. With ``limit`` only the first ``limit`` examples are
    read (and validated): enough for tests and smoke runs without parsing all of SST-2."""
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise BlockpruneError(
            f"example limit {limit!r} is not a positive integer",
            "give the number of examples to keep, e.g. 64, or no limit for the whole split",
        )
    path = split_path(data_dir, spec, split)
    examples: list[GlueExample] = []
    with path.open("r", encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header: list[str] | None = None
        if spec.has_header:
            header = next(reader, None)
            if header is None:
                raise BlockpruneError(f"{path} is empty", "restore the original GLUE file")
            n_cols = len(header)
        else:
            n_cols = spec.n_columns  # type: ignore[assignment]
        ia = _column_index(spec, header, spec.text_a, path)
        ib = None if spec.text_b is None else _column_index(spec, header, spec.text_b, path)
        il = _column_index(spec, header, spec.label, path)
        for row in reader:
            line = reader.line_num
            if not row:  # blank line, e.g. a trailing newline
                continue
            if len(row) != n_cols:
                raise BlockpruneError(
                    f"{path}:{line}: expected {n_cols} tab-separated columns, found {len(row)}",
                    "the row may contain a stray tab or be truncated; fix or remove it",
                )
            examples.append(
                GlueExample(
                    guid=f"{path.name}:{line}",
                    text_a=row[ia],
                    text_b=None if ib is None else row[ib],
                    label=_parse_label(spec, row[il], path, line),
                )
            )
            if limit is not None and len(examples) >= limit:
                break
    return examples


class GlueDataset(Dataset):
    """Tokenised examples (no padding: the collate pads each batch to its longest sequence).

    ``tokenizer`` is any Hugging Face tokenizer; it is called once on the whole list at
    construction, truncating to ``max_length``. ``token_type_ids`` are kept only if the
    tokenizer produces them (BERT does, RoBERTa and DistilBERT do not).
    """

    def __init__(
        self,
        examples: Sequence[GlueExample],
        tokenizer: Any,
        task: str | TaskSpec,
        max_length: int = 128,
    ) -> None:
        self.spec = task if isinstance(task, TaskSpec) else get_task(task)
        if max_length < 2:
            raise BlockpruneError(
                f"max_length={max_length} leaves no room for text",
                "use the paper's sequence length 128, or at least a few tokens",
            )
        self.examples = list(examples)
        self.max_length = max_length
        texts_a = [e.text_a for e in self.examples]
        kwargs: dict[str, Any] = {"truncation": True, "max_length": max_length}
        if self.spec.is_pair:
            enc = tokenizer(texts_a, [e.text_b or "" for e in self.examples], **kwargs)
        else:
            enc = tokenizer(texts_a, **kwargs)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        self.features = [{k: enc[k][i] for k in keys} for i in range(len(self.examples))]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.features[i])
        item["labels"] = self.examples[i].label
        return item


@dataclass
class GlueCollator:
    """Dynamic padding: pad each batch to its own longest sequence (faster than padding every
    example to 128). ``labels`` are int64, or float32 for regression (MSE loss)."""

    pad_token_id: int = 0
    regression: bool = False
    padding_side: str = "right"

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(b["input_ids"]) for b in batch)
        out: dict[str, torch.Tensor] = {}
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": 0}
        for key, pad in pads.items():
            if key not in batch[0]:
                continue
            rows = []
            for b in batch:
                seq = list(b[key])
                fill = [pad] * (longest - len(seq))
                rows.append(fill + seq if self.padding_side == "left" else seq + fill)
            out[key] = torch.tensor(rows, dtype=torch.long)
        labels = [b["labels"] for b in batch]
        out["labels"] = torch.tensor(labels, dtype=torch.float32 if self.regression else torch.long)
        return out


def make_collator(tokenizer: Any, task: str | TaskSpec) -> GlueCollator:
    """Collator with the tokenizer's pad id and padding side and the task's label dtype."""
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return GlueCollator(
        pad_token_id=0 if pad_id is None else int(pad_id),
        regression=spec.is_regression,
        padding_side=getattr(tokenizer, "padding_side", "right") or "right",
    )


def load_glue(
    data_dir: str | Path,
    task: str,
    split: str,
    tokenizer: Any,
    max_length: int = 128,
    limit: int | None = None,
) -> tuple[GlueDataset, GlueCollator]:
    """Read, validate and tokenise one split; returns the dataset and its collate function."""
    spec = get_task(task)
    examples = read_glue_split(data_dir, spec, split, limit=limit)
    return GlueDataset(examples, tokenizer, spec, max_length=max_length), make_collator(tokenizer, spec)
