"""Knowledge distillation for masked retraining: the model before hard pruning teaches the pruned one.

Why: hard pruning removes half or more of a small model's weights at once, and the masked
retraining that follows sees only the task labels; on small GLUE tasks (RTE: 2.5k examples, 78
steps an epoch) that is too little signal to recover, and the pruned model can collapse to the
majority class. The unpruned model's output distribution carries far more information per example
than a hard label. The teacher here is a frozen copy of the model as it is right before hard
pruning (after the reweighted stage for RGL, the dense fine-tune for the magnitude baseline), so
no second model has to be trained, stored or named.

Loss (classification): ``(1 - a) * CE(student, labels) + a * T^2 * KL(softmax(t/T) || softmax(s/T))``;
regression (STS-B): ``(1 - a) * MSE(student, labels) + a * MSE(student, teacher)``. ``a = 0`` is
the plain task loss; the T^2 factor keeps the soft-target gradients on the scale of the hard ones
(Hinton et al., 2015). ``hidden > 0`` adds ``hidden * MSE`` between the student's and the
teacher's hidden states (every layer's output, padding tokens excluded): with gradual pruning
the teacher is the dense model and the student has the same width, so the intermediate
representations can be matched directly, which recovers more than logits alone on small tasks.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blockprune.errors import BlockpruneError


@dataclass(frozen=True)
class DistillConfig:
    weight: float = 0.0  # a: share of the distillation term; 0 turns distillation off
    temperature: float = 2.0
    hidden: float = 0.0  # weight of the hidden-state MSE term (0: off)

    def __post_init__(self) -> None:
        if not (isinstance(self.hidden, (int, float)) and self.hidden >= 0 and math.isfinite(self.hidden)):
            raise BlockpruneError(f"hidden-state distillation weight {self.hidden!r} is not a number >= 0",
                                  "use e.g. --distill-hidden 1.0 (0 turns it off)")
        if not (isinstance(self.weight, (int, float)) and 0.0 <= self.weight <= 1.0):
            raise BlockpruneError(f"distillation weight {self.weight!r} is outside [0, 1]",
                                  "give the share of the teacher term, e.g. --distill 0.5 (0 turns it off)")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0 and math.isfinite(self.temperature)):
            raise BlockpruneError(f"distillation temperature {self.temperature!r} is not a positive number",
                                  "use e.g. --distill-temperature 2")

    @property
    def enabled(self) -> bool:
        return self.weight > 0.0 or self.hidden > 0.0


def frozen_teacher(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode with no gradients: later edits to ``model`` (pruning) leave it alone."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, task_loss: torch.Tensor,
                      cfg: DistillConfig) -> torch.Tensor:
    """Blend the task loss with the teacher term; one output column means regression."""
    if not cfg.weight > 0.0:
        return task_loss
    t = teacher_logits.detach().to(student_logits.dtype)
    if student_logits.shape[-1] == 1:
        soft = F.mse_loss(student_logits, t)
    else:
        temp = float(cfg.temperature)
        soft = F.kl_div(F.log_softmax(student_logits / temp, dim=-1), F.log_softmax(t / temp, dim=-1),
                        reduction="batchmean", log_target=True) * temp * temp
    return (1.0 - cfg.weight) * task_loss + cfg.weight * soft


def row_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                          cfg: DistillConfig) -> torch.Tensor:
    """The blended loss of ``distillation_loss`` per example, for batches that mix labelled rows
    with teacher-only ones (``augment.py``; label ``-100``, or NaN for regression).

    A labelled row costs ``(1 - w) * task + w * soft`` as before, a teacher-only row ``soft``
    alone; the batch loss is the mean over rows, so an all-labelled batch gives exactly
    ``distillation_loss``'s value (cross-entropy and the per-row KL summed over classes both
    average over the batch)."""
    if not cfg.weight > 0.0:
        raise BlockpruneError("teacher-only examples need the logit distillation term, but its weight is 0",
                              "set --distill 0.5 with --augment, or drop --augment")
    t = teacher_logits.detach().to(student_logits.dtype)
    if student_logits.shape[-1] == 1:
        s = student_logits.reshape(-1)
        labelled = ~torch.isnan(labels)
        task = (s - torch.where(labelled, labels.to(s.dtype), s.detach())) ** 2
        soft = (s - t.reshape(-1)) ** 2
    else:
        temp = float(cfg.temperature)
        labelled = labels != -100
        task = F.cross_entropy(student_logits, labels.clamp_min(0), reduction="none")
        soft = F.kl_div(F.log_softmax(student_logits / temp, dim=-1), F.log_softmax(t / temp, dim=-1),
                        reduction="none", log_target=True).sum(-1) * temp * temp
    w = cfg.weight
    rows = torch.where(labelled, (1.0 - w) * task + w * soft, soft)
    return rows.mean()


def hidden_mse(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over layers of the MSE between hidden states on the non-padding tokens.

    Both tuples are ``output_hidden_states`` (embeddings output first); the embedding output is
    skipped when the word embeddings are shared and unpruned it is nearly identical anyway."""
    if len(student) != len(teacher):
        raise BlockpruneError(f"student has {len(student)} hidden states, teacher {len(teacher)}",
                              "hidden-state distillation needs a teacher of the same depth (the dense model)")
    terms = []
    for s, t in zip(student[1:], teacher[1:]):
        d = (s - t.detach().to(s.dtype)) ** 2
        if attention_mask is not None:
            m = attention_mask.to(d.dtype).unsqueeze(-1)
            terms.append((d * m).sum() / (m.sum() * d.shape[-1]).clamp_min(1.0))
        else:
            terms.append(d.mean())
    return torch.stack(terms).mean()
