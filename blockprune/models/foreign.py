"""ONNX models exported the way users export them, without blockprune: for robustness checks.

Why: issue #13. Users bring graphs from a plain ``torch.onnx.export`` (legacy TorchScript
exporter at opset 14, or the dynamo exporter) with no weight renaming and no metadata, or from
onnxruntime's transformer optimizer (fused ``Attention``/``SkipLayerNormalization``/``BiasGelu``).
The robustness tests and ``benchmarks/any_onnx_matrix.py`` build those here, from the same
named configs, so that every route is exercised end to end.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx

from blockprune.models.zoo import LoadedModel

ROUTES = ("bp-dynamo", "bp-legacy", "torch-legacy", "torch-dynamo", "ort-optimized")


def _wrapper(loaded: LoadedModel):
    """A module taking positional tensors, as a user's export script would write it."""
    import torch

    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if loaded.uses_token_type_ids else [])

    class Plain(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kw = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kw["token_type_ids"] = token_type_ids
            return self.model(**kw)[0]

    return Plain(loaded.model).eval(), names


def plain_torch_export(loaded: LoadedModel, out: str | Path, exporter: str = "legacy", opset: int | None = None,
                       seq: int = 16) -> Path:
    """``torch.onnx.export`` as in the HF/PyTorch tutorials: dynamic batch/sequence, no post-processing."""
    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    model, names = _wrapper(loaded)
    g = torch.Generator().manual_seed(0)
    args = [torch.randint(0, int(loaded.config.vocab_size), (2, seq), generator=g), torch.ones(2, seq, dtype=torch.long)]
    if loaded.uses_token_type_ids:
        args.append(torch.zeros(2, seq, dtype=torch.long))
    out = Path(out)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            axes = {n: {0: "batch", 1: "sequence"} for n in names}
            axes["output"] = {0: "batch"}
            torch.onnx.export(model, tuple(args), str(out), dynamo=False, opset_version=opset or 14,
                              input_names=names, output_names=["output"], dynamic_axes=axes)
        else:
            batch = torch.export.Dim("batch", min=1, max=64)
            sequence = torch.export.Dim("sequence", min=2, max=int(loaded.config.max_position_embeddings) - 4)
            shapes = tuple({0: batch, 1: sequence} for _ in names)
            prog = torch.onnx.export(model, tuple(args), None, dynamo=True, opset_version=opset,
                                     input_names=names, output_names=["output"], dynamic_shapes=shapes,
                                     external_data=False)
            onnx.save(prog.model_proto, str(out))
    return out


def ort_optimized(src: str | Path, out: str | Path, loaded: LoadedModel) -> Path:
    """onnxruntime's transformer optimizer (fusions, offline) on a plain export."""
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimize_model(str(src), model_type="bert", num_heads=int(loaded.num_heads),
                             hidden_size=int(loaded.hidden_size), opt_level=1)
        opt.save_model_to_file(str(out))
    return Path(out)


def export_route(loaded: LoadedModel, route: str, out: str | Path, seq: int = 16) -> Path:
    """Export ``loaded`` along one of ``ROUTES`` to ``out``."""
    out = Path(out)
    if route in ("bp-dynamo", "bp-legacy"):
        from blockprune.models.export import export_onnx

        export_onnx(loaded, out, exporter=route.split("-")[1])
        return out
    if route in ("torch-legacy", "torch-dynamo"):
        return plain_torch_export(loaded, out, exporter=route.split("-")[1], seq=seq)
    if route == "ort-optimized":
        plain = out.with_name(out.stem + ".plain.onnx")
        plain_torch_export(loaded, plain, exporter="legacy", seq=seq)
        return ort_optimized(plain, out, loaded)
    raise ValueError(f"unknown route {route!r}; one of {ROUTES}")
