"""Readable terminal output: per-layer tables and summaries (rich)."""

from __future__ import annotations

import sys
from typing import Iterable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from blockprune.passes.layer_stats import ModelStats

# Logs and CI are not terminals: give tables room there instead of rich's 80-column default.
_WIDTH = None if sys.stdout.isatty() else 132
console = Console(highlight=False, width=_WIDTH)
err_console = Console(stderr=True, highlight=False, width=_WIDTH)


def short_name(name: str) -> str:
    """Layer names without the noise: ``encoder.layer.3.attention.self.query.weight`` -> ``layer.3.attention.self.query``."""
    for prefix in ("bert.", "roberta.", "distilbert."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    name = name.replace("encoder.layer.", "layer.").replace("transformer.layer.", "layer.")
    return name[: -len(".weight")] if name.endswith(".weight") else name


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def layer_table(stats: ModelStats, title: str = "prunable layers") -> Table:
    """Per-layer table; the form/reason columns appear once a policy has decided forms."""
    with_forms = any(r.form for r in stats.layers)
    t = Table(title=title, title_justify="left")
    cols = [("layer", {}), ("shape (out x in)", {"justify": "right"}), ("block", {}),
            ("density", {"justify": "right"}), ("nonzero blocks", {"justify": "right"}),
            ("bytes", {"justify": "right"}), ("nonzero bytes", {"justify": "right"})]
    if with_forms:
        cols += [("form", {}), ("reason", {"overflow": "fold"})]
    for col, kw in cols:
        t.add_column(col, **kw)
    for r in stats.layers:
        blocks = f"{r.nonzero_blocks}/{r.total_blocks}" if r.total_blocks else "-"
        row = [short_name(r.name), f"{r.shape[0]} x {r.shape[1]}", r.block or "-", f"{r.density:.3f}", blocks,
               human_bytes(r.bytes), human_bytes(r.nonzero_bytes)]
        if with_forms:
            row += [r.form or "dense", r.reason or ""]
        t.add_row(*row)
    t.add_section()
    total = [f"total ({len(stats.layers)} layers)", "", "", f"{stats.density:.3f}", "",
             human_bytes(sum(r.bytes for r in stats.layers)),
             human_bytes(sum(r.nonzero_bytes for r in stats.layers))]
    t.add_row(*(total + (["", ""] if with_forms else [])))
    return t


def kv_table(title: str, rows: Iterable[tuple[str, str]]) -> Table:
    t = Table(title=title, title_justify="left", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    for k, v in rows:
        t.add_row(k, v)
    return t


def print_error(problem: str, fix: str | None) -> None:
    err_console.print(f"[bold red]error:[/] {escape(problem)}", markup=True, soft_wrap=True)
    if fix:
        err_console.print(f"  [bold]fix:[/] {escape(fix)}", markup=True, soft_wrap=True)
    sys.stderr.flush()
