"""The README's speed table is the committed measurement, not a copy that drifts from it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_speed_section_matches_the_committed_json():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_results.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_default_flow_json_records_what_a_reader_needs():
    import json

    data = json.loads((ROOT / "benchmarks" / "results" / "default_flow.json").read_text())
    assert data["clock"].startswith("wall") and data["machine"] and data["date"] and data["command"]
    threads = {t["threads"] for t in data["timings"]}
    assert {1, 2} <= threads
    for tm in data["timings"]:
        assert "load_before" in tm and tm["rows"]
        for row in tm["rows"]:
            assert row["speedup"] == row["ort_ms"] / row["tvm_ms"]
    for b in data["builds"]:  # every row says how it was made and that compile verified it
        assert any(c.split()[1] == "compile" for c in b["commands"]) and b["verified"]


def _results(path: Path, settings, cells) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import accuracy as acc

    res = acc.ResultsFile(path, settings)
    for c in cells:
        res.add(c)
    return path


def test_variant_tables_put_a_variant_with_other_dense_runs_on_rows_of_its_own(tmp_path):
    """Cells of a variant that retrains its dense models (another learning rate) are compared with
    that variant's dense baseline, on a row of their own, in its recipe change's column; variants
    with the plain grid's dense runs share rows."""
    sys.path.insert(0, str(ROOT / "scripts"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import accuracy as acc
    import readme_results as rr

    base = acc.GridSettings(method="gradual", distill=0.5, distill_hidden=1.0, exporter="legacy")
    cell = lambda m, d, **kw: acc.Cell("CoLA", "pruned", "mcc", m, d, block="16x1", ratio=0.3,  # noqa: E731
                                       compression_rate=1.42, method="gradual", seconds=600, **kw)
    dense = lambda m, t: acc.Cell("CoLA", "dense", "mcc", m, m, method="dense", teacher_metric=t)  # noqa: E731
    plain = _results(tmp_path / "plain.json", base, [dense(0.31, 0.21), cell(0.19, 0.31)])
    teacher = _results(tmp_path / "t.json", dataclasses.replace(base, teacher="baseline"),
                       [dense(0.31, 0.21), cell(0.22, 0.31)])
    lr = _results(tmp_path / "lr.json", dataclasses.replace(base, teacher="baseline", lr=5e-5),
                  [dense(0.40, 0.35), cell(0.395, 0.40)])
    text = rr.render_augment(plain, (teacher, lr))
    rows = [r for r in text.splitlines() if r.startswith("| CoLA")]
    header, = [r for r in text.splitlines() if r.startswith("| task")]
    assert header.count("gradual + baseline as teacher") == 1  # one column per recipe change
    assert rows[0].startswith("| CoLA (mcc) | 16x1 r=0.3 | 1.42x | 31.00 | 21.00 | 19.00 (10 min), -12.00 | "
                              "22.00 (10 min), -9.00 |")
    assert rows[1].startswith("| CoLA (mcc, lr 5e-05) | 16x1 r=0.3 | 1.42x | 40.00 | 35.00 | not run | "
                              "39.50 (10 min), -0.50 |")
    assert len(rows) == 2


def test_best_per_task_reads_a_recipe_on_the_mean_of_its_seeds_against_each_runs_own_dense(tmp_path):
    """A cell within a point on one seed of the dense runs but not on their mean does not count;
    each seed's cell is compared with its own dense baseline; a higher rate within a point on
    another grid wins; the speed-up shown is the timed model of exactly that cell."""
    import json

    sys.path.insert(0, str(ROOT / "scripts"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import accuracy as acc
    import readme_results as rr

    base = acc.GridSettings(method="gradual", distill=0.5, distill_hidden=1.0, exporter="legacy")
    tb = dataclasses.replace(base, teacher="baseline", lr=5e-5)

    def cell(task, m, d, ratio, rate, run_dir="", seed=0):
        return acc.Cell(task, "pruned", "mcc", m, d, block="16x1", ratio=ratio, compression_rate=rate,
                        method="gradual", seconds=60, run_dir=run_dir, seed=seed)

    dense = lambda task, m: acc.Cell(task, "dense", "mcc", m, m, method="dense")  # noqa: E731
    gpu = _results(tmp_path / "accuracy_gradual.json", base,  # a GPU grid, by its name
                   [dense("CoLA", 0.31), cell("CoLA", 0.25, 0.31, 0.3, 1.4201),
                                                 dense("MRPC", 0.85), cell("MRPC", 0.845, 0.85, 0.3, 1.42),
                                                 cell("MRPC", 0.80, 0.85, 0.5, 1.9702)])
    plain = _results(tmp_path / "plain.json", base, [dense("MRPC", 0.84)])
    run = Path("/elsewhere/checkout/runs/aug/MRPC/r0.5")  # as the grid recorded it, in another clone
    mrpc = _results(tmp_path / "m.json", dataclasses.replace(base, teacher="baseline"),
                    [dense("MRPC", 0.84), cell("MRPC", 0.833, 0.84, 0.5, 1.9698, run_dir="/x/runs/aug/MRPC/r0.5-s1",
                                               seed=1),
                     cell("MRPC", 0.835, 0.84, 0.5, 1.9698, run_dir=str(run))])
    # CoLA at lr 5e-5: seed 0 within a point of its dense (-0.5), seed 1 not (-3.5): mean -2.0
    s0 = _results(tmp_path / "c0.json", tb, [dense("CoLA", 0.28), cell("CoLA", 0.275, 0.28, 0.3, 1.42)])
    # seed 1 from a grid at the plain rate with CoLA at its own (--task-lr): the same recipe
    s1 = _results(tmp_path / "c1.json", dataclasses.replace(base, teacher="baseline", seed=1, task_lr={"CoLA": 5e-5}),
                  [dense("CoLA", 0.33), cell("CoLA", 0.295, 0.33, 0.3, 1.42)])
    # the same MRPC run listed again in another file of the same recipe: counted once
    dup = _results(tmp_path / "dup.json", dataclasses.replace(base, teacher="baseline"),
                   [dense("MRPC", 0.84), cell("MRPC", 0.835, 0.84, 0.5, 1.9698, run_dir="/y/runs/aug/MRPC/r0.5")])
    speed = tmp_path / "speed.json"
    speed.write_text(json.dumps({
        "builds": [{"model": "m", "block": "16x1", "sparsity": None, "form": "default", "artifact": "m.art",
                    "commands": ["blockprune compress 'runs/aug/MRPC/r0.5/model.onnx' -o m.onnx --block 16x1"]}],
        "timings": [{"threads": t, "rows": [{"artifact": "m.art", "speedup": x}]} for t, x in ((1, 1.61), (2, 1.52))]}))

    cands = rr.best_candidates((gpu, mrpc, s0, s1, dup), plain_path=plain)
    cola = next(c for c in cands if c.task == "CoLA" and "lr" in c.recipe)
    assert len(cola.deltas) == 2 and abs(cola.delta + 0.02) < 1e-9 and cola.files == [str(s0), str(s1)]
    text = rr.render_best((gpu, mrpc, s0, s1, dup), speed_paths=speed, plain_path=plain)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "1.00x (dense)" in rows["CoLA"] and "-2.00, gradual + baseline as teacher (lr 5e-05)" in rows["CoLA"]
    assert "**1.97x**" in rows["MRPC"] and "gradual + baseline as teacher | CPU | 2 |" in rows["MRPC"]
    assert "-0.60" in rows["MRPC"] and "1.61x / 1.52x" in rows["MRPC"]
    avg = float(text.split("Average over the 2 tasks: ")[1].split("x")[0])
    assert abs(avg - (1.97 + 1.00) / 2) < 0.006
    assert "fewer than the 3 pruning seeds this grid asks of a counted cell: MRPC (2);" in text  # CoLA counts dense


def test_a_cell_timed_from_its_masks_alone_is_matched_by_its_masks_run_dir(tmp_path):
    """A GPU grid's cell whose masks alone came back is timed as the bundled model under those masks
    (``default_flow.py --trained L=.../masks.safetensors@16x1``): its speed belongs to the run dir
    of ``--masks``, not to the exported base model the ``compress`` command reads."""
    import json

    sys.path.insert(0, str(ROOT / "scripts"))
    import readme_results as rr

    speed = tmp_path / "speed.json"
    builds = [{"model": "sst2", "block": "16x1", "sparsity": None, "form": "default", "artifact": "s.art",
               "commands": ["blockprune export minilm --head classification --exporter legacy -o minilm-c.onnx",
                            "blockprune compress minilm-c.onnx -o s.onnx --block 16x1 --masks "
                            "/ckpt/runs/accuracy-gradual/SST-2/gradual-16x1/r0.5/masks.safetensors",
                            "blockprune compile s.onnx -o s.art"]},
              {"model": "mrpc", "block": "16x1", "sparsity": None, "form": "default", "artifact": "m.art",
               "commands": ["blockprune compress runs/aug/MRPC/r0.5/model.onnx -o m.onnx --block 16x1",
                            "blockprune compile m.onnx -o m.art"]}]
    speed.write_text(json.dumps({"builds": builds, "timings": [
        {"threads": t, "rows": [{"artifact": "s.art", "speedup": x}, {"artifact": "m.art", "speedup": y}]}
        for t, x, y in ((1, 1.9, 1.8), (2, 2.2, 2.1))]}))
    timed = rr._timed(speed)
    assert timed == {rr._run_key("/x/runs/accuracy-gradual/SST-2/gradual-16x1/r0.5"): {1: 1.9, 2: 2.2},
                     rr._run_key("runs/aug/MRPC/r0.5"): {1: 1.8, 2: 2.1}}
    # the same MRPC run also timed from its masks alone (the check that the two agree): its own model
    # wins whether its row comes after the masks-only row or before it; a one-shot row is no cell's
    data = json.loads(speed.read_text())
    data["builds"] += [{**builds[0], "artifact": "mm.art", "commands": [
        c.replace("/ckpt/runs/accuracy-gradual/SST-2/gradual-16x1/r0.5", "runs/aug/MRPC/r0.5") for c in builds[0]["commands"]]},
        {"model": "minilm", "block": None, "sparsity": None, "form": "default", "artifact": "d.art",
         "commands": ["blockprune export minilm -o minilm.onnx", "blockprune compile minilm.onnx -o d.art"]}]
    for first in (True, False):
        for t in data["timings"]:
            t["rows"] = [r for r in t["rows"] if r["artifact"] != "mm.art"]
            t["rows"].insert(0 if first else len(t["rows"]), {"artifact": "mm.art", "speedup": 1.7})
            t["rows"].append({"artifact": "d.art", "speedup": 0.9})
        speed.write_text(json.dumps(data))
        assert rr._timed(speed) == timed



def test_a_cell_rebuilt_at_its_ratios_is_timed_as_such_and_gives_way_to_its_masks_or_model(tmp_path):
    """A cell whose masks were lost is timed on the bundled model pruned one-shot at its per-layer
    ratios (``compress --config RUN/allocation.yaml``): that speed belongs to the YAML's run dir, is
    shown marked as a rebuild, never replaces a timing of its masks or own model (in any file, in
    any order), and a later file's timing of the same kind replaces an earlier one."""
    import json

    sys.path.insert(0, str(ROOT / "scripts"))
    import readme_results as rr

    def speed_file(path, how, run, x):
        flag = {"ratios": f"--config {run}/allocation.yaml", "masks": f"--masks {run}/masks.safetensors"}
        cmd = (f"blockprune compress minilm-c.onnx -o s.onnx --block 16x1 {flag[how]}" if how in flag
               else f"blockprune compress {run}/model.onnx -o s.onnx --block 16x1")
        path.write_text(json.dumps({"builds": [{"model": "s", "block": "16x1", "sparsity": None, "form": "default",
                                                "artifact": "s.art", "commands": [cmd, "blockprune compile s.onnx -o s.art"]}],
                                    "timings": [{"threads": t, "rows": [{"artifact": "s.art", "speedup": round(x + t / 10, 2)}]}
                                                for t in (1, 2)]}))
        return path

    run = "/co/runs/aug/STS-B/g/r0.6"
    key = rr._run_key(run)
    ratios = speed_file(tmp_path / "a.json", "ratios", run, 2.0)
    assert rr._timed_how(ratios) == {key: ("ratios", {1: 2.1, 2: 2.2})}
    assert rr._timed(ratios) == {}  # not the cell's own masks
    masks = speed_file(tmp_path / "b.json", "masks", run, 1.8)
    own = speed_file(tmp_path / "c.json", "own", run, 1.7)
    for order in ((ratios, masks), (masks, ratios)):
        assert rr._timed_how(order) == {key: ("masks", {1: 1.9, 2: 2.0})}
    assert rr._timed_how((own, ratios, masks)) == {key: ("own", {1: 1.8, 2: 1.9})}
    again = speed_file(tmp_path / "d.json", "ratios", run, 2.5)
    assert rr._timed_how((ratios, again)) == {key: ("ratios", {1: 2.6, 2: 2.7})}


def test_the_per_task_count_reads_every_committed_gradual_grid_and_nothing_else():
    """A new results file of the gradual recipe joins the count without an edit; the ablation
    files (no dense rows), the first (rgl) grid and the embedding grids stay out."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import readme_results as rr

    names = [p.name for p in rr.best_sources()]
    assert names[0] == "accuracy_gradual.json"  # the GPU grid first
    assert {"accuracy_transfer.json", "accuracy_teacher_augment.json", "accuracy_teacher_lr5e-5_seed2.json"} <= set(names)
    assert not {"accuracy.json", "accuracy_ablation.json", "accuracy_ablation_cpu.json",
                "accuracy_embedding.json"} & set(names)


def test_a_figure_that_two_decimals_would_print_as_its_line_gets_a_third():
    """-0.996 is inside the point and -1.004 outside, and both print -1.00; an average of 2.004 and
    one of 1.996 both print 2.00: at the line the table shows the third decimal that decides."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import readme_results as rr

    assert [rr._edge(v, -1.0, "+") for v in (-0.996, -1.004, -1.0, -0.98, -1.2)] == \
        ["-0.996", "-1.004", "-1.00", "-0.98", "-1.20"]
    assert [rr._edge(v, rr.GOAL) for v in (2.004, 1.996, 2.0, 1.92)] == ["2.004", "1.996", "2.00", "1.92"]
