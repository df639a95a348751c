"""Check a freshly compiled artifact against onnxruntime on the source ONNX, before it is published.

Why: a compiled library can be wrong in ways no earlier stage sees (a schedule bug, an importer
that misreads an op, a BSR kernel for a layout it was not written for). ``compile`` therefore
runs the artifact (still in its temporary directory) on sample inputs and compares every output
with onnxruntime on the model it was compiled from; only then is the directory renamed into
place. x86-64 artifacts run in-process; aarch64 ones under qemu through the C++ runner
(``runner.run_artifact`` picks the path).

Inputs are the toolchain's realistic samples (``blockprune.sample_inputs``): token ids across the
whole vocabulary, a padding mask with real zeros (``with_padding``: also at batch 1, where the
shared samples pad nothing, so a wrong attention-mask lowering cannot pass), token types inside
the type vocabulary, two seeds. Tolerance: max-abs 1e-4 for float32 outputs (TVM and
onnxruntime differ in summation order and in fast-math ``exp``/``erf``, well below that on
encoder outputs).

int8 models (``compress --quantize int8``) are checked against :func:`reference_model`: the same
model with its integer matmuls made exact, because onnxruntime's AVX2 ``MatMulInteger`` saturates
pairs of products to int16 (:mod:`blockprune.passes.int8_reference`) while our kernels compute the
exact sums the quantization contract defines. Max-abs cannot be the test there: dynamic
quantization rounds each activation to a step of ``range/255``, so a float32 rounding difference
upstream (summation order) flips some roundings, and each flip moves later outputs by a whole
step, which flips further roundings downstream: the flips compound layer after layer, so how far
two int8 runs drift apart depends on the inputs, not only on the kernels. Measured on MiniLM int8
(random tokens, 1x128): tiny 2-layer models match to 7e-7; the dense int8 artifact is 0.04-0.12
relative L2 from the reference with per-token cosine 0.990-0.998 depending on the seed (onnxruntime
running the same file is 2e-7-5e-5 from it, because it shares the reference's float32 ops bit for
bit), while the int8 model itself is 0.15-0.17 relative L2 / cosine 0.95-0.98 from float32 (the
size of the quantization noise a full drift tends to). A wrong kernel (index, scale, layout,
zero point) errs by order 1. So int8 outputs must have relative L2 error <= ``INT8_MAX_REL``
(above the measured drift, below the order-1 errors) and every row (token) cosine
>= ``INT8_MIN_COSINE`` against the exact reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from blockprune.errors import BlockpruneError

DEFAULT_ATOL = 1e-4
DEFAULT_SEEDS = (0, 1)
INT8_MAX_REL, INT8_MIN_COSINE = 0.25, 0.97


@dataclass
class ArtifactCheck:
    """Result of one verification: worst difference per output, and how the artifact ran."""

    max_abs_diff: dict[str, float] = field(default_factory=dict)
    atol: float = DEFAULT_ATOL
    how: str = ""  # "native" or "qemu-aarch64"
    runs: int = 0
    int8: dict[str, dict[str, float]] | None = None  # per output: rel_l2 (max), min_cosine (int8 models)

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff.values(), default=0.0)

    def to_json(self) -> dict[str, Any]:
        out = {"max_abs_diff": self.max_abs_diff, "atol": self.atol, "how": self.how, "runs": self.runs,
               "inputs": "sample_inputs.make_feeds + with_padding (vocabulary-wide token ids, padded mask)"}
        if self.int8 is not None:
            out.update(int8=self.int8, reference="exact-integer int8 model (passes.int8_reference)",
                       int8_bounds={"max_rel_l2": INT8_MAX_REL, "min_row_cosine": INT8_MIN_COSINE})
        return out


def reference_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """What the artifact must match in onnxruntime: ``model``, with exact integer matmuls if int8."""
    from blockprune.passes.int8_reference import exact_int8_model

    return exact_int8_model(model) if is_int8(model) else model


def is_int8(model: onnx.ModelProto) -> bool:
    from blockprune.passes.bsr_int8_function import OP_INT8

    return any(n.op_type in ("MatMulInteger", OP_INT8) for n in model.graph.node)


def _int8_stats(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    g, r = got.astype(np.float64), ref.astype(np.float64)
    rel = float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30))
    if r.ndim < 2 or r.shape[-1] < 8:  # logits and the like: relative error alone
        return {"rel_l2": rel, "min_cosine": 1.0}
    g2, r2 = g.reshape(-1, g.shape[-1]), r.reshape(-1, r.shape[-1])
    norms = np.linalg.norm(g2, axis=1) * np.linalg.norm(r2, axis=1)
    cos = np.where(norms > 0, (g2 * r2).sum(1) / np.maximum(norms, 1e-30), 1.0)
    return {"rel_l2": rel, "min_cosine": float(cos.min())}


def verify_artifact(directory: str | os.PathLike, model: onnx.ModelProto, atol: float = DEFAULT_ATOL,
                    seeds: tuple[int, ...] = DEFAULT_SEEDS) -> ArtifactCheck:
    """Run the artifact in ``directory`` and onnxruntime on ``model``; raise when they differ by > ``atol``."""
    from blockprune.sample_inputs import make_feeds, with_padding

    from blockprune.backends.tvm.runtime.artifact import Manifest
    from blockprune.backends.tvm.runtime.runner import paired_with_onnx, run_artifact

    manifest = Manifest.read(directory)
    int8 = is_int8(model)
    model = reference_model(model)
    check = ArtifactCheck(atol=atol, int8={} if int8 else None)
    for seed in seeds:
        feeds = with_padding(make_feeds(model, manifest.batch, manifest.seq, seed=seed))
        feeds = {i["name"]: feeds[i["name"]] for i in manifest.inputs if i["name"] in feeds}
        result = run_artifact(directory, feeds)
        check.how = result.how
        try:
            pairs = paired_with_onnx(result, model)
        except BlockpruneError:
            raise
        except Exception as err:  # noqa: BLE001 - onnxruntime cannot run the source: say so once
            raise BlockpruneError(f"cannot run the source model in onnxruntime to verify the artifact: {err}",
                                  "pass --no-verify to skip the check (the artifact is then unchecked)") from err
        for name, (got, ref) in pairs.items():
            d = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
            check.max_abs_diff[name] = max(check.max_abs_diff.get(name, 0.0), d)
            if int8:
                st, old = _int8_stats(got, ref), check.int8.get(name, {"rel_l2": 0.0, "min_cosine": 1.0})
                check.int8[name] = {"rel_l2": max(old["rel_l2"], st["rel_l2"]),
                                    "min_cosine": min(old["min_cosine"], st["min_cosine"])}
        check.runs += 1
    if int8:
        bad = {k: v for k, v in check.int8.items()
               if not (v["rel_l2"] <= INT8_MAX_REL and v["min_cosine"] >= INT8_MIN_COSINE)}
        listing = ", ".join(f"{k}: relative L2 {v['rel_l2']:.3g}, min cosine {v['min_cosine']:.4f}" for k, v in bad.items())
        what = (f"the compiled int8 artifact differs from the exact-integer int8 reference beyond the quantization "
                f"bounds (relative L2 <= {INT8_MAX_REL}, row cosine >= {INT8_MIN_COSINE}): {listing}")
    else:
        bad = {k: v for k, v in check.max_abs_diff.items() if not np.isfinite(v) or v > atol}
        listing = ", ".join(f"{k}: {v:.3g}" for k, v in bad.items())
        what = f"the compiled artifact differs from onnxruntime on the source model by more than {atol:g} (max |diff| {listing}"
    if bad:
        raise BlockpruneError(
            f"{what}; {check.how}); nothing was written" if not int8 else f"{what} ({check.how}); nothing was written",
            "report this with the model; compile with BLOCKPRUNE_TVM_CPU_SCHEDULES=0 or the densified model to "
            "narrow it down, or pass --no-verify to write it anyway",
        )
    return check
