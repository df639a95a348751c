"""Architecture registry: which Linear layers of each transformer family are prunable.

Each entry names, by HF parameter name (regex over the *bare* encoder's names, so prefixes such
as ``bert.`` / ``roberta.`` / ``distilbert.`` from task heads are allowed), the six roles of an
encoder layer plus the optional pooler and classifier, and the permutation-invariant groups that
later passes (reorder, compact) rely on:

* ``ffn``: the intermediate dimension: rows of ``ffn_in`` (and its bias) and columns of
  ``ffn_out`` may be permuted together at no run-time cost;
* ``heads``: the rows of ``q``, ``k``, ``v`` of one head move together, and the columns of
  ``attn_out`` follow ``v``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from blockprune.errors import BlockpruneError

ROLES = ("q", "k", "v", "attn_out", "ffn_in", "ffn_out")
HEAD_ROLES = ("pooler", "pre_classifier", "classifier", "classifier_dense")


@dataclass(frozen=True)
class Architecture:
    """The prunable layers of one transformer family, by HF parameter name."""

    name: str
    model_type: str  # HF config.model_type
    layer_prefix: str  # regex for the per-layer prefix; group 1 is the layer index
    roles: dict[str, str]  # role -> suffix under the layer prefix (without .weight)
    heads: dict[str, str] = field(default_factory=dict)  # optional head layers -> full regex
    num_heads_attr: str = "num_attention_heads"
    hidden_attr: str = "hidden_size"

    def role_of(self, hf_name: str) -> tuple[str, int | None] | None:
        """(role, layer index) of a weight name, or None when it is not a prunable Linear."""
        for role, suffix in self.roles.items():
            m = re.search(rf"(?:^|\.){self.layer_prefix}\.{re.escape(suffix)}\.weight$", hf_name)
            if m:
                return role, int(m.group(1))
        for role, pattern in self.heads.items():
            if re.search(rf"(?:^|\.){pattern}\.weight$", hf_name):
                return role, None
        return None

    def prunable(self, names: list[str], include_heads: bool = True) -> list[str]:
        out = []
        for n in names:
            r = self.role_of(n)
            if r and (include_heads or r[0] in ROLES):
                out.append(n)
        return out

    def expected_count(self, num_layers: int, head_roles: set[str]) -> int:
        return len(self.roles) * num_layers + len(head_roles)


_BERT_ROLES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "attn_out": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
}

ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture(
        name="bert",
        model_type="bert",
        layer_prefix=r"encoder\.layer\.(\d+)",
        roles=_BERT_ROLES,
        heads={"pooler": r"pooler\.dense", "classifier": r"classifier"},
    ),
    "roberta": Architecture(
        name="roberta",
        model_type="roberta",
        layer_prefix=r"encoder\.layer\.(\d+)",
        roles=_BERT_ROLES,
        heads={
            "pooler": r"pooler\.dense",
            "classifier_dense": r"classifier\.dense",
            "classifier": r"classifier\.out_proj",
        },
    ),
    "distilbert": Architecture(
        name="distilbert",
        model_type="distilbert",
        layer_prefix=r"transformer\.layer\.(\d+)",
        roles={
            "q": "attention.q_lin",
            "k": "attention.k_lin",
            "v": "attention.v_lin",
            "attn_out": "attention.out_lin",
            "ffn_in": "ffn.lin1",
            "ffn_out": "ffn.lin2",
        },
        heads={"pre_classifier": r"pre_classifier", "classifier": r"classifier"},
        num_heads_attr="n_heads",
        hidden_attr="dim",
    ),
}
# MiniLM is BERT-shaped; it is its own entry because it is the bundled default model.
ARCHITECTURES["minilm"] = Architecture(
    name="minilm",
    model_type="bert",
    layer_prefix=ARCHITECTURES["bert"].layer_prefix,
    roles=_BERT_ROLES,
    heads=ARCHITECTURES["bert"].heads,
)


def get_architecture(name: str) -> Architecture:
    key = name.lower()
    if key not in ARCHITECTURES:
        raise BlockpruneError(
            f"unknown architecture {name!r}",
            f"use one of: {', '.join(sorted(ARCHITECTURES))}",
        )
    return ARCHITECTURES[key]


def architecture_for_model_type(model_type: str) -> Architecture:
    """Map an HF ``config.model_type`` to our registry entry."""
    for arch in ARCHITECTURES.values():
        if arch.model_type == model_type and arch.name != "minilm":
            return arch
    raise BlockpruneError(
        f"model type {model_type!r} is not supported",
        f"supported HF model types: {', '.join(sorted({a.model_type for a in ARCHITECTURES.values()}))}",
    )


def role_of_hf_name(arch_name: str, hf_name: str) -> tuple[str, int | None] | None:
    """(role, layer index) of an HF weight name under a registered architecture, else None."""
    arch = ARCHITECTURES.get(str(arch_name).lower())
    return arch.role_of(hf_name) if arch else None
