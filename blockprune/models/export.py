"""Export a loaded model to ONNX and check it against PyTorch.

What the rest of the toolchain relies on:

* dynamic ``batch`` and ``sequence`` axes on every input and on the output;
* opset >= 17 (dynamo exporter: 18 by default, legacy: 17);
* **weight initializers renamed to their HF parameter names**, found by content (exact bytes,
  plain or transposed) rather than by exporter naming conventions, which differ between the
  two exporters and across torch versions. The mapping and each weight's layout
  (``out_in`` = PyTorch layout, ``in_out`` = transposed, the usual MatMul form) are recorded in
  metadata ``blockprune.param_map``. One masks file therefore fits both exporters;
* constants folded for the legacy exporter (TVM's ONNX frontend cannot import its
  ``ConstantOfShape`` chains otherwise);
* external data when the weights exceed ~2 GB;
* a numerical check with onnxruntime on two token-batch shapes, before anything is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from blockprune.errors import BlockpruneError
from blockprune.models.zoo import LoadedModel
from blockprune.onnx_io import EXTERNAL_DATA_THRESHOLD, save_onnx, set_meta
from blockprune.sample_inputs import make_feeds

EXPORTERS = ("dynamo", "legacy")
DEFAULT_ATOL = 1e-4
CHECK_SHAPES = ((2, 16), (3, 9))


@dataclass
class ExportResult:
    path: Path | None
    model: onnx.ModelProto
    exporter: str
    opset: int
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # "BxS" -> diff
    renamed: int = 0


def _additive_mask(attention_mask):
    """[B, S] 0/1 mask -> [B, 1, 1, S] additive float mask, as HF builds it internally.

    Why in the wrapper: transformers 5 builds this mask with vmap-style index arithmetic
    (And/GatherND/Expand on dynamic shapes) that TVM's ONNX frontend cannot import. A 4-D float
    mask is passed through by HF unchanged, so the graph holds four simple ops instead, and the
    result is identical (checked against the unwrapped model below).
    """
    import torch

    m = attention_mask[:, None, None, :].to(torch.float32)
    return (1.0 - m) * torch.finfo(torch.float32).min


class _Forward:
    """Factory for a wrapper whose forward takes positional tensors and calls HF with kwargs.

    transformers 5 models must be called with keyword arguments for export to trace the
    intended path; the wrapper also picks the one output we export.
    """

    @staticmethod
    def build(loaded: LoadedModel):
        import torch

        use_tt = loaded.uses_token_type_ids
        out_key = "last_hidden_state" if loaded.head == "encoder" else "logits"

        class Wrapper(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model

            if use_tt:
                def forward(self, input_ids, attention_mask, token_type_ids):
                    out = self.model(input_ids=input_ids, attention_mask=_additive_mask(attention_mask),
                                     token_type_ids=token_type_ids)
                    return out[out_key]
            else:
                def forward(self, input_ids, attention_mask):
                    out = self.model(input_ids=input_ids, attention_mask=_additive_mask(attention_mask))
                    return out[out_key]

        names = ["input_ids", "attention_mask"] + (["token_type_ids"] if use_tt else [])
        return Wrapper(loaded.model).eval(), names, out_key


def torch_reference(loaded: LoadedModel, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The unwrapped HF model on the same feeds, with its ordinary 2-D attention mask."""
    import torch

    out_key = "last_hidden_state" if loaded.head == "encoder" else "logits"
    with torch.no_grad():
        out = loaded.model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return out[out_key].numpy()


def _digest(arr: np.ndarray) -> tuple:
    a = np.ascontiguousarray(arr)
    return (a.dtype.str, a.shape, hashlib.sha1(a.tobytes()).hexdigest())


def map_initializers_to_params(model: onnx.ModelProto, params: dict[str, np.ndarray]) -> dict[str, dict[str, str]]:
    """Initializer name -> {"hf": parameter name, "layout": out_in | in_out | same}.

    Matches by exact content. Ambiguous matches (two parameters with identical values) are left
    out rather than guessed.
    """
    index: dict[tuple, list[tuple[str, str]]] = {}
    for name, arr in params.items():
        layout = "out_in" if arr.ndim == 2 else "same"
        index.setdefault(_digest(arr), []).append((name, layout))
        if arr.ndim == 2:
            index.setdefault(_digest(arr.T), []).append((name, "in_out"))
    mapping = {}
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) == 0:
            continue
        hits = index.get(_digest(numpy_helper.to_array(init)), [])
        if len(hits) == 1:
            mapping[init.name] = {"hf": hits[0][0], "layout": hits[0][1]}
    return mapping


def rename_initializers(model: onnx.ModelProto, renames: dict[str, str]) -> int:
    """Rename initializers (and every reference to them) in place; returns the count."""
    taken = {t.name for t in model.graph.initializer}
    done = {}
    for old, new in renames.items():
        if old == new or (new in taken and new not in renames):
            continue
        done[old] = new
    if not done:
        return 0
    for t in model.graph.initializer:
        if t.name in done:
            t.name = done[t.name]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in done:
                node.input[i] = done[name]
    for coll in (model.graph.input, model.graph.value_info):
        for vi in coll:
            if vi.name in done:
                vi.name = done[vi.name]
    return len(done)


def _fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph.fold_constants().cleanup().toposort()
    folded = gs.export_onnx(graph)
    folded.ir_version = model.ir_version
    return folded


def _torch_export(wrapper, args, names, out_key, exporter: str, opset: int) -> onnx.ModelProto:
    import torch

    # torch.onnx warns about optional torchvision ops it cannot register: noise for our users
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, out_key]}
    if out_key == "logits":
        axes[out_key] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its own progress
                prog = torch.onnx.export(wrapper, args, None, dynamo=True, opset_version=opset,
                                         input_names=names, output_names=[out_key], dynamic_axes=axes,
                                         verbose=False, external_data=False)
            return prog.model_proto
        buf = io.BytesIO()
        torch.onnx.export(wrapper, args, buf, dynamo=False, opset_version=opset, input_names=names,
                          output_names=[out_key], dynamic_axes=axes, do_constant_folding=True)
        return onnx.load_from_string(buf.getvalue())


def _check_against_torch(model_bytes_or_path, loaded: LoadedModel, shapes, atol: float, onnx_model) -> dict[str, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes_or_path, so, providers=["CPUExecutionProvider"])
    diffs = {}
    for i, (b, s) in enumerate(shapes):
        feeds = make_feeds(onnx_model, b, s, seed=100 + i)
        ref = torch_reference(loaded, feeds)
        got = sess.run(None, feeds)[0]
        if got.shape != ref.shape:
            raise BlockpruneError(f"exported model gives shape {got.shape} for batch {b}x{s}, PyTorch {ref.shape}",
                                  "report this as a bug with the model config")
        diffs[f"{b}x{s}"] = float(np.max(np.abs(got - ref)))
    worst = max(diffs.values())
    if not np.isfinite(worst) or worst > atol:
        raise BlockpruneError(
            f"exported ONNX model differs from PyTorch: max |diff| {worst:.3g} > {atol:g} ({diffs})",
            "try the other exporter (--exporter legacy|dynamo); nothing was written",
        )
    return diffs


def export_onnx(loaded: LoadedModel, out: str | Path | None, exporter: str = "dynamo",
                opset: int | None = None, check: bool = True, atol: float = DEFAULT_ATOL) -> ExportResult:
    """Export, rename weights to HF names, record metadata, check with onnxruntime, then write."""
    import torch

    if exporter not in EXPORTERS:
        raise BlockpruneError(f"unknown exporter {exporter!r}", f"use one of: {', '.join(EXPORTERS)}")
    opset = opset or (18 if exporter == "dynamo" else 17)
    if opset < 17:
        raise BlockpruneError(f"opset {opset} is too old", "use opset 17 or newer")
    wrapper, names, out_key = _Forward.build(loaded)
    g = torch.Generator().manual_seed(0)
    vocab = int(loaded.config.vocab_size)
    args = [torch.randint(0, vocab, (2, 8), generator=g), torch.ones(2, 8, dtype=torch.long)]
    if loaded.uses_token_type_ids:
        args.append(torch.zeros(2, 8, dtype=torch.long))
    model = _torch_export(wrapper, tuple(args), names, out_key, exporter, opset)
    if exporter == "legacy":
        model = _fold_constants(model)

    params = {n: p.detach().cpu().numpy() for n, p in loaded.model.named_parameters()}
    mapping = map_initializers_to_params(model, params)
    renamed = rename_initializers(model, {k: v["hf"] for k, v in mapping.items()})
    param_map = {v["hf"]: v for v in mapping.values()}  # keys are now the HF names
    cfg = loaded.config
    set_meta(model, "param_map", param_map)
    set_meta(model, "architecture", loaded.arch.name)
    set_meta(model, "source", loaded.source)
    set_meta(model, "head", loaded.head)
    set_meta(model, "exporter", exporter)
    set_meta(model, "config", {
        "model_type": cfg.model_type,
        "num_layers": loaded.num_layers,
        "num_heads": loaded.num_heads,
        "hidden_size": loaded.hidden_size,
        "intermediate_size": getattr(cfg, "intermediate_size", None) or getattr(cfg, "hidden_dim", None),
        "vocab_size": int(cfg.vocab_size),
        "type_vocab_size": int(getattr(cfg, "type_vocab_size", 0) or 0),
    })
    model.producer_name = "blockprune"

    diffs: dict[str, float] = {}
    big = model.ByteSize() >= EXTERNAL_DATA_THRESHOLD
    if check and not big:
        diffs = _check_against_torch(model.SerializeToString(), loaded, CHECK_SHAPES, atol, model)
    path = None
    if out is not None:
        verify = (lambda p: diffs.update(_check_against_torch(str(p), loaded, CHECK_SHAPES, atol, model))) \
            if (check and big) else None
        path = save_onnx(model, out, verify=verify)
    return ExportResult(path, model, exporter, opset, diffs, renamed)
