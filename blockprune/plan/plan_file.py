"""``plan.yaml``: the pruning config ``prune``/``compress``/``train`` already read, one rule per layer.

Why the same format: a plan is nothing but per-layer block shapes and ratios (plus the form the
backend should run each layer in), so every command that takes ``--config`` can take a plan, and
a user can edit it by hand. The predictions live under ``plan:``, which pruning ignores:

    block: 16x1
    sparsity: 0.0
    layers:
      - match: '(^|\\.)encoder\\.layer\\.0\\.attention\\.self\\.query\\.weight$'
        block: 16x1
        sparsity: 0.7
        form: bsr
    plan:
      target: x86-64
      predicted_ms: 18.2
      layers: {encoder.layer.0.attention.self.query.weight: {ms: 0.21, cost: 0.4, ...}}
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from blockprune.errors import BlockpruneError
from blockprune.io import atomic_path
from blockprune.passes.prune_config import PruneConfig

PLAN_FORMAT = "blockprune.plan/1"


# Where a transformer's own parameter names start, under whatever a task model puts in front
# ("bert.", "roberta.", "distilbert.", or nothing in a bare encoder's export).
_STACKS = ("encoder.", "transformer.")


def portable_name(name: str) -> str:
    """``name`` from its layer stack on (``bert.encoder.layer.0...`` -> ``encoder.layer.0...``).

    Why: a plan made on a fine-tuned classifier's graph (names under ``bert.``) must apply to the
    bare encoder's export and the other way round; the stack-relative part is what both share."""
    for stack in _STACKS:
        i = ("." + name).find("." + stack)
        if i >= 0:
            return name[i:]
    return name


def layer_pattern(name: str) -> str:
    """A regex matching exactly this layer, with or without a task model's prefix."""
    return r"(^|\.)" + re.escape(portable_name(name)) + "$"


def write_plan(path: str | Path, layers: list[dict[str, Any]], info: dict[str, Any]) -> Path:
    """``layers``: dicts with name, block, ratio, form (+ predictions); ``info``: the ``plan:`` header."""
    import yaml

    path = Path(path)
    pruned = [x for x in layers if x["ratio"] > 0]
    default_block = Counter(x["block"] for x in pruned).most_common(1)[0][0] if pruned else "16x1"
    doc = {
        "block": default_block,
        "sparsity": 0.0,
        "global": False,
        "include_heads": False,
        "layers": [{"match": layer_pattern(x["name"]), "block": x["block"], "sparsity": round(float(x["ratio"]), 4),
                    "form": x["form"]} for x in layers],
        "plan": {"format": PLAN_FORMAT, **info,
                 "layers": {x["name"]: {k: v for k, v in x.items() if k not in ("name",)} for x in layers}},
    }
    with atomic_path(path, suffix=".yaml") as tmp:
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False, width=120))
    return path


def read_plan(path: str | Path) -> PruneConfig:
    """The plan as a ``PruneConfig`` (its ``plan`` attribute holds the predictions)."""
    cfg = PruneConfig.from_yaml(path)
    if not cfg.plan or cfg.plan.get("format") != PLAN_FORMAT:
        raise BlockpruneError(f"{path} is a pruning config, not a plan (no 'plan:' section of format {PLAN_FORMAT})",
                              "write one with `blockprune plan`, or pass a hand-written config with --config")
    return cfg


def planned_blocks(cfg: PruneConfig) -> set[str]:
    """Block shapes of the layers the plan prunes."""
    return {str(r.block) for r in cfg.rules if r.block is not None and (r.sparsity or 0) > 0}
