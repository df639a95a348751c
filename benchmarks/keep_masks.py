"""Keep the pruned cells' masks of an accuracy results JSON in the repository, one ``.tar.xz`` per
results file (``benchmarks/results/masks/<results stem>.tar.xz``), each member under the run dir the
JSON records (``runs/...``).

Why: a cell's speed depends only on which blocks it keeps, but its run dir (a 90 MB model and
checkpoints) lives in one checkout and dies with it; then only a one-shot rebuild at the cell's
per-layer ratios can be timed (``allocation_config.py``), and the cells of a table end up timed on
different hosts. The masks compress to ~80 kB a cell. The archive is merged, not rewritten: a
cell whose run dir is gone keeps the member an earlier run put there, so it can be committed as
cells finish. To time a kept cell on any host::

    tar xJf benchmarks/results/masks/accuracy_teacher_augment_lrpruned.tar.xz   # in the checkout root
    python benchmarks/default_flow.py --trained LABEL=runs/.../masks.safetensors@16x1 ...

Usage: ``python benchmarks/keep_masks.py --results benchmarks/results/accuracy_teacher_augment_lrpruned.json``
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MASKS = "masks.safetensors"


def cell_masks(results: list[Path], root: Path | None = ROOT) -> dict[str, Path]:
    """Every pruned cell's masks named by ``results`` (non-JSON paths skipped), keyed by the member
    name it gets: its recorded run dir from the ``runs`` component on (the checkout that ran the
    grid left out), so that unpacked in this checkout it lands where the JSON points. A run dir
    recorded in another checkout is looked for under ``root`` (None: only where recorded). Dense
    rows and runs that left no masks (killed at a deadline) are not in it."""
    from accuracy import run_key

    found: dict[str, Path] = {}
    for path in results:
        if path.suffix != ".json" or not path.is_file():
            continue
        for cell in json.loads(path.read_text()).get("cells", {}).values():
            run = Path(cell.get("run_dir") or "")
            key = run_key(run)
            if cell.get("kind") != "pruned" or key is None:
                continue
            for here in (run, *([root / key] if root is not None else [])):
                if (here / MASKS).is_file():
                    found[f"{key}/{MASKS}"] = here / MASKS
                    break
    return found


def write_archive(found: dict[str, Path], out: Path, merge: bool = True) -> dict[str, str]:
    """Write ``found`` into the ``.tar.xz`` at ``out`` (through a temp file and a rename: on any
    failure the old archive stays as it was) and say what happened to each member: ``new``,
    ``updated`` (its bytes changed), ``same``, or ``kept`` (in the old archive, its run dir gone
    here; only with ``merge``). Old members are copied across one at a time, not held in memory."""
    from blockprune.io import atomic_path

    status: dict[str, str] = {}
    old: tarfile.TarFile | None = None
    try:
        if merge and out.is_file():
            old = tarfile.open(out, "r:xz")
        with atomic_path(out) as tmp, tarfile.open(tmp, "w:xz") as tf:
            digests = {}
            for name in sorted(found):
                data = found[name].read_bytes()
                _add(tf, name, data)
                digests[name], status[name] = hashlib.sha256(data).digest(), "new"
            for member in old or ():
                if not member.isfile():
                    continue
                data = old.extractfile(member).read()
                if member.name in found:
                    status[member.name] = "same" if hashlib.sha256(data).digest() == digests[member.name] else "updated"
                else:
                    _add(tf, member.name, data)
                    status[member.name] = "kept"
    except (tarfile.TarError, lzma.LZMAError, EOFError) as exc:
        raise SystemExit(f"{out} is not a readable .tar.xz ({exc}); move it aside, or rerun with --replace "
                         "to rebuild it from the masks found here") from None
    finally:
        if old is not None:
            old.close()
    return dict(sorted(status.items()))


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    """A member with fixed metadata (mtime 0), so that rerunning over unchanged masks writes the same
    bytes and the committed archive shows no change."""
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tf.addfile(info, io.BytesIO(data))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, action="append", required=True,
                    help="accuracy results JSON (repeat for several; one archive each unless --out)")
    ap.add_argument("--out", type=Path, default=None,
                    help="archive (default benchmarks/results/masks/<results stem>.tar.xz)")
    ap.add_argument("--replace", action="store_true", help="drop members whose run dir is gone here")
    args = ap.parse_args(argv)
    for r in args.results:
        if not r.is_file():
            raise SystemExit(f"no results file {r}; give the JSON an accuracy grid wrote")
    groups: dict[Path, list[Path]] = {}
    for r in args.results:
        out = args.out or ROOT / "benchmarks" / "results" / "masks" / f"{r.stem}.tar.xz"
        if not args.out and out in groups:
            raise SystemExit(f"{groups[out][0]} and {r} would share the archive {out}; give each run its own --out")
        groups.setdefault(out, []).append(r)
    for out, results in groups.items():
        keep(results, out, replace=args.replace)
    return 0


def keep(results: list[Path], out: Path, replace: bool = False, log=print) -> dict[str, str] | None:
    """Pack the masks of the cells in ``results`` into ``out`` (merged unless ``replace``) and list
    what happened to each member; None (and ``out`` untouched) when there is nothing to write."""
    found = cell_masks(results)
    if not found and (replace or not out.is_file()):
        log(f"{', '.join(map(str, results))}: no pruned cell's masks found here; {out} left as it was")
        return None
    status = write_archive(found, out, merge=not replace)
    width = max(map(len, status), default=0)
    log(f"{out} ({out.stat().st_size / 1024:.0f} kB, {len(status)} cells):")
    for name, what in status.items():
        log(f"  {name:{width}s}  {what}")
    return status


if __name__ == "__main__":
    sys.exit(main())
