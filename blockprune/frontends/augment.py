"""Perturbed copies of the training inputs, labelled by the teacher alone (distillation data).

Why: the small GLUE tasks (MRPC 3.7k pairs, STS-B 5.7k, RTE 2.5k, CoLA 8.5k) give a pruned
student too few inputs to learn the dense teacher's function from; TinyBERT's data augmentation
(word replacement, then distillation on the enlarged set) is what closed most of its gap on
those tasks. Here a copy of an example has some of its words replaced by words drawn from the
task's own training vocabulary (by frequency), deleted, or swapped with their neighbour. The
copies carry no label: their loss is the teacher's logits and hidden states only
(``distill.row_distillation_loss``), so a perturbation that flips the true label (an
ungrammatical CoLA sentence, a paraphrase that no longer is one) still teaches the student what
the teacher says about it. Deterministic per seed: a resumed stage sees the same copies.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, replace
from typing import Sequence

from blockprune.errors import BlockpruneError
from blockprune.frontends.glue import GlueExample, TaskSpec

#: the label of a teacher-only example: ``-100`` is PyTorch's ignore index for classification,
#: NaN cannot be a regression target
UNLABELED_CLASS = -100


def unlabeled(spec: TaskSpec) -> int | float:
    """The label value that marks an example with no gold label for ``spec``."""
    return math.nan if spec.is_regression else UNLABELED_CLASS


@dataclass(frozen=True)
class PerturbConfig:
    """``rate``: share of a text's words that are edited (at least one); of those edits,
    ``replace`` are replacements by a vocabulary word, ``delete`` deletions, the rest swaps
    with the next word."""

    rate: float = 0.15
    replace: float = 0.6
    delete: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 < self.rate <= 1.0:
            raise BlockpruneError(f"perturbation rate {self.rate!r} is not in (0, 1]", "use 0.15")
        if self.replace < 0 or self.delete < 0 or self.replace + self.delete > 1.0:
            raise BlockpruneError(f"replace {self.replace!r} + delete {self.delete!r} shares are not within [0, 1]",
                                  "use replace 0.6, delete 0.2 (the rest are swaps)")


class Vocabulary:
    """The words of the training texts and their counts: replacements are drawn by frequency,
    so a copy stays within the task's domain (news for MRPC, captions and forums for STS-B)."""

    def __init__(self, examples: Sequence[GlueExample]) -> None:
        counts: Counter[str] = Counter()
        for e in examples:
            counts.update(e.text_a.split())
            if e.text_b:
                counts.update(e.text_b.split())
        if not counts:
            raise BlockpruneError("the training texts hold no words to perturb with",
                                  "check the task's train file, or train without --augment")
        self.words = list(counts)
        self.cum: list[int] = []
        total = 0
        for w in self.words:
            total += counts[w]
            self.cum.append(total)

    def sample(self, rng: random.Random) -> str:
        return rng.choices(self.words, cum_weights=self.cum, k=1)[0]


def perturb_text(text: str, rng: random.Random, vocab: Vocabulary, cfg: PerturbConfig) -> str:
    """``text`` with about ``cfg.rate`` of its words edited, at least one, never emptied."""
    words = text.split()
    if not words:
        return text
    n_edit = max(1, round(cfg.rate * len(words)))
    for pos in sorted(rng.sample(range(len(words)), min(n_edit, len(words))), reverse=True):
        u = rng.random()
        if u < cfg.replace or len(words) == 1:
            word = words[pos]
            for _ in range(8):  # a frequent word often draws itself: draw again
                word = vocab.sample(rng)
                if word != words[pos]:
                    break
            words[pos] = word
        elif u < cfg.replace + cfg.delete:
            del words[pos]
        elif pos + 1 < len(words):
            words[pos], words[pos + 1] = words[pos + 1], words[pos]
        else:
            words[pos - 1], words[pos] = words[pos], words[pos - 1]
    return " ".join(words)


def perturbed_copies(examples: Sequence[GlueExample], spec: TaskSpec, copies: int, seed: int,
                     cfg: PerturbConfig | None = None) -> list[GlueExample]:
    """``copies`` unlabeled perturbed copies of every example, in example order.

    For a pair task one side is edited (either, at random) or, one time in three, both: the pair
    relation is what the teacher is asked about, so a copy changes it a little, not entirely."""
    if copies < 0:
        raise BlockpruneError(f"augment={copies!r} copies is negative", "use 0 (off) or a small count like 2")
    if copies == 0:
        return []
    cfg = cfg or PerturbConfig()
    vocab = Vocabulary(examples)
    rng = random.Random(seed * 7919 + 17)
    mark = unlabeled(spec)
    out: list[GlueExample] = []
    for k in range(copies):
        for e in examples:
            a, b = e.text_a, e.text_b
            if spec.is_pair and b:
                side = rng.randrange(3)
                if side != 1:
                    a = perturb_text(a, rng, vocab, cfg)
                if side != 0:
                    b = perturb_text(b, rng, vocab, cfg)
            else:
                a = perturb_text(a, rng, vocab, cfg)
            out.append(replace(e, guid=f"{e.guid}+aug{k}", text_a=a, text_b=b, label=mark))
    return out
