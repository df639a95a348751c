"""ONNX graph passes (onnx + onnx-graphsurgeon; never torch). One pass per module."""

from blockprune.passes.apply_masks import ApplyMasks
from blockprune.passes.base import Pass, PassContext, PassReport
from blockprune.passes.block_prune import BlockPrune
from blockprune.passes.find_weights import LinearWeight, find_weights
from blockprune.passes.manager import PassManager
from blockprune.passes.prune_config import PruneConfig

__all__ = ["ApplyMasks", "BlockPrune", "LinearWeight", "Pass", "PassContext", "PassManager",
           "PassReport", "PruneConfig", "find_weights"]
