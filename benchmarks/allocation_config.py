"""Write a trained cell's per-layer ratios (its ``allocation``, kept in the results JSON) as a
pruning config that ``blockprune prune``/``compress --config`` accept.

Why: a cell's speed depends on how many blocks each layer keeps and where; when its masks were not
kept (a runs dir lost with a checkout, a lent machine gone), the bundled model pruned one-shot at
the same per-layer ratios is the nearest rebuild the committed JSON allows. The config goes into
the cell's run dir (``RUN_DIR/allocation.yaml``, under this checkout) so that
``benchmarks/default_flow.py --trained LABEL=RUN_DIR/allocation.yaml@BLOCK`` times it and
``scripts/readme_results.py`` shows that speed beside the cell, marked as a rebuild at its ratios::

    python benchmarks/allocation_config.py --results benchmarks/results/accuracy_teacher_augment_lrpruned.json \\
        --cell STS-B/gradual/16x1/0.6
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def run_dir_here(recorded: str, root: Path = ROOT) -> Path:
    """The recorded run dir (absolute, in whichever checkout ran the grid) under ``root``: the part
    from its ``runs`` component on."""
    from accuracy import run_key

    key = run_key(recorded)
    if key is None:
        raise SystemExit(f"run dir {recorded!r} has no 'runs' component; give -o")
    return root / key


def per_layer_config(ratios: dict[str, float], block: str) -> str:
    """YAML that prunes each named layer at its own ratio and leaves every other layer dense; each
    rule is the plan's exact per-layer pattern (:func:`blockprune.plan.plan_file.layer_pattern`),
    so it also fits the bare encoder's export."""
    import yaml

    from blockprune.blocks import BlockShape, check_sparsity
    from blockprune.plan.plan_file import layer_pattern

    doc = {"block": str(BlockShape.parse(block)), "sparsity": 0.0,
           "layers": [{"match": layer_pattern(name), "sparsity": round(check_sparsity(r), 6)}
                      for name, r in ratios.items()]}
    return yaml.safe_dump(doc, sort_keys=False, width=200)


def write_allocation_config(results: Path, key: str, out: Path | None = None) -> Path:
    """Write the cell's allocation (see module doc); returns the path written."""
    from blockprune.io import atomic_path

    cells = json.loads(results.read_text()).get("cells", {})
    if key not in cells:
        near = sorted(k for k in cells if k.split("/")[0] == key.split("/")[0])
        raise SystemExit(f"{results}: no cell {key!r}; its cells for that task: {', '.join(near) or 'none'}")
    cell = cells[key]
    if not cell.get("allocation") or not cell.get("block"):
        raise SystemExit(f"{results}: cell {key!r} records no per-layer allocation (a uniform or dense run)")
    out = out or run_dir_here(cell["run_dir"]) / "allocation.yaml"
    text = (f"# per-layer ratios of {key} in {results.name} (CR {cell.get('compression_rate', 0):.2f}x)\n"
            "# written by benchmarks/allocation_config.py: one-shot pruning at these ratios rebuilds the cell's "
            "sparsity, not its trained masks\n" + per_layer_config(cell["allocation"], cell["block"]))
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, required=True, help="a gradual grid's results JSON")
    ap.add_argument("--cell", required=True, help="the cell's key, e.g. STS-B/gradual/16x1/0.6 (a seed N run: .../sN)")
    ap.add_argument("-o", "--out", type=Path, default=None, help="default: RUN_DIR/allocation.yaml in this checkout")
    args = ap.parse_args(argv)
    print(write_allocation_config(args.results, args.cell, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
