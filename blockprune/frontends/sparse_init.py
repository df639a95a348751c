"""Start a task model from an already pruned encoder: "prune once, fine-tune on every task".

Why: GLUE's small tasks (MRPC 3.7k, RTE 2.5k, STS-B 5.7k examples) give gradual pruning too
few steps to find good masks and recover from them; pruning the encoder once, task-agnostically,
on plenty of unlabeled text (``train --mode embedding``) and then fine-tuning each task with those
masks fixed, distilled from the task's dense teacher, spends the pruning budget where the data is
(Zafrir et al. 2021, "Prune Once for All", do this for BERT).

``load_sparse_init(model, source, layers)`` copies the source's encoder tensors into ``model``
(pooler and classifier stay the task model's: they were trained on the task) and returns the
source's block masks for ``layers``, checked against each layer's block shape. ``source`` is a
run directory of ``blockprune train`` (either mode; its last checkpoint is used) or a checkpoint
directory holding ``block_masks.safetensors`` next to the weights.

Measured on the bundled MiniLM (README, ``accuracy_transfer.md``): from the 16x1 0.5 embedding run,
MRPC and STS-B end below gradual pruning from the task teacher, STS-B far below. The embedding
encoder is shaped for mean pooling; BERT-style GLUE heads read the CLS token through the pooler, and
the task fine-tune moves the top hidden states far from the pre-trained ones. Expect this method to
pay off with a head that pools the way the source was trained, or with a source pruned on the task.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from blockprune.blocks import BlockShape
from blockprune.errors import BlockpruneError
from blockprune.frontends.hard_prune import LayerMask

#: what the task model keeps of its own: its heads (trained on the task, absent from an encoder)
_KEEP_OWN = re.compile(r"(^|\.)(pooler|pre_classifier|classifier)\.")
_MASKS = "block_masks.safetensors"


def resolve_source(source: str | Path) -> Path:
    """The checkpoint directory behind ``source`` (a run dir or a checkpoint dir)."""
    p = Path(source)
    for cand in (p, p / "checkpoints" / "retrain"):
        if (cand / _MASKS).is_file():
            return cand
    raise BlockpruneError(f"no pruned checkpoint in {p} (looked for {_MASKS} there and in checkpoints/retrain/)",
                          "give the directory of a finished `blockprune train` run (e.g. --mode embedding)")


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(ckpt.glob("model*.safetensors"))
    if not files:
        raise BlockpruneError(f"{ckpt} holds masks but no model*.safetensors weights",
                              "point --sparse-init at a complete checkpoint of a finished run")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _target_name(name: str, own: dict[str, torch.Tensor], prefix: str) -> str | None:
    """The task model's name for a source tensor: the same name, or under the base model prefix
    (an encoder checkpoint has ``encoder.layer.0...``, a classifier ``bert.encoder.layer.0...``)."""
    if name in own:
        return name
    if prefix and f"{prefix}.{name}" in own:
        return f"{prefix}.{name}"
    return None


@torch.no_grad()
def load_sparse_init(model: torch.nn.Module, source: str | Path,
                     layers: dict[str, BlockShape]) -> tuple[dict[str, LayerMask], dict[str, object]]:
    """Copy ``source``'s encoder into ``model`` and return (masks for ``layers``, a summary).

    Every tensor of the source that the task model has (heads excepted) is copied; a pruned
    layer without a mask in the source, a shape that differs, or a mask that is not made of
    whole blocks of the layer's shape is refused before anything is copied."""
    from safetensors.torch import load_file

    from blockprune.frontends.grouping import is_block_aligned, keep_from_mask

    ckpt = resolve_source(source)
    raw_masks = load_file(str(ckpt / _MASKS))
    weights = _weights(ckpt)
    own = dict(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") or ""
    renamed = {_target_name(n, own, prefix): n for n in raw_masks}
    masks: dict[str, LayerMask] = {}
    for name, block in layers.items():
        src = renamed.get(name)
        if src is None:
            raise BlockpruneError(f"{ckpt}/{_MASKS} has no mask for {name}",
                                  "prune the source with the same layer selection (--include/--exclude)")
        mask = raw_masks[src].bool()
        if tuple(mask.shape) != tuple(own[name].shape):
            raise BlockpruneError(f"mask of {name} is {tuple(mask.shape)}, the layer is {tuple(own[name].shape)}",
                                  "use a source pruned from the same architecture")
        if not is_block_aligned(mask, block):
            raise BlockpruneError(f"the mask of {name} in {ckpt} is not made of whole {block} blocks",
                                  "pass the --block the source was pruned with")
        masks[name] = LayerMask(block=block, keep=keep_from_mask(mask, block), mask=mask)
    copy: dict[str, torch.Tensor] = {}
    for n, t in weights.items():
        target = _target_name(n, own, prefix)
        if target is None or _KEEP_OWN.search(target):
            continue
        if tuple(t.shape) != tuple(own[target].shape):
            raise BlockpruneError(f"{n} in {ckpt} is {tuple(t.shape)}, the task model's {target} is "
                                  f"{tuple(own[target].shape)}", "use a source pruned from the same architecture")
        copy[target] = t
    params = dict(model.named_parameters())
    missing = [n for n in layers if n not in copy]
    if missing:
        raise BlockpruneError(f"{ckpt} has masks but no weights for {missing[0]}" +
                              (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                              "point --sparse-init at a complete checkpoint of a finished run")
    for target, t in copy.items():
        dest = params.get(target)
        if dest is None:  # a buffer (e.g. position ids)
            dest = dict(model.named_buffers())[target]
        dest.copy_(t.to(dest.dtype))
    sizes = {n: own[n].numel() for n in layers}
    ratios = {n: m.sparsity for n, m in masks.items()}
    overall = sum(ratios[n] * sizes[n] for n in layers) / max(sum(sizes.values()), 1)
    return masks, {"rule": "transfer", "source": str(ckpt), "ratios": ratios, "overall": overall,
                   "tensors_copied": len(copy), "curves": None}
