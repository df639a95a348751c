"""BlockPrune: one-shot block pruning by block L2 norm, no training.

Per layer (``PruneConfig.resolve``) a block shape and a sparsity; blocks are ranked by their L2
norm (edge blocks scaled, see ``blockprune.blocks``) within each layer, or across all layers when
``global_ranking`` is set. The masks it applies are returned in the report so they can be saved
and reused (they are keyed by initializer name, in the initializer's layout).
"""

from __future__ import annotations

import numpy as np

from blockprune.blocks import block_scores, block_sizes, choose_pruned, expand_block_mask
from blockprune.masks import LayerMaskInfo, MaskSet
from blockprune.passes.base import Pass, PassContext, PassReport
from blockprune.passes.find_weights import LinearWeight, find_weights_in_graph, require_weights
from blockprune.passes.prune_config import LayerSpec, PruneConfig, check_plan_matches
from blockprune.passes.layers_meta import record_layers


class BlockPrune(Pass):
    name = "block-prune"

    def __init__(self, config: PruneConfig) -> None:
        self.config = config
        self.masks: MaskSet | None = None

    def transform(self, ctx: PassContext) -> PassReport:
        weights = require_weights(find_weights_in_graph(ctx.graph, {
            "param_map": ctx.meta("param_map", {}), "architecture": ctx.meta("architecture")}))
        consts = ctx.constants()
        if self.config.plan is not None:  # a plan names its layers: all of them must be here
            check_plan_matches(self.config, [w.display_name for w in weights if self.config.selects(w.role)],
                               "this model")
        plan: list[tuple[LinearWeight, LayerSpec, np.ndarray]] = []
        for w in weights:
            if not self.config.selects(w.role):
                continue
            spec = self.config.resolve(w.display_name)
            if spec.sparsity > 0:
                spec.block.check_fits(w.shape, w.display_name)
            plan.append((w, spec, w.to_out_in(np.asarray(consts[w.initializer].values))))

        pruned_blocks: dict[str, np.ndarray] = {}
        if self.config.global_ranking:
            active = [(w, s, v) for w, s, v in plan if s.sparsity > 0]
            if active:
                scores = [block_scores(v, s.block).ravel() for _, s, v in active]
                sizes = [block_sizes(v.shape, s.block).ravel() for _, s, v in active]
                flat = choose_pruned(np.concatenate(scores), np.concatenate(sizes), self.config.sparsity)
                offset = 0
                for (w, s, v), sc in zip(active, scores):
                    pruned_blocks[w.initializer] = flat[offset:offset + sc.size].reshape(s.block.grid(v.shape))
                    offset += sc.size
        else:
            for w, s, v in plan:
                if s.sparsity > 0:
                    pruned_blocks[w.initializer] = choose_pruned(block_scores(v, s.block),
                                                                 block_sizes(v.shape, s.block), s.sparsity)

        masks, infos, layers = {}, {}, {}
        changed = 0
        for w, s, v in plan:
            if w.initializer not in pruned_blocks or w.initializer in masks:
                continue
            mask_oi = expand_block_mask(~pruned_blocks[w.initializer], s.block, w.shape)
            stored = np.asarray(consts[w.initializer].values)
            mask = np.ascontiguousarray(w.from_out_in(mask_oi))
            ctx.replace_values(w.initializer, (stored * mask).astype(stored.dtype))
            masks[w.initializer] = mask
            achieved = 1.0 - float(mask.mean())
            infos[w.initializer] = LayerMaskInfo(str(s.block), achieved, w.hf_name, w.layout)
            layers[w.initializer] = {"block": str(s.block), "sparsity": achieved, "source": "one-shot-l2"}
            if s.form is not None:  # a plan fixed the form: the Policy obeys it
                layers[w.initializer]["planned_form"] = s.form
            changed += 1
        record_layers(ctx, layers)
        self.masks = MaskSet(masks, source="one-shot-l2", layers=infos,
                             extra={"global": self.config.global_ranking})
        return PassReport(self.name, matched=len(weights), changed=changed,
                          details={"global": self.config.global_ranking})
