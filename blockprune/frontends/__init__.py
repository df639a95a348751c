"""PyTorch frontend: GLUE data, metrics, and the three training-side stages of the method.

The stages follow ``design/method.md``: a reweighted group Lasso penalty during training
(``regularizer``), hard pruning into block masks (``hard_prune``), and masked retraining that
keeps pruned weights exactly zero (``masked``). ``grouping`` holds the torch twin of the numpy
block geometry in ``blockprune.blocks`` so both sides of the toolchain cut matrices identically.

Submodules are imported lazily by callers (``from blockprune.frontends.glue import ...``);
this package only re-exports the names a training loop needs, so importing it stays cheap and
does not pull in ``transformers``.
"""

from blockprune.frontends.grouping import expand_keep, group_norms, group_scores
from blockprune.frontends.hard_prune import HardPruneConfig, LayerMask, LayerSelection, hard_prune, select_layers
from blockprune.frontends.masked import MaskedTraining, attach_masks, verify_masked
from blockprune.frontends.regularizer import GroupLassoConfig, RefreshSchedule, ReweightedGroupLasso

__all__ = [
    "GroupLassoConfig",
    "HardPruneConfig",
    "LayerMask",
    "LayerSelection",
    "MaskedTraining",
    "RefreshSchedule",
    "ReweightedGroupLasso",
    "attach_masks",
    "expand_keep",
    "group_norms",
    "group_scores",
    "hard_prune",
    "select_layers",
    "verify_masked",
]
