"""One training run (and optionally its compiled artifact and a benchmark) as a Markdown report.

Why: a run directory holds the evidence (``report.json``, ``masks.safetensors``, a compile
artifact's ``manifest.json``, timings) in machine formats; reviewers want one page saying what
was pruned where, what it cost in accuracy, and what it bought in size and speed. This module
only reads and renders: it never trains, compiles or times anything.

Inputs are checked up front with one clear error each (missing directory, missing or corrupt
``report.json``, a corrupt masks file, a manifest of another format, an unknown bench JSON), so
a broken run never yields a half-written report. Figures go next to the Markdown file.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blockprune.errors import BlockpruneError

REPORT_JSON = "report.json"
MASKS = "masks.safetensors"
MANIFEST = "manifest.json"
ARTIFACT_FORMAT = "blockprune-tvm-artifact/1"
_REQUIRED = ("task", "metric", "stages", "compression_rate", "layers")

#: (regex on the HF name, short role) for the mask grid columns; first match wins.
ROLES = (
    (r"attention\.self\.query|attention\.q_lin", "q"),
    (r"attention\.self\.key|attention\.k_lin", "k"),
    (r"attention\.self\.value|attention\.v_lin", "v"),
    (r"attention\.output\.dense|attention\.out_lin", "attn out"),
    (r"intermediate\.dense|ffn\.lin1", "ffn in"),
    (r"output\.dense|ffn\.lin2", "ffn out"),
)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass
class LayerMap:
    """One pruned weight's mask in the W[out, in] layout, with where it sits in the model."""

    name: str  # ONNX initializer name (the masks file key)
    hf_name: str
    block: str | None
    mask: np.ndarray  # bool/uint8 [out, in]

    @property
    def layer_index(self) -> int | None:
        m = re.search(r"(?:layer|layers)\.(\d+)\.", self.hf_name)
        return int(m.group(1)) if m else None

    @property
    def role(self) -> str:
        for pattern, role in ROLES:
            if re.search(pattern, self.hf_name):
                return role
        return self.hf_name.rsplit(".", 2)[-2] if "." in self.hf_name else self.hf_name

    @property
    def label(self) -> str:
        i = self.layer_index
        return f"L{i} {self.role}" if i is not None else self.hf_name

    @property
    def density(self) -> float:
        return float(np.mean(self.mask)) if self.mask.size else 0.0


@dataclass
class RunInputs:
    run_dir: Path
    report: dict[str, Any]
    masks: list[LayerMap] = field(default_factory=list)
    masks_note: str | None = None  # why there is no heatmap, when there is none
    manifest: dict[str, Any] | None = None
    artifact_dir: Path | None = None
    bench: dict[str, Any] | None = None


def _read_json(path: Path, what: str, fix: str) -> Any:
    if not path.is_file():
        raise BlockpruneError(f"{what} {path} does not exist", fix)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BlockpruneError(f"{what} {path} is not valid JSON ({err})", fix) from None


def read_report(run_dir: Path) -> dict[str, Any]:
    """``report.json`` of a finished ``blockprune train`` run, checked for the fields we render."""
    if not run_dir.exists():
        raise BlockpruneError(f"run directory {run_dir} does not exist",
                              "pass the --out directory of a finished `blockprune train` run")
    if not run_dir.is_dir():
        raise BlockpruneError(f"{run_dir} is not a directory", "pass the run directory, not a file inside it")
    path = run_dir / REPORT_JSON
    if not path.is_file() and (run_dir / "state.json").is_file():
        raise BlockpruneError(f"run {run_dir} has not finished (state.json but no {REPORT_JSON})",
                              "rerun the same `blockprune train` command to resume it, then report")
    report = _read_json(path, "training report", "rerun `blockprune train` with this --out to rewrite it")
    if not isinstance(report, dict):
        raise BlockpruneError(f"{path} is not a training report (top level is not an object)",
                              "pass the run directory written by `blockprune train`")
    missing = [k for k in _REQUIRED if k not in report]
    if missing:
        raise BlockpruneError(f"{path} lacks {', '.join(missing)}: not a `blockprune train` report",
                              "pass the run directory written by `blockprune train`")
    return report


def read_mask_maps(path: Path) -> list[LayerMap]:
    """Masks turned into W[out, in] maps, in model order (layer index, then name)."""
    from blockprune.masks import load_masks

    ms = load_masks(path)  # clear errors for missing/corrupt files
    out = []
    for name, mask in ms.masks.items():
        info = ms.layers.get(name)
        m = np.asarray(mask)
        if m.ndim != 2:
            raise BlockpruneError(f"mask {name!r} in {path} has {m.ndim} dimensions, expected 2", "regenerate it")
        if info is not None and info.layout == "in_out":
            m = m.T
        out.append(LayerMap(name, (info.hf_name if info and info.hf_name else name),
                            info.block if info else None, m != 0))

    def order(lm: LayerMap) -> tuple:
        i = lm.layer_index
        roles = [r for _, r in ROLES]
        return (i if i is not None else 10**6, roles.index(lm.role) if lm.role in roles else len(roles), lm.hf_name)

    return sorted(out, key=order)


def read_manifest(artifact: Path) -> dict[str, Any]:
    """The artifact's ``manifest.json`` (the library itself is not needed to describe it)."""
    if not artifact.is_dir():
        raise BlockpruneError(f"artifact directory {artifact} does not exist",
                              "pass the -o directory of `blockprune compile`")
    m = _read_json(artifact / MANIFEST, "artifact manifest", "recompile: blockprune compile MODEL.onnx -o DIR")
    if not isinstance(m, dict) or m.get("format") != ARTIFACT_FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise BlockpruneError(f"{artifact / MANIFEST} has format {got!r}, expected {ARTIFACT_FORMAT!r}",
                              "recompile the model with this blockprune version")
    return m


def read_bench(path: Path) -> dict[str, Any]:
    """A bench JSON: ``blockprune bench --json`` output (``seconds`` list) or ``benchmarks/speed.py``'s
    result (``model_rows``)."""
    b = _read_json(path, "bench file", "pass the JSON printed by `blockprune bench --json` or benchmarks/speed.py")
    ok = isinstance(b, dict) and (isinstance(b.get("seconds"), list) or isinstance(b.get("model_rows"), list))
    if not ok:
        raise BlockpruneError(f"{path} is not a bench result (no 'seconds' list nor 'model_rows')",
                              "pass the JSON printed by `blockprune bench --json` or benchmarks/speed.py's speed.json")
    if isinstance(b.get("seconds"), list) and not all(isinstance(t, (int, float)) for t in b["seconds"]):
        raise BlockpruneError(f"{path}: 'seconds' holds non-numbers", "regenerate it with `blockprune bench --json`")
    return b


def load_run(run_dir: str | Path, artifact: str | Path | None = None, bench: str | Path | None = None) -> RunInputs:
    """Read and check everything before anything is rendered."""
    run_dir = Path(run_dir)
    report = read_report(run_dir)
    inputs = RunInputs(run_dir, report)
    masks_path = run_dir / MASKS
    if masks_path.is_file():
        inputs.masks = read_mask_maps(masks_path)
    else:
        inputs.masks_note = f"no {MASKS} in {run_dir}: no sparsity heatmap"
    if artifact is not None:
        inputs.artifact_dir = Path(artifact)
        inputs.manifest = read_manifest(inputs.artifact_dir)
    if bench is not None:
        inputs.bench = read_bench(Path(bench))
    return inputs


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _f(v: Any, fmt: str = ".4f") -> str:
    if isinstance(v, dict):  # e.g. the export check's max-abs diff per input shape: show the worst
        nums = [x for x in v.values() if isinstance(x, (int, float))]
        return _f(max(nums), fmt) if nums else "-"
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, fmt) if isinstance(v, (int, float)) else str(v)


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    align = align or ["---"] * len(header)
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def summary_section(r: dict[str, Any]) -> list[str]:
    rows = [["model", str(r.get("model", "-"))], ["task", f"{r['task']} (dev {r['metric']})"],
            ["method", f"{r.get('method', '-')} (masks: {r.get('mask_source', '-')})"],
            ["block / ratio / mode", f"{r.get('block', '-')} / {_f(r.get('ratio'), 'g')} / {r.get('prune_mode', '-')}"],
            ["dense -> pruned", f"{_f(r.get('dense_metric'))} -> {_f(r.get('pruned_metric'))}"],
            ["compression rate (paper's count)", f"{_f(r['compression_rate'], '.2f')}x"],
            ["sparsity of pruned layers", _f(r.get("pruned_layers_sparsity"), ".3f")],
            ["masked entries verified 0.0", _f(r.get("masked_entries_verified_zero"), "d")],
            ["ONNX export max-abs diff", _f(r.get("onnx_export_max_abs_diff"), ".1e")]]
    return ["## Summary", ""] + _table(["what", "value"], rows) + [""]


def stages_section(r: dict[str, Any], png: str | None) -> list[str]:
    rows = []
    for s in r["stages"]:
        rows.append([str(s.get("stage")), _f(s.get("epochs"), "d"), _f(s.get("lr"), "g"), _f(s.get("metric")),
                     _f(s.get("dev_loss")), _f(s.get("train_loss")), _f(s.get("penalty")),
                     _f(s.get("pruned_mean_norm")), _f(s.get("kept_mean_norm")), _f(s.get("seconds"), ".0f")])
    out = ["## Accuracy per stage", ""] + _table(
        ["stage", "epochs", "lr", f"dev {r['metric']}", "dev loss", "train loss", "penalty", "norm pruned",
         "norm kept", "seconds"], rows, ["---"] + ["---:"] * 9) + [""]
    if png:
        out += [f"![dev metric per stage]({png})", ""]
    return out


def layers_section(inputs: RunInputs, heatmap: str | None, grid: str | None) -> list[str]:
    r = inputs.report
    forms = {}
    if inputs.manifest:
        forms = {layer.get("name"): layer for layer in inputs.manifest.get("layers", [])}
    out = ["## Per-layer sparsity and forms", ""]
    if heatmap:
        out += ["Rows are the pruned weights in model order; each column is a band of output features (rows "
                "of W[out, in]) coloured by the fraction of weights kept, so a dead neuron or head shows as a "
                "dark stripe; the right column is the layer's density.", "", f"![sparsity heatmap]({heatmap})", ""]
    if grid:
        out += [f"![per-layer keep maps]({grid})", ""]
    if inputs.masks_note:
        out += [f"_{inputs.masks_note}._", ""]
    by_hf = {m.hf_name: m for m in inputs.masks}
    rows = []
    for name, v in sorted(r["layers"].items(), key=lambda kv: _natural(kv[0])):
        lm = by_hf.get(name)
        onnx_name = lm.name if lm else name
        f = forms.get(onnx_name) or forms.get(name) or {}
        form = f.get("form", "-")
        if form == "bsr" and f.get("density") is not None:
            form = f"bsr (block density {f['density']:.2f})"
        rows.append([name, "x".join(str(d) for d in v.get("shape", [])), str(v.get("block") or "-"),
                     _f(v.get("density"), ".3f"), "yes" if v.get("pruned") else "no", form])
    out += _table(["weight", "shape", "block", "density", "pruned", "compiled form"], rows,
                  ["---", "---", "---", "---:", "---", "---"]) + [""]
    return out


def _natural(name: str) -> list:
    """Sort key putting layer.10 after layer.9."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def size_section(inputs: RunInputs) -> list[str]:
    r = inputs.report
    cw = r.get("counted_weights", {})
    total, nonzero = cw.get("total"), cw.get("nonzero")
    rows = []
    if total is not None and nonzero is not None:
        rows += [["counted weights (2-D, no embeddings)", f"{total:,}", _bytes(4 * total)],
                 ["of which nonzero", f"{nonzero:,}", _bytes(4 * nonzero)]]
    outputs = r.get("outputs", {})
    for what, key in (("ONNX model (dense storage)", "onnx"), ("masks file", "masks")):
        p = Path(outputs.get(key, "")) if outputs.get(key) else None
        if p is not None and not p.is_absolute() and not p.exists():
            p = inputs.run_dir / p.name
        if p is not None and p.is_file():
            rows.append([what, "-", _bytes(p.stat().st_size)])
    if inputs.artifact_dir is not None and inputs.manifest is not None:
        lib = inputs.artifact_dir / inputs.manifest.get("library", "model.so")
        if lib.is_file():
            rows.append([f"compiled library ({inputs.manifest.get('target', {}).get('name', '?')})", "-",
                         _bytes(lib.stat().st_size)])
    out = ["## Size", ""]
    if not rows:
        return out + ["_no size information in the run_", ""]
    return out + _table(["what", "count", "bytes (float32)"], rows, ["---", "---:", "---:"]) + [
        "", f"Compression rate (total / nonzero): {_f(r['compression_rate'], '.2f')}x. Storage shrinks with the "
            "density only once the model is compressed (`blockprune compress`: compact or BSR forms).", ""]


def artifact_section(m: dict[str, Any] | None) -> list[str]:
    if m is None:
        return []
    t = m.get("target", {})
    layers = m.get("layers", [])
    n_bsr = sum(1 for layer in layers if layer.get("form") == "bsr")
    rows = [["target", f"{t.get('name', '-')} ({t.get('arch', '-')})"],
            ["static shape", f"batch {m.get('batch')}, sequence {m.get('seq')}"],
            ["layers", f"{len(layers)} ({n_bsr} block-sparse, {len(layers) - n_bsr} dense)"],
            ["BSR kernels", str(m.get("kernels", 0))],
            ["versions", ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()) or "-"],
            ["source", f"{m.get('source', {}).get('path')} (sha256 {str(m.get('source', {}).get('sha256', ''))[:12]})"]]
    return ["## Compiled artifact", ""] + _table(["what", "value"], rows) + [""]


def speed_section(bench: dict[str, Any] | None) -> list[str]:
    if bench is None:
        return ["## Speed", "", "_no benchmark given (`--bench`): run `blockprune bench DIR --json > bench.json` "
                                "or `python benchmarks/speed.py`_", ""]
    out = ["## Speed", ""]
    if isinstance(bench.get("seconds"), list):
        ms = sorted(1e3 * t for t in bench["seconds"])
        if not ms:
            return out + ["_the bench file holds no timings_", ""]
        rows = [["artifact", str(bench.get("artifact", "-"))], ["where", str(bench.get("where", "-"))],
                ["samples", str(len(ms))], ["median", f"{float(np.median(ms)):.3f} ms"], ["min", f"{ms[0]:.3f} ms"],
                ["max", f"{ms[-1]:.3f} ms"]]
        return out + _table(["what", "value"], rows) + [""]
    clock = bench.get("clock", "wall")
    rows = []
    base: dict[str, float] = {}
    for r in bench["model_rows"]:
        if r.get("variant") == "dense" and r.get("engine") == "onnxruntime":
            base[r["model"]] = r["timing"][clock]
    for r in bench["model_rows"]:
        t = r["timing"][clock]
        b = base.get(r["model"])
        rows.append([r["model"], r["variant"], r["engine"], _f(1e3 * t, ".3f"),
                     f"{b / t:.2f}x" if b and t == t and t > 0 else "-"])
    return out + [f"From `{bench.get('command', 'benchmarks/speed.py')}` ({bench.get('date', '')}, "
                  f"{bench.get('threads', '?')} thread(s), {clock} clock, medians of {bench.get('runs', '?')})", ""] + \
        _table(["model", "variant", "engine", f"{clock} ms", "vs ORT dense"], rows,
               ["---", "---", "---", "---:", "---:"]) + [""]


def _grid_cells(masks: list[LayerMap]) -> tuple[dict[tuple[str, str], np.ndarray], list[str], list[str]]:
    cells, rows, cols = {}, [], []
    for m in masks:
        row = f"L{m.layer_index}" if m.layer_index is not None else "other"
        if row not in rows:
            rows.append(row)
        if m.role not in cols:
            cols.append(m.role)
        cells[(row, m.role)] = m.mask
    return cells, rows, cols


def render(inputs: RunInputs, output: str | Path, plots: bool = True) -> Path:
    """Write the Markdown report to ``output`` and its figures beside it (``<stem>_*.png``)."""
    from blockprune.io import atomic_path
    from blockprune import report_plots

    output = Path(output)
    if output.is_dir():
        raise BlockpruneError(f"output {output} is a directory", "give a file name, e.g. report.md")
    output.parent.mkdir(parents=True, exist_ok=True)
    r = inputs.report
    stem = output.stem
    heatmap = grid = stages_png = None
    if plots and inputs.masks:
        heatmap = report_plots.band_heatmap([m.mask for m in inputs.masks], [m.label for m in inputs.masks],
                                            output.parent / f"{stem}_sparsity.png").name
        grid = report_plots.mask_grid(*_grid_cells(inputs.masks), output.parent / f"{stem}_maps.png").name
    stage_rows = [s for s in r["stages"] if isinstance(s.get("metric"), (int, float))]
    if plots and len(stage_rows) >= 2:
        stages_png = report_plots.stage_plot([s["stage"] for s in stage_rows], [s["metric"] for s in stage_rows],
                                             r["metric"], output.parent / f"{stem}_stages.png").name
    title = f"# Run report: {r['task']}, {r.get('method', '?')}, block {r.get('block', '?')}, ratio {_f(r.get('ratio'), 'g')}"
    lines = [title, "", f"Run directory: `{inputs.run_dir}`" + (
        f"; artifact: `{inputs.artifact_dir}`" if inputs.artifact_dir else ""), ""]
    lines += summary_section(r)
    lines += stages_section(r, stages_png)
    lines += layers_section(inputs, heatmap, grid)
    lines += size_section(inputs)
    lines += artifact_section(inputs.manifest)
    lines += speed_section(inputs.bench)
    with atomic_path(output, suffix=".md") as tmp:
        Path(tmp).write_text("\n".join(lines))
    return output


def report_run(run_dir: str | Path, output: str | Path | None = None, artifact: str | Path | None = None,
               bench: str | Path | None = None, plots: bool = True) -> Path:
    """Load, check and render one run; ``output`` defaults to ``RUN_DIR/report.md``."""
    inputs = load_run(run_dir, artifact, bench)
    return render(inputs, output or Path(run_dir) / "report.md", plots=plots)
