"""Masked retraining (stage 3): pruned weights start at zero and stay exactly zero.

Two mechanisms, because either alone leaks:

* a gradient hook on each masked parameter zeroes the gradient of pruned entries, so the task
  loss never pushes them;
* after every optimizer step the mask is re-applied. AdamW moves an entry whose gradient is zero
  whenever its moments are nonzero (an optimizer carried over from stage 2, or one whose state
  was loaded from a checkpoint), and other optimizers/schedulers may add terms we do not see.
  Optimizer state of the masked entries is also zeroed when the optimizer is attached.

Masks live on the model as non-persistent buffers (``<param>_blockprune_mask`` on the owning
module): they follow ``model.to(device)``, ``verify_masked(model)`` can find them without any
other object, and they stay out of ``state_dict`` so checkpoints load into a plain model.
``squash()`` bakes the zeros in and removes hooks and buffers. Entries are zeroed with
``masked_fill_`` rather than multiplication so a NaN/inf in a pruned entry still becomes 0.0.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from blockprune.errors import BlockpruneError

MASK_SUFFIX = "_blockprune_mask"


def _as_bool_mask(m: Any) -> torch.Tensor:
    if hasattr(m, "mask") and isinstance(getattr(m, "mask"), torch.Tensor):  # a hard_prune.LayerMask
        m = m.mask
    if isinstance(m, np.ndarray):
        m = torch.from_numpy(np.ascontiguousarray(m))
    if not isinstance(m, torch.Tensor):
        raise BlockpruneError(
            f"a mask of type {type(m).__name__} is not a tensor or array",
            "pass torch tensors, numpy arrays or hard_prune.LayerMask objects",
        )
    return m != 0


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, local = name.rpartition(".")
    try:
        module = model.get_submodule(prefix) if prefix else model
    except AttributeError:
        module = None
    if module is None or not isinstance(module._parameters.get(local), torch.Tensor):
        raise BlockpruneError(
            f"the model has no parameter named {name!r}",
            "masks are keyed by PyTorch parameter name, e.g. bert.encoder.layer.0.attention.self.query.weight",
        )
    return module, local


def attached_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> bool mask for every mask currently attached to ``model``."""
    out = {}
    for mod_name, module in model.named_modules():
        for buf_name, buf in module._buffers.items():
            if buf is not None and buf_name.endswith(MASK_SUFFIX):
                local = buf_name[: -len(MASK_SUFFIX)]
                out[f"{mod_name}.{local}" if mod_name else local] = buf
    return out


class MaskedTraining:
    """Attach masks (parameter name -> mask, 1/True = keep) to ``model``, zero the pruned
    weights now, and keep them zero through training. Pass ``optimizer`` (or call
    ``attach_optimizer``) so masks are re-applied after every step."""

    def __init__(
        self,
        model: nn.Module,
        masks: Mapping[str, Any],
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if not masks:
            raise BlockpruneError("no masks to attach", "run hard pruning first; it returns the masks")
        self.model = model
        self._entries: dict[str, tuple[nn.Module, str, str]] = {}
        self._handles: list[Any] = []
        checked = []  # validate everything first, so a bad entry leaves the model untouched
        for name, m in masks.items():
            module, local = _owner(model, name)
            param = module._parameters[local]
            mask = _as_bool_mask(m)
            if tuple(mask.shape) != tuple(param.shape):
                raise BlockpruneError(
                    f"mask for {name!r} has shape {tuple(mask.shape)} but the weight is {tuple(param.shape)}",
                    "masks are in the PyTorch W[out, in] layout; transpose masks taken from an ONNX MatMul",
                )
            buf_name = local + MASK_SUFFIX
            if buf_name in module._buffers:
                raise BlockpruneError(
                    f"a mask is already attached to {name!r}",
                    "squash() the previous MaskedTraining before attaching new masks",
                )
            checked.append((name, module, local, param, mask, buf_name))
        for name, module, local, param, mask, buf_name in checked:
            module.register_buffer(buf_name, mask.to(param.device), persistent=False)
            self._entries[name] = (module, local, buf_name)
            self._handles.append(param.register_hook(self._grad_hook(module, buf_name)))
        self.apply_masks()
        if optimizer is not None:
            self.attach_optimizer(optimizer)

    @staticmethod
    def _grad_hook(module: nn.Module, buf_name: str):
        # Look the mask up at call time so it is the one on the current device after .to().
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad.masked_fill(~getattr(module, buf_name), 0)

        return hook

    def _pairs(self):
        for name, (module, local, buf_name) in self._entries.items():
            yield name, module._parameters[local], getattr(module, buf_name)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Set every pruned entry to exactly 0.0."""
        for _, param, mask in self._pairs():
            param.masked_fill_(~mask, 0)

    @torch.no_grad()
    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-apply masks after each ``optimizer.step()`` and zero the optimizer state (moments)
        of pruned entries, so that state carried over from stage 2 cannot move them."""
        for _, param, mask in self._pairs():
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    value.masked_fill_(~mask, 0)
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.apply_masks()))

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def masks(self) -> dict[str, torch.Tensor]:
        """Bool masks on CPU, keyed by parameter name (1 = keep)."""
        return {name: mask.detach().cpu().clone() for name, _, mask in self._pairs()}

    def squash(self) -> dict[str, torch.Tensor]:
        """Bake the zeros in, remove hooks and mask buffers; returns the masks (CPU, bool).
        The model is then a plain dense model whose pruned entries are 0.0."""
        self.apply_masks()
        out = self.masks()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module, _, buf_name in self._entries.values():
            del module._buffers[buf_name]
        self._entries.clear()
        return out


def attach_masks(
    model: nn.Module, masks: Mapping[str, Any], optimizer: torch.optim.Optimizer | None = None
) -> MaskedTraining:
    """Shorthand for ``MaskedTraining(model, masks, optimizer)``."""
    return MaskedTraining(model, masks, optimizer)


@torch.no_grad()
def masked_violations(model: nn.Module, masks: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Per masked parameter, how many pruned entries are not exactly 0.0 (NaN counts)."""
    masks = attached_masks(model) if masks is None else masks
    out = {}
    for name, m in masks.items():
        module, local = _owner(model, name)
        param = module._parameters[local]
        keep = _as_bool_mask(m).to(param.device)
        out[name] = int((param[~keep] != 0).sum())
    return out


def verify_masked(model: nn.Module, masks: Mapping[str, Any] | None = None) -> int:
    """Check that every masked entry of ``model`` is exactly 0.0; returns how many were checked.

    Uses the attached masks, or ``masks`` when given (e.g. after ``squash()``). Raises
    ``BlockpruneError`` naming the offending layers, and also when there is nothing to check,
    since a silent pass on an unmasked model would hide a broken pipeline.
    """
    use = attached_masks(model) if masks is None else masks
    if not use:
        raise BlockpruneError(
            "no masks are attached to the model, so nothing can be verified",
            "attach masks with attach_masks(model, masks) or pass them: verify_masked(model, masks)",
        )
    bad = {n: c for n, c in masked_violations(model, use).items() if c}
    if bad:
        listing = ", ".join(f"{n} ({c})" for n, c in list(bad.items())[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise BlockpruneError(
            f"pruned weights are not zero in {len(bad)} layer(s): {listing}{more}",
            "attach the masks with the optimizer (attach_masks(model, masks, optimizer)) so they are "
            "re-applied after every step",
        )
    return sum(int((~_as_bool_mask(m)).sum()) for m in use.values())
