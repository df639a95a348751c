"""PyTorch frontend: GLUE data, metrics, and the three training-side stages of the method.

The stages follow ``design/method.md``: a reweighted group Lasso penalty during training
(``regularizer``), hard pruning into block masks (``hard_prune``), and masked retraining that
keeps pruned weights exactly zero (``masked``). ``grouping`` holds the torch twin of the numpy
block geometry in ``blockprune.blocks`` so both sides of the toolchain cut matrices identically.

Improvements over the paper's recipe (issue #12): activation-aware block scores
(``importance``; the numpy twin is ``blockprune.importance``), a proximal form of the group
Lasso (``regularizer``), gradual pruning on a cubic schedule (``gradual``), per-layer ratios from
measured sensitivity (``allocation``), and a label-free sentence-embedding mode (``embedding``).
The GLUE run itself is ``recipe`` (wiring) over ``recipe_config``, ``data``, ``stages``,
``run_state`` and ``outputs``.

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
