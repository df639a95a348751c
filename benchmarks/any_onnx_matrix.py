"""Issue #13 matrix: every export route x (prune, compress, compile x86-64, compile aarch64 + qemu run).

For each tiny model (random weights, ``blockprune.models`` named configs) and each export route of
``blockprune.models.foreign.ROUTES``, runs the toolchain through the Python API:

* prune: one-shot 1x32 at 50%, verified against the numpy masked-dense reference (max-abs);
* compress: reorder -> compact -> policy -> BSR rewrite, each stage verified (worst max-abs);
* compile x86-64 / aarch64: compile the compressed model at batch 1, seq 16; ``compile``
  verifies the artifact against onnxruntime on that model (aarch64 under qemu) and the max-abs
  it measured is reported.

A cell is ``ok`` with its max-abs difference, or ``FAIL`` with the first line of the
``BlockpruneError`` (any other exception is a bug and is reported as such). Optionally
(``--bert-base``) the BERT-base-shaped row of the issue: plain ``torch.onnx.export`` of
``bert-base`` random weights, pruned to 80% in 1x32 blocks by numpy outside blockprune, then
``compress`` must rewrite the pruned layers. No timing is measured here.

    .venv/bin/python benchmarks/any_onnx_matrix.py [--models bert-tiny,...] [--no-aarch64] [--bert-base]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from blockprune.errors import BlockpruneError  # noqa: E402
from blockprune.io import atomic_path  # noqa: E402

BREAK_EVEN = 0.6  # a fixed policy threshold, so the BSR counts do not depend on the shipped timing table
GPU_COLUMN = "GPU PoCL end to end (mali)"
COLUMNS = ("prune", "compress", "compile x86-64", "compile aarch64 + qemu", GPU_COLUMN)


def _cell(fn):
    t = time.perf_counter()
    try:
        diff, note = fn()
        return {"ok": True, "max_abs_diff": diff, "note": note, "seconds": round(time.perf_counter() - t, 1)}
    except BlockpruneError as err:
        return {"ok": False, "error": err.problem.splitlines()[0][:160], "seconds": round(time.perf_counter() - t, 1)}
    except Exception as err:  # noqa: BLE001 - a bug: reported as such in the table
        return {"ok": False, "error": f"BUG {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}",
                "trace": traceback.format_exc()[-2000:], "seconds": round(time.perf_counter() - t, 1)}


def run_route(spec: str, route: str, work: Path, aarch64: bool) -> dict:
    import blockprune as bp
    from blockprune.models.foreign import export_route
    from blockprune.models.zoo import load_model

    loaded = load_model(spec)
    src = work / f"{spec}-{route}.onnx"
    row: dict = {"model": spec, "route": route}
    try:
        export_route(loaded, route, src)
    except Exception as err:  # noqa: BLE001 - the route itself is unavailable here
        row["export_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return row
    pruned, small = work / f"{spec}-{route}.pruned.onnx", work / f"{spec}-{route}.small.onnx"

    def do_prune():
        res = bp.prune(src, pruned, block="1x32", sparsity=0.5)
        return res.verify.max_abs_diff, f"{len(res.masks.masks)} layers pruned"

    def do_compress():
        res = bp.compress(pruned, small, break_even=BREAK_EVEN)
        diffs = [s.max_abs_diff for s in res.stages if s.max_abs_diff is not None]
        bsr = next((s.report.changed for s in res.stages if s.report and s.report.name == "block-sparse"), 0)
        return max(diffs, default=0.0), f"{bsr} layers BSR"

    row["prune"] = _cell(do_prune)
    return _compile_cells(row, small, work / f"{spec}-{route}", aarch64, seq=16,
                          prerequisite="prune" if not row["prune"]["ok"] else None, compress=do_compress)


def gpu_cell(model: Path, out: Path, seq: int):
    """Compile for the Mali preset, check every generated OpenCL kernel on PoCL against its CPU build,
    then run the whole build on PoCL call by call in the VM's order and compare its outputs with
    onnxruntime on realistic token ids with padding (:mod:`gpu_model_run`). The figure is that
    end-to-end max-abs difference; the note gives it relative to the output scale."""
    def inner():
        from blockprune.backends.tvm.pipeline.gpu_compile import compile_gpu_model
        from blockprune.backends.tvm.verify.gpu_verify import verify_artifact_kernels

        compile_gpu_model(model, out, target="mali", batch=1, seq=seq)
        report = verify_artifact_kernels(out, target="mali", end_to_end=True)
        run = report.model_run
        bsr = sum(1 for r in report.rows if r.kind == "bsr")
        kernels_bad = ", ".join(r.kernel for r in report.failed) or (f"missing {report.missing}" if report.missing else "")
        if not run.ok:
            first = run.first_departure()
            where = f"; first departing call {first.func}" if first else ""
            raise BlockpruneError(f"end to end {run.max_abs_diff:.2e} (rel {run.max_rel_diff:.1e}) > tolerance{where}"
                                  + (f"; kernels off: {kernels_bad}" if kernels_bad else ""))
        if kernels_bad:
            raise BlockpruneError(f"PoCL kernel check failed: {kernels_bad}")
        tol = min(o.tolerance for o in run.outputs)
        return run.max_abs_diff, (f"rel {run.max_rel_diff:.1e}, tol {tol:.1e}; {len(run.calls)} calls, "
                                  f"{len(report.rows)} kernels ({bsr} BSR) checked")
    return inner


def _compile_cells(row: dict, small: Path, stem: Path, aarch64: bool, seq: int, prerequisite: str | None,
                   compress) -> dict:
    """compress, then compile for x86-64 (verified against onnxruntime), aarch64 (under qemu) and
    the Mali GPU preset (kernels on PoCL); later cells are skipped when compress failed."""
    import blockprune as bp

    def do_compile(target: str):
        def inner():
            art = bp.compile(small, Path(f"{stem}-{target}"), target=target, batch=1, seq=seq)
            v = art.verified or {}
            return max(v.get("max_abs_diff", {}).values(), default=float("nan")), v.get("how", "")
        return inner

    row["compress"] = _cell(compress) if prerequisite is None else {"ok": False, "error": f"skipped ({prerequisite} failed)"}
    ok = row["compress"]["ok"]
    row["compile x86-64"] = _cell(do_compile("x86-64")) if ok else {"ok": False, "error": "skipped"}
    if aarch64:
        row["compile aarch64 + qemu"] = _cell(do_compile("aarch64")) if ok else {"ok": False, "error": "skipped"}
    row[GPU_COLUMN] = _cell(gpu_cell(small, Path(f"{stem}-mali"), seq)) if ok else {"ok": False, "error": "skipped"}
    return row


def bert_base_row(work: Path, aarch64: bool = True) -> dict:
    """Plain export of bert-base (random weights) pruned to 80% 1x32 in numpy; compress must rewrite it."""
    import onnx
    from onnx import numpy_helper

    import blockprune as bp
    from blockprune.models.foreign import plain_torch_export
    from blockprune.models.zoo import load_model
    from blockprune.passes.find_weights import find_weights

    src = plain_torch_export(load_model("bert-base"), work / "bert-base-plain.onnx", exporter="legacy")
    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    pruned_layers = 0
    for w in find_weights(model):  # numpy, as a user's own script would: 80% of 1x32 row segments
        if w.role not in ("q", "k", "v", "attn_out", "ffn_in", "ffn_out"):
            continue
        arr = numpy_helper.to_array(inits[w.initializer])
        oi = w.to_out_in(arr)
        seg = np.abs(oi).reshape(oi.shape[0], -1, 32).sum(-1)
        keep = seg > np.quantile(seg, 0.8)
        oi = oi * np.repeat(keep, 32, axis=1)
        inits[w.initializer].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.from_out_in(oi)), w.initializer))
        pruned_layers += 1
    src80 = work / "bert-base-plain-p80.onnx"
    onnx.save(model, str(src80))
    row = {"model": "bert-base (plain legacy export, 80% 1x32 by numpy)", "route": "torch-legacy",
           "pruned_layers": pruned_layers}

    def do_compress():
        res = bp.compress(src80, work / "bert-base-small.onnx", break_even=BREAK_EVEN)
        bsr = next((s.report.changed for s in res.stages if s.report and s.report.name == "block-sparse"), 0)
        det = next((s.report.changed for s in res.stages if s.report and s.report.name == "detect-blocks"), 0)
        if bsr == 0:
            raise BlockpruneError("0 layers rewritten to BSR")
        diffs = [s.max_abs_diff for s in res.stages if s.max_abs_diff is not None]
        return max(diffs, default=0.0), f"1x32 detected on {det} layers, {bsr}/{pruned_layers} layers BSR"

    return _compile_cells(row, work / "bert-base-small.onnx", work / "bert-base", aarch64, seq=128,
                          prerequisite=None, compress=do_compress)


def _fmt(cell: dict | None) -> str:
    if cell is None:
        return "not run"
    if cell.get("ok"):
        d = cell.get("max_abs_diff")
        note = f" ({cell['note']})" if cell.get("note") else ""
        return f"ok, {d:.1e}{note}" if d is not None and np.isfinite(d) else f"ok{note}"
    return f"FAIL: {cell.get('error', '')}"


def to_markdown(rows: list[dict], started: str) -> str:
    lines = ["# Any ONNX in: export route x toolchain stage (issue #13)", "",
             f"Generated by `benchmarks/any_onnx_matrix.py` on {started}. Tiny random models (`bert-tiny`, "
             "`roberta-tiny`, `distilbert-tiny`: hidden 64, 2 layers, 4 heads), encoder head; prune = one-shot "
             "1x32 at 50% (max-abs vs the numpy masked reference), compress = worst stage max-abs vs the pruned "
             "model (policy break-even 0.6), compile = the artifact's own verification against onnxruntime on the compressed model "
             "(batch 1, seq 16; aarch64 under qemu); GPU = compile for the Mali preset, every generated OpenCL kernel "
             "checked on PoCL against its CPU build, then the whole build run on PoCL call by call in the VM's order "
             "(memory plan included; `gpu_model_run`) and its output compared with onnxruntime on the same ONNX, on "
             "vocabulary-wide token ids with a padded attention mask; its figure is that end-to-end max-abs "
             "difference, `rel` the same over max|output|, tolerance 1e-5 + 1e-4 x max|output| per output. "
             "Tolerance 1e-4 elsewhere. No timings. "
             "The BERT-base row compiles at seq 128.", "",
             "ORT-optimized graphs have 6 prunable MatMuls: q/k/v live in the fused `Attention` node's packed "
             "weight (lowered to standard ops for TVM). A layer that stays dense after compress (11 of 12) is an "
             "FFN whose compaction raised its density above the 0.6 break-even.", "",
             "| model | route | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        if "export_error" in r:
            lines.append(f"| {r['model']} | {r['route']} | export unavailable: {r['export_error']} |" + " |" * (len(COLUMNS) - 1))
            continue
        cells = [_fmt(r.get(c)) for c in COLUMNS]
        if "pruned_layers" in r:  # the BERT-base row: pruned by numpy outside blockprune
            cells[0] = f"numpy, outside blockprune ({r['pruned_layers']} layers)"
        lines.append(f"| {r['model']} | {r['route']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def merge_rows(path: Path, new: list[dict], started: str) -> tuple[list[dict], str]:
    """The rows of ``path`` with those of the same (model, route) replaced by ``new``, in the old
    order (new ones appended), and a date line saying which rows are from when (earlier
    regenerations stay listed: their rows are still from then).

    Why: one model's rows can be rerun after a fix without rerunning (and re-timing) the rest.
    """
    old = json.loads(path.read_text()) if path.is_file() else {"rows": [], "generated": started}
    fresh = {(r["model"], r["route"]): r for r in new}
    rows = [fresh.pop((r["model"], r["route"]), r) for r in old["rows"]] + list(fresh.values())
    models = {r["model"] for r in new}
    routes = {r["route"] for r in new}
    what = (f"{', '.join(sorted(models))} rows" if len(routes) > 1 else
            f"{next(iter(routes))} rows of {', '.join(sorted(models))}")
    return rows, f"{old.get('generated', started)}; {what} regenerated on {started}"


def main(argv: list[str] | None = None) -> int:
    from blockprune.models.foreign import ROUTES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="bert-tiny,roberta-tiny,distilbert-tiny")
    p.add_argument("--routes", default=",".join(ROUTES))
    p.add_argument("--no-aarch64", action="store_true")
    p.add_argument("--bert-base", action="store_true", help="also the BERT-base-shaped row (slow: ~1 min)")
    p.add_argument("--only-bert-base", action="store_true", help="just the BERT-base row (merged into --out)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "any_onnx"))
    p.add_argument("--merge", action="store_true",
                   help="replace only the rows run now (same model and route) in --out; keep the others")
    args = p.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = Path(args.out)
    if args.only_bert_base:
        with tempfile.TemporaryDirectory(prefix="any-onnx-") as tmp:
            row = bert_base_row(Path(tmp), aarch64=not args.no_aarch64)
        print(row, flush=True)
        old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {"rows": []}
        rows = [r for r in old["rows"] if not str(r.get("model", "")).startswith("bert-base")] + [row]
        started = old.get("generated", started)
        args.bert_base = False
    else:
        rows = []
    with tempfile.TemporaryDirectory(prefix="any-onnx-") as tmp:
        for spec in (args.models.split(",") if not args.only_bert_base else []):
            for route in args.routes.split(","):
                row = run_route(spec, route, Path(tmp), aarch64=not args.no_aarch64)
                rows.append(row)
                print(to_markdown([row], started).splitlines()[-1], flush=True)
        if args.bert_base:
            row = bert_base_row(Path(tmp), aarch64=not args.no_aarch64)
            rows.append(row)
            print(row, flush=True)
    if args.merge and not args.only_bert_base:
        rows, started = merge_rows(out.with_suffix(".json"), rows, started)
    with atomic_path(out.with_suffix(".json"), suffix=".json") as t:
        Path(t).write_text(json.dumps({"generated": started, "rows": rows}, indent=2, default=str) + "\n")
    with atomic_path(out.with_suffix(".md"), suffix=".md") as t:
        Path(t).write_text(to_markdown(rows, started))
    print(f"wrote {out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
