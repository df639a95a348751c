"""GLUE metrics, and which one each task is judged by.

Main metric per task, ``TaskSpec.metric`` in ``glue`` (what "zero or minor accuracy loss" is
measured on, and what picks the best checkpoint): CoLA ``mcc``; STS-B ``pearson_spearman`` (mean of Pearson and Spearman, as the GLUE
score averages them); MRPC and QQP ``f1`` (accuracy reported alongside); everything else
``accuracy``.

Correlations of a constant vector are undefined; we return 0.0 there (as scikit-learn does for
MCC) instead of NaN, so an early, collapsed model ranks below any informative one rather than
breaking a ``max()`` over checkpoints.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from blockprune.errors import BlockpruneError


class TaskMetrics(NamedTuple):
    """All metrics of a task and the name of the main one; ``values[main]`` is its score."""

    values: dict[str, float]
    main: str

    @property
    def score(self) -> float:
        return self.values[self.main]


def _labels_1d(x, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise BlockpruneError(f"{what} must be 1-D, got shape {a.shape}", "pass one value per example")
    return a


def class_predictions(preds) -> np.ndarray:
    """Class ids from logits ``(N, C)`` (argmax) or pass ids ``(N,)`` through."""
    a = np.asarray(preds)
    if a.ndim == 2 and a.shape[1] > 1:
        return a.argmax(axis=1)
    return _labels_1d(a, "predictions").astype(np.int64)


def accuracy(preds, labels) -> float:
    p, y = _labels_1d(preds, "predictions"), _labels_1d(labels, "labels")
    return float((p == y).mean()) if y.size else 0.0


def f1_binary(preds, labels) -> float:
    """F1 of the positive class (label 1); 0.0 when there are no positives at all."""
    from sklearn.metrics import f1_score

    return float(f1_score(_labels_1d(labels, "labels"), _labels_1d(preds, "predictions"),
                          average="binary", zero_division=0))


def matthews(preds, labels) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(_labels_1d(labels, "labels"), _labels_1d(preds, "predictions")))


def _correlation(fn, preds, labels) -> float:
    p = _labels_1d(preds, "predictions").astype(np.float64)
    y = _labels_1d(labels, "labels").astype(np.float64)
    if p.size < 2 or np.ptp(p) == 0 or np.ptp(y) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(p, y)[0])


def pearson(preds, labels) -> float:
    from scipy.stats import pearsonr

    return _correlation(pearsonr, preds, labels)


def spearman(preds, labels) -> float:
    from scipy.stats import spearmanr

    return _correlation(spearmanr, preds, labels)


def compute_metrics(task: str, preds, labels) -> TaskMetrics:
    """Metrics for ``task`` (any spelling ``glue.get_task`` accepts).

    ``preds``: logits ``(N, C)`` or class ids ``(N,)`` for classification; scores ``(N,)`` or
    ``(N, 1)`` for STS-B. ``labels``: class ids, or gold scores for STS-B.
    """
    from blockprune.frontends.glue import get_task

    spec = get_task(task)
    y = _labels_1d(labels, "labels")
    if spec.is_regression:
        p = _labels_1d(preds, "predictions").astype(np.float64)
        _same_length(p, y)
        pr, sr = pearson(p, y), spearman(p, y)
        values = {"pearson": pr, "spearman": sr, "pearson_spearman": (pr + sr) / 2}
    else:
        p = class_predictions(preds)
        _same_length(p, y)
        y = y.astype(np.int64)
        values = {"accuracy": accuracy(p, y)}
        if spec.name in ("MRPC", "QQP"):
            values["f1"] = f1_binary(p, y)
            values["accuracy_f1"] = (values["accuracy"] + values["f1"]) / 2
        if spec.name == "CoLA":
            values["mcc"] = matthews(p, y)
    return TaskMetrics(values=values, main=spec.metric)


def _same_length(p: np.ndarray, y: np.ndarray) -> None:
    if p.shape[0] != y.shape[0]:
        raise BlockpruneError(
            f"{p.shape[0]} predictions for {y.shape[0]} labels",
            "evaluate on the whole split and concatenate batches in order",
        )
