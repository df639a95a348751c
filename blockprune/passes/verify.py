"""Verify: run the rewritten graph and a reference in onnxruntime and compare, before writing.

References:
* exact rewrites (reorder, compaction, format changes) compare against the graph they started from;
* pruning compares against a *numpy masked-dense reference*: the original graph with each weight
  multiplied by its mask in numpy, built with plain ``onnx`` (no graphsurgeon), so a bug in the
  graph surgery cannot hide in the reference too.

Tolerance: max |candidate - reference| <= ``atol`` (default 1e-4, float32) over every output,
on random token batches of two shapes (see ``blockprune.sample_inputs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from blockprune.errors import BlockpruneError
from blockprune.sample_inputs import make_feeds

DEFAULT_ATOL = 1e-4
DEFAULT_SHAPES = ((2, 16), (1, 7))


@dataclass
class VerifyResult:
    max_abs_diff: float
    per_shape: dict[str, float] = field(default_factory=dict)
    atol: float = DEFAULT_ATOL
    cosine_to_reference: float = 1.0

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.atol)


def _session(model: onnx.ModelProto, custom_ops_hook=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if custom_ops_hook is not None:
        custom_ops_hook(so)
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BlockpruneError(f"onnxruntime cannot load the model: {exc}",
                              "the graph uses an op onnxruntime does not know; check the passes applied") from exc


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return _session(model).run(None, feeds)


def masked_reference(original: onnx.ModelProto, masks: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The original graph with ``W * mask`` computed in numpy for each masked initializer."""
    ref = onnx.ModelProto()
    ref.CopyFrom(original)
    inits = {t.name: t for t in ref.graph.initializer}
    for name, mask in masks.items():
        if name not in inits:
            raise BlockpruneError(f"internal: mask {name!r} names no initializer of the reference model")
        w = numpy_helper.to_array(inits[name])
        inits[name].CopyFrom(numpy_helper.from_array((w * (np.asarray(mask) != 0)).astype(w.dtype), name))
    return ref


def paired_runs(candidate: onnx.ModelProto, reference: onnx.ModelProto, shapes=DEFAULT_SHAPES, seed: int = 0,
                what: str = "rewritten model"):
    """For each ``(batch, seq)``: ``("BxS", feeds, [(candidate output, reference output), ...])``,
    both models run in onnxruntime on the same random token batch; mismatched output counts or
    shapes are one error. Shared by the exact comparison here and the quantized one."""
    cand, ref = _session(candidate), _session(reference)
    for i, (b, s) in enumerate(shapes):
        feeds = make_feeds(reference, b, s, seed=seed + i)
        outs_c, outs_r = cand.run(None, feeds), ref.run(None, feeds)
        if len(outs_c) != len(outs_r):
            raise BlockpruneError(f"the {what} has {len(outs_c)} outputs, the reference {len(outs_r)}",
                                  "report this as a bug")
        for oc, orf in zip(outs_c, outs_r):
            if oc.shape != orf.shape:
                raise BlockpruneError(f"the {what} gives output shape {oc.shape}, the reference {orf.shape}",
                                      "report this as a bug")
        yield f"{b}x{s}", feeds, list(zip(outs_c, outs_r))


def compare(candidate: onnx.ModelProto, reference: onnx.ModelProto, atol: float = DEFAULT_ATOL,
            shapes=DEFAULT_SHAPES, seed: int = 0, what: str = "rewritten model") -> VerifyResult:
    """Compare outputs; raise a BlockpruneError when they differ by more than ``atol``."""
    per, worst, cos = {}, 0.0, []
    for key, _, pairs in paired_runs(candidate, reference, shapes, seed, what):
        d = 0.0
        for oc, orf in pairs:
            d = max(d, float(np.max(np.abs(oc.astype(np.float64) - orf))))
            a, r = oc.ravel().astype(np.float64), orf.ravel().astype(np.float64)
            cos.append(float(a @ r / (np.linalg.norm(a) * np.linalg.norm(r) + 1e-30)))
        per[key] = d
        worst = max(worst, d)
    result = VerifyResult(worst, per, atol, min(cos) if cos else 1.0)
    if not result.ok:
        raise BlockpruneError(
            f"verification failed: the {what} differs from its reference by max |diff| {worst:.3g} > {atol:g} "
            f"({per}); nothing was written",
            "report this as a bug with the model, or pass --no-verify to write it anyway",
        )
    return result
