"""Per-layer pruning choices: a default plus regex rules, from CLI flags or a YAML file.

YAML form (first matching rule wins; ``match`` is a regex searched in the HF parameter name,
or in the initializer name when the model has no HF mapping)::

    block: 1x32          # default block, W[out, in] layout
    sparsity: 0.5        # default fraction of weights removed
    global: false        # true: rank blocks across all layers at once
    include_heads: false # also prune pooler / classifier (encoder Linears only by default)
    layers:
      - match: 'attention\\.self\\.(query|key)'
        block: 4x4
        sparsity: 0.7
      - match: 'pooler|classifier'
        sparsity: 0.0    # keep dense

A rule may also fix the ``form`` the layer is run in (``dense`` or ``bsr``; the Policy obeys it
instead of the break-even table): ``blockprune plan`` writes such rules, one per layer, plus a
``plan:`` section (its predictions) that pruning ignores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockprune.blocks import BlockShape, check_sparsity
from blockprune.errors import BlockpruneError


PLANNED_FORMS = ("dense", "bsr")


@dataclass(frozen=True)
class LayerSpec:
    block: BlockShape
    sparsity: float
    form: str | None = None  # planned form (``blockprune plan``); None: the Policy decides


@dataclass
class Rule:
    pattern: re.Pattern
    block: BlockShape | None = None
    sparsity: float | None = None
    form: str | None = None


@dataclass
class PruneConfig:
    block: BlockShape = field(default_factory=lambda: BlockShape(1, 32))
    sparsity: float = 0.5
    global_ranking: bool = False
    include_heads: bool = False
    rules: list[Rule] = field(default_factory=list)
    plan: dict[str, Any] | None = None  # a plan file's predictions (not used for pruning)

    def __post_init__(self) -> None:
        self.block = BlockShape.parse(self.block)
        self.sparsity = check_sparsity(self.sparsity)

    def selects(self, role: str | None) -> bool:
        """Encoder Linears always; pooler/classifier only when asked; unknown-role weights always."""
        return selects_role(role, self.include_heads)

    def resolve(self, name: str) -> LayerSpec:
        for rule in self.rules:
            if rule.pattern.search(name):
                return LayerSpec(rule.block or self.block,
                                 self.sparsity if rule.sparsity is None else rule.sparsity, rule.form)
        return LayerSpec(self.block, self.sparsity)

    @classmethod
    def from_dict(cls, data: dict[str, Any], defaults: "PruneConfig | None" = None) -> "PruneConfig":
        base = defaults or cls()
        known = {"block", "sparsity", "global", "include_heads", "layers", "plan"}
        unknown = set(data) - known
        if unknown:
            raise BlockpruneError(f"unknown keys in the pruning config: {sorted(unknown)}",
                                  f"allowed keys: {sorted(known)}")
        rules = []
        for i, item in enumerate(data.get("layers") or []):
            if not isinstance(item, dict) or "match" not in item:
                raise BlockpruneError(f"layers[{i}] in the pruning config has no 'match'",
                                      "each rule needs match: <regex> and block and/or sparsity")
            try:
                pat = re.compile(str(item["match"]))
            except re.error as exc:
                raise BlockpruneError(f"layers[{i}].match {item['match']!r} is not a valid regex: {exc}",
                                      "fix the regular expression") from exc
            form = item.get("form")
            if form is not None and form not in PLANNED_FORMS:
                raise BlockpruneError(f"layers[{i}].form {form!r} is unknown", f"use one of: {', '.join(PLANNED_FORMS)}")
            rules.append(Rule(pat,
                              BlockShape.parse(item["block"]) if "block" in item else None,
                              check_sparsity(item["sparsity"], f"layers[{i}].sparsity") if "sparsity" in item else None,
                              form))
        return cls(block=BlockShape.parse(data.get("block", base.block)),
                   sparsity=check_sparsity(data.get("sparsity", base.sparsity)),
                   global_ranking=bool(data.get("global", base.global_ranking)),
                   include_heads=bool(data.get("include_heads", base.include_heads)), rules=rules,
                   plan=data.get("plan"))

    @classmethod
    def from_yaml(cls, path: str | Path, defaults: "PruneConfig | None" = None) -> "PruneConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise BlockpruneError(f"pruning config {str(path)!r} does not exist", "check the path")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise BlockpruneError(f"pruning config {str(path)!r} is not valid YAML: {exc}",
                                  "fix the YAML syntax") from exc
        if not isinstance(data, dict):
            raise BlockpruneError(f"pruning config {str(path)!r} must be a mapping", "see `blockprune prune --help`")
        return cls.from_dict(data, defaults)


def selects_role(role: str | None, include_heads: bool) -> bool:
    """The head rule shared by pruning and quantization: encoder Linears (and weights of unknown
    role) always, pooler/classifier heads only with ``include_heads``."""
    from blockprune.models.registry import ROLES

    return role is None or role in ROLES or include_heads


def unmatched_rules(cfg: PruneConfig, names: list[str]) -> list[str]:
    """Patterns of the plan's pruning rules (ratio > 0) that match none of ``names``."""
    return [r.pattern.pattern for r in cfg.rules
            if (r.sparsity or 0) > 0 and not any(r.pattern.search(n) for n in names)]


def check_plan_matches(cfg: PruneConfig, names: list[str], what: str) -> None:
    """One clear error when a plan's layers are not this model's (else it would silently prune
    nothing: every layer falls through to the plan's default ratio 0)."""
    missing = unmatched_rules(cfg, names)
    if missing:
        raise BlockpruneError(
            f"{len(missing)} of the plan's pruned layers match no layer of {what} (first: {missing[0]!r}; "
            f"its layers are named like {names[0]!r})" if names else f"{what} has no prunable layers",
            "plan this model (`blockprune plan MODEL ...`), or make the plan's match patterns fit its names")

