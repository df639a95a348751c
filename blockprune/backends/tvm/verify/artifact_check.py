"""Check a freshly compiled artifact against onnxruntime on the source ONNX, before it is published.

Why: a compiled library can be wrong in ways no earlier stage sees (a schedule bug, an importer
that misreads an op, a BSR kernel for a layout it was not written for). ``compile`` therefore
runs the artifact (still in its temporary directory) on sample inputs and compares every output
with onnxruntime on the model it was compiled from; only then is the directory renamed into
place. x86-64 artifacts run in-process; aarch64 ones under qemu through the C++ runner
(``runner.run_artifact`` picks the path).

Inputs are the toolchain's realistic samples (``blockprune.sample_inputs``): token ids across the
whole vocabulary, a padding mask with real zeros, token types inside the type vocabulary, two
seeds. Tolerance: max-abs 1e-4 for float32 outputs (TVM and onnxruntime differ in summation
order and in fast-math ``exp``/``erf``, well below that on encoder outputs).

int8 models (``compress --quantize int8``) are checked against :func:`reference_model`: the same
model with its integer matmuls made exact, because onnxruntime's AVX2 ``MatMulInteger`` saturates
pairs of products to int16 (:mod:`blockprune.passes.int8_reference`) while our kernels compute the
exact sums the quantization contract defines; against the saturating run a correct artifact
differs by up to ~0.06 on BERT-shaped outputs, against the exact one by ~1e-6.
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


@dataclass
class ArtifactCheck:
    """Result of one verification: worst difference per output, and how the artifact ran."""

    max_abs_diff: dict[str, float] = field(default_factory=dict)
    atol: float = DEFAULT_ATOL
    how: str = ""  # "native" or "qemu-aarch64"
    runs: int = 0

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff.values(), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {"max_abs_diff": self.max_abs_diff, "atol": self.atol, "how": self.how, "runs": self.runs,
                "inputs": "sample_inputs.make_feeds (vocabulary-wide token ids, padded mask)"}


def reference_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """What the artifact must match in onnxruntime: ``model``, with exact integer matmuls if int8."""
    from blockprune.passes.bsr_int8_function import OP_INT8
    from blockprune.passes.int8_reference import exact_int8_model

    int8 = any(n.op_type in ("MatMulInteger", OP_INT8) for n in model.graph.node)
    return exact_int8_model(model) if int8 else model


def verify_artifact(directory: str | os.PathLike, model: onnx.ModelProto, atol: float = DEFAULT_ATOL,
                    seeds: tuple[int, ...] = DEFAULT_SEEDS) -> ArtifactCheck:
    """Run the artifact in ``directory`` and onnxruntime on ``model``; raise when they differ by > ``atol``."""
    from blockprune.sample_inputs import make_feeds

    from blockprune.backends.tvm.runtime.artifact import Manifest
    from blockprune.backends.tvm.runtime.runner import compare_with_onnx, run_artifact

    manifest = Manifest.read(directory)
    model = reference_model(model)
    check = ArtifactCheck(atol=atol)
    for seed in seeds:
        feeds = make_feeds(model, manifest.batch, manifest.seq, seed=seed)
        feeds = {i["name"]: feeds[i["name"]] for i in manifest.inputs if i["name"] in feeds}
        result = run_artifact(directory, feeds)
        check.how = result.how
        try:
            diffs = compare_with_onnx(result, model)
        except BlockpruneError:
            raise
        except Exception as err:  # noqa: BLE001 - onnxruntime cannot run the source: say so once
            raise BlockpruneError(f"cannot run the source model in onnxruntime to verify the artifact: {err}",
                                  "pass --no-verify to skip the check (the artifact is then unchecked)") from err
        for name, d in diffs.items():
            check.max_abs_diff[name] = max(check.max_abs_diff.get(name, 0.0), d)
        check.runs += 1
    bad = {k: v for k, v in check.max_abs_diff.items() if not np.isfinite(v) or v > atol}
    if bad:
        listing = ", ".join(f"{k}: {v:.3g}" for k, v in bad.items())
        raise BlockpruneError(
            f"the compiled artifact differs from onnxruntime on the source model by more than {atol:g} "
            f"(max |diff| {listing}; {check.how}); nothing was written",
            "report this with the model; compile with BLOCKPRUNE_TVM_CPU_SCHEDULES=0 or the densified model to "
            "narrow it down, or pass --no-verify to write it anyway",
        )
    return check
