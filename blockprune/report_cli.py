"""`blockprune report RUN_DIR`: one training run (plus artifact and bench) as Markdown with plots.

Kept out of ``cli.py`` like ``train_cli``: ``cli.py`` wires it in with ``add_report_parser(sub)``.
Input checking lives in ``blockprune.report`` so the API and the CLI refuse bad runs alike.
"""

from __future__ import annotations

import argparse
from typing import Any

EXAMPLE = "blockprune report runs/rte-50 -o rte-50.md --artifact art/ --bench bench.json"


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    r = subparsers.add_parser(
        "report", help="render a training run (report.json, masks, artifact, bench) as Markdown with plots",
        description=__doc__.split("\n\n")[0] + f"\n\nexample: {EXAMPLE}",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    r.add_argument("run_dir", metavar="RUN_DIR", help="the --out directory of a finished `blockprune train` run")
    r.add_argument("-o", "--output", default=None, help="Markdown file (default RUN_DIR/report.md); plots go beside it")
    r.add_argument("--artifact", default=None, metavar="DIR", help="compiled artifact dir (manifest.json)")
    r.add_argument("--bench", default=None, metavar="JSON",
                   help="`blockprune bench --json` output or benchmarks/speed.py's speed.json")
    r.add_argument("--no-plots", action="store_true", help="Markdown only")
    r.set_defaults(func=cmd_report)
    return r


def cmd_report(args: argparse.Namespace) -> int:
    """Render; ``BlockpruneError`` for bad input propagates to the CLI (exit code 2)."""
    from blockprune.console import console
    from blockprune.report import report_run

    path = report_run(args.run_dir, args.output, artifact=args.artifact, bench=args.bench, plots=not args.no_plots)
    console.print(f"wrote {path}")
    return 0
