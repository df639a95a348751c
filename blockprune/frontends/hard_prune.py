"""Hard pruning: turn (regularised) weights into block masks, keyed by parameter name.

Three rules, all scoring blocks exactly like ``blockprune.blocks.block_scores`` (L2 norm, edge
blocks scaled to a full block's equivalent) and choosing with ``blockprune.blocks.choose_pruned``
(weakest first, stable ties, element count closest to ``round(sparsity * numel)``), so a mask made
here and one made by the ONNX passes from the same weights are identical:

* ``layer``: the paper's rule, the same ratio r in every layer: zero the groups below the r-th
  percentile of that layer's group scores. Exact per layer (``round(r * n_blocks)`` blocks when
  the block divides the matrix), unlike ``np.percentile`` whose interpolation and ties drift.
* ``global``: one ratio over all selected layers together; layers that learnt more zeros give
  more. Per-layer ratios then differ.
* ``threshold``: zero every block whose score is below an absolute value (the authors' other
  mode), useful after group Lasso has driven groups to ~0.

The scores are computed in float64 numpy on a CPU copy: hard pruning runs once, and sharing the
numpy code path is what guarantees agreement with the passes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
from torch import nn

from blockprune.blocks import BlockShape, block_scores, block_sizes, check_sparsity, choose_pruned
from blockprune.errors import BlockpruneError
from blockprune.frontends.grouping import expand_keep
from blockprune.importance import activation_block_scores
from blockprune.frontends.regularizer import resolve_parameters

#: Every matrix called ``*.weight``: encoder Linear layers, pooler, pre_classifier, classifier.
DEFAULT_INCLUDE: tuple[str, ...] = (r"\.weight$",)
#: Embedding tables are not Linear layers and the paper does not count them.
DEFAULT_EXCLUDE: tuple[str, ...] = (r"embed",)
MODES = ("layer", "global", "threshold")


@dataclass
class LayerSelection:
    """Which 2-D parameters to prune, and with which block.

    A parameter is selected when it is 2-D, some ``include`` regex ``re.search``-matches its name
    and no ``exclude`` regex does. Its block is that of the first ``block_overrides`` regex that
    matches (first match wins), else ``block``. When a block is larger than a selected matrix
    (e.g. 16x1 on a 2-row classifier) this is an error unless ``skip_unfit``.
    """

    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    block: BlockShape | str = "1x32"
    block_overrides: list[tuple[str, BlockShape | str]] = field(default_factory=list)
    skip_unfit: bool = False

    def __post_init__(self) -> None:
        for pattern in [*self.include, *self.exclude, *(p for p, _ in self.block_overrides)]:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise BlockpruneError(
                    f"layer selection regex {pattern!r} does not compile ({exc})",
                    "fix the regular expression (dots in parameter names must be escaped as \\.)",
                ) from exc
        self.block = BlockShape.parse(self.block)
        self.block_overrides = [(p, BlockShape.parse(b)) for p, b in self.block_overrides]

    def matches(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.include) and not any(
            re.search(p, name) for p in self.exclude
        )

    def block_for(self, name: str) -> BlockShape:
        for pattern, block in self.block_overrides:
            if re.search(pattern, name):
                return block  # type: ignore[return-value]
        return self.block  # type: ignore[return-value]


def select_layers(
    model: nn.Module | Mapping[str, torch.Tensor], selection: LayerSelection | None = None
) -> dict[str, BlockShape]:
    """Parameter name -> block shape for every selected matrix, in the model's order."""
    selection = selection or LayerSelection()
    params = model.named_parameters() if isinstance(model, nn.Module) else dict(model).items()
    out: dict[str, BlockShape] = {}
    for name, p in params:
        if p.dim() != 2 or not selection.matches(name):
            continue
        block = selection.block_for(name)
        try:
            block.check_fits(tuple(p.shape), name)
        except BlockpruneError:
            if selection.skip_unfit:
                continue
            raise
        out[name] = block
    if not out:
        raise BlockpruneError(
            f"no 2-D weight matches include={selection.include} / exclude={selection.exclude}",
            "check the patterns against model.named_parameters() (names look like "
            "bert.encoder.layer.0.attention.self.query.weight)",
        )
    return out


@dataclass
class HardPruneConfig:
    """``mode`` is ``layer`` (same ratio per layer, the paper's rule), ``global`` (one ratio
    across layers) or ``threshold``. ``sparsity`` is the fraction of elements to zero;
    ``threshold`` the block score below which a block is zeroed (``threshold`` mode only)."""

    mode: str = "layer"
    sparsity: float = 0.5
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise BlockpruneError(
                f"hard pruning mode {self.mode!r} is unknown", f"use one of: {', '.join(MODES)}"
            )
        if self.mode == "threshold":
            try:
                ok = self.threshold is not None and float(self.threshold) >= 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise BlockpruneError(
                    f"threshold mode needs a threshold >= 0, got {self.threshold!r}",
                    "set threshold to the block L2 norm below which blocks are zeroed, e.g. 1e-3",
                )
        else:
            self.sparsity = check_sparsity(self.sparsity)


@dataclass
class LayerMask:
    """Result for one layer: per-block keep matrix and element mask (both bool, CPU)."""

    block: BlockShape
    keep: torch.Tensor
    mask: torch.Tensor

    @property
    def sparsity(self) -> float:
        """Fraction of elements zeroed."""
        return 1.0 - float(self.mask.sum()) / max(self.mask.numel(), 1)

    @property
    def blocks_pruned(self) -> int:
        return int((~self.keep).sum())


def _scores_np(w: torch.Tensor, block: BlockShape, feature_norms: torch.Tensor | None = None) -> np.ndarray:
    """Block scores in float64 numpy; with ``feature_norms`` the activation-aware ``||W_g ⊙ s||``
    (``blockprune.importance``, the same function the passes can call)."""
    arr = w.detach().to("cpu", torch.float64).numpy()
    if feature_norms is None:
        return block_scores(arr, block)
    return activation_block_scores(arr, feature_norms.detach().to("cpu", torch.float64).numpy(), block)


def _result(pruned: np.ndarray, block: BlockShape, shape: tuple[int, int]) -> LayerMask:
    keep = torch.from_numpy(~pruned)
    return LayerMask(block=block, keep=keep, mask=expand_keep(keep, block, shape))


def prune_per_layer(
    weights: Mapping[str, torch.Tensor], blocks: Mapping[str, BlockShape], sparsity: float | Mapping[str, float],
    feature_norms: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, LayerMask]:
    """The paper's rule: the same ratio in every layer, weakest blocks of that layer first.
    ``sparsity`` may also map each layer to its own ratio (a sensitivity-based allocation)."""
    ratios = {n: check_sparsity(sparsity[n] if isinstance(sparsity, Mapping) else sparsity) for n in weights}
    fn = feature_norms or {}
    out = {}
    for name, w in weights.items():
        block = BlockShape.parse(blocks[name])
        shape = tuple(w.shape)
        pruned = choose_pruned(_scores_np(w, block, fn.get(name)), block_sizes(shape, block), ratios[name])
        out[name] = _result(pruned, block, shape)
    return out


def prune_global(
    weights: Mapping[str, torch.Tensor], blocks: Mapping[str, BlockShape], sparsity: float,
    feature_norms: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, LayerMask]:
    """One ratio over all layers: rank every block of every layer by score together."""
    sparsity = check_sparsity(sparsity)
    names = list(weights)
    parsed = {n: BlockShape.parse(blocks[n]) for n in names}
    fn = feature_norms or {}
    scores = [_scores_np(weights[n], parsed[n], fn.get(n)).reshape(-1) for n in names]
    sizes = [block_sizes(tuple(weights[n].shape), parsed[n]).reshape(-1) for n in names]
    pruned_all = choose_pruned(np.concatenate(scores), np.concatenate(sizes), sparsity)
    out, start = {}, 0
    for n, s in zip(names, scores):
        shape = tuple(weights[n].shape)
        grid = parsed[n].grid(shape)
        out[n] = _result(pruned_all[start : start + s.size].reshape(grid), parsed[n], shape)
        start += s.size
    return out


def prune_threshold(
    weights: Mapping[str, torch.Tensor], blocks: Mapping[str, BlockShape], threshold: float,
    feature_norms: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, LayerMask]:
    """Zero every block whose score is strictly below ``threshold``."""
    fn = feature_norms or {}
    out = {}
    for name, w in weights.items():
        block = BlockShape.parse(blocks[name])
        pruned = _scores_np(w, block, fn.get(name)) < float(threshold)
        out[name] = _result(pruned, block, tuple(w.shape))
    return out


def hard_prune(
    model: nn.Module | Mapping[str, torch.Tensor],
    layers: Mapping[str, BlockShape | str],
    config: HardPruneConfig | None = None,
    feature_norms: Mapping[str, torch.Tensor] | None = None,
    layer_ratios: Mapping[str, float] | None = None,
) -> dict[str, LayerMask]:
    """Masks for ``layers`` (parameter name -> block) under ``config``; weights are not touched
    (attach the masks with ``masked.attach_masks`` to zero them and keep them zero).

    ``feature_norms`` (name -> per-input-feature activation norms) switches the score to the
    activation-aware ``||W_g ⊙ s||``; ``layer_ratios`` (``layer`` mode) gives each layer its own
    ratio instead of ``config.sparsity``."""
    config = config or HardPruneConfig()
    weights = resolve_parameters(model, list(layers))
    blocks = {n: BlockShape.parse(b) for n, b in layers.items()}
    for n, w in weights.items():
        if w.dim() != 2:
            raise BlockpruneError(
                f"parameter {n!r} has shape {tuple(w.shape)}, not a 2-D Linear weight",
                "exclude biases, LayerNorm and other non-matrix parameters from the selection",
            )
        blocks[n].check_fits(tuple(w.shape), n)
    if config.mode == "layer":
        ratios = config.sparsity if layer_ratios is None else {n: layer_ratios.get(n, config.sparsity) for n in weights}
        return prune_per_layer(weights, blocks, ratios, feature_norms)
    if layer_ratios is not None:
        raise BlockpruneError(f"per-layer ratios need the layer pruning mode, not {config.mode!r}",
                              "use --prune-mode layer with --allocation sensitivity")
    if config.mode == "global":
        return prune_global(weights, blocks, config.sparsity, feature_norms)
    return prune_threshold(weights, blocks, float(config.threshold), feature_norms)  # type: ignore[arg-type]


def overall_sparsity(result: Mapping[str, LayerMask]) -> float:
    """Fraction of zeroed elements over all pruned layers; CR = 1 / (1 - this)."""
    total = sum(m.mask.numel() for m in result.values())
    kept = sum(int(m.mask.sum()) for m in result.values())
    return 1.0 - kept / max(total, 1)


def masks_numpy(result: Mapping[str, LayerMask]) -> dict[str, np.ndarray]:
    """uint8 element masks in the ``W[out, in]`` layout, keyed by PyTorch parameter name.

    The exporter still has to rename them to ONNX initializer names (and transpose for MatMul
    weights stored ``[in, out]``) before writing a ``masks.safetensors`` file.
    """
    return {n: m.mask.numpy().astype(np.uint8) for n, m in result.items()}
