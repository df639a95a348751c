"""Regenerate the README's speed section from the committed benchmark JSON.

Why a script: README figures must be the measured ones. The section between
``<!-- results:default_flow -->`` and ``<!-- /results:default_flow -->`` is rendered from
``benchmarks/results/default_flow.json`` (date, machine, load, commands, table, profile);
``--check`` exits 1 when the README differs from what the JSON gives (a test runs it).

Usage: python scripts/readme_results.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
JSON = ROOT / "benchmarks" / "results" / "default_flow.json"
START, END = "<!-- results:default_flow -->", "<!-- /results:default_flow -->"


def render(result: dict) -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from default_flow import profile_table, table

    loads = ", ".join(f"{t['threads']} thread(s): {t['load_before']:.2f}" for t in result["timings"])
    row = next((b for b in result["builds"] if b["block"] == "16x1" and b["sparsity"] == 0.8
                and b["form"] == "default"), result["builds"][0])
    example = [" ".join(["blockprune"] + c.split()[1:]) for c in row["commands"]]
    warn = ("\n\n**These timings were taken with the load average above "
            f"{result['max_load']}: treat them as indicative.**") if result.get("loaded") else ""
    return "\n".join([
        START,
        f"Measured {result['date']} on {result['machine']}; TVM {result['versions']['tvm']}, onnxruntime "
        f"{result['versions']['onnxruntime']}; {result['clock']}; batch 1 x seq 128; load average before "
        f"timing: {loads}.{warn}",
        "",
        f"`{result['command']}` builds every row with the CLI's default flags, e.g. "
        + ", then ".join(f"`{c}`" for c in example[:3]) + ", and times onnxruntime on the dense export and the"
        " artifact side by side in one process. \"best forced form\" compiles the same row with"
        " `compress --form bsr` and `--form compact`: the default should be within 5% of the best.",
        "",
        table(result),
        "",
        "Where the time goes in the default artifacts (1 thread, share of kernel time):",
        "",
        profile_table(result),
        END,
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the README is out of date")
    args = ap.parse_args(argv)
    text = README.read_text()
    if START not in text or END not in text:
        print(f"README has no {START} ... {END} block", file=sys.stderr)
        return 1
    block = render(json.loads(JSON.read_text()))
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = head + block + tail
    if args.check:
        if new != text:
            print("README speed section differs from benchmarks/results/default_flow.json; "
                  "run python scripts/readme_results.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
