"""Pack what a lent GPU machine needs to run the accuracy grid, into ``.devpack/`` (git-ignored).

Why: the `device` machine reaches no model hub and gets only the working tree plus at most 64 MiB
of ignored paths. The bundled MiniLM (87 MiB in fp32) does not fit as is, so the pack holds the
encoder exactly (fp32) and only the word-embedding rows that the grid's texts use, in fp16 (the
grid freezes the word embeddings; cosine of the rebuilt rows to the originals >= 0.9999998),
plus the GLUE tasks' train/dev files and the embedding grid's sentences, xz-compressed. The GLUE
data stays out of git: ``.devpack/`` is ignored and travels only as a `run` carry.

Usage (here):  python scripts/devpack/make_pack.py            # -> .devpack/ (~62 MiB)
On the device: run `LIMIT=570 WORKERS=15 bash scripts/devpack/run.sh` with carry [".devpack", ".whl"]
(.whl: wheels the device lacks, e.g. `pip download onnx-graphsurgeon --no-deps -d .whl`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import lzma
import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("SST-2", "MRPC", "RTE", "CoLA", "STS-B")
WORD = "embeddings.word_embeddings.weight"


def _texts(path: Path) -> list[str]:
    """Every field of a GLUE TSV (headerless CoLA included): what may reach the tokenizer."""
    out: list[str] = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            out.extend(x for x in row if x)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--glue", type=Path, default=ROOT.parent / "shared" / "data" / "glue")
    ap.add_argument("--out", type=Path, default=ROOT / ".devpack")
    ap.add_argument("--sentences", type=Path, default=ROOT / "runs" / "embedding" / "sentences.txt")
    args = ap.parse_args(argv)

    import numpy as np
    from safetensors.numpy import load_file, save_file
    from transformers import AutoTokenizer

    from blockprune.models.zoo import bundled_model_dir

    src = Path(bundled_model_dir())
    if not args.sentences.is_file():
        from blockprune.frontends.embedding import extract_glue_sentences

        extract_glue_sentences(args.glue, args.sentences)
    files = [args.glue / t / f for t in TASKS for f in ("train.tsv", "dev.tsv")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"GLUE files missing: {missing[:3]} (--glue points at the GLUE root)")
    tok = AutoTokenizer.from_pretrained(str(src))
    used: set[int] = set(tok.all_special_ids)
    texts = [t for f in files for t in _texts(f)] + args.sentences.read_text(encoding="utf-8").splitlines()
    for i in range(0, len(texts), 4096):
        for ids in tok(texts[i:i + 4096], add_special_tokens=False)["input_ids"]:
            used.update(ids)
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    (out / "model").mkdir(parents=True)
    weights = load_file(str(src / "model.safetensors"))
    emb = weights.pop(WORD)
    rows = np.array(sorted(used), dtype=np.int32)
    save_file(weights, str(out / "model" / "encoder_fp32.safetensors"))
    save_file({"shape": np.array(emb.shape, dtype=np.int64), "rows": rows,
               "values": emb[rows].astype(np.float16)}, str(out / "model" / "word_rows_fp16.safetensors"))
    for f in src.iterdir():
        if f.name != "model.safetensors" and not f.name.endswith((".bin", ".onnx", ".h5", ".msgpack")):
            (shutil.copytree(f, out / "model" / f.name) if f.is_dir() else shutil.copy(f, out / "model" / f.name))
    (out / "model" / "pack.json").write_text(json.dumps({"word_embeddings": WORD}))
    with tarfile.open(out / "glue.tar.xz", "w:xz") as tf:
        for f in files:
            tf.add(f, arcname=f"glue/{f.parent.name}/{f.name}")
    (out / "sentences.txt.xz").write_bytes(lzma.compress(args.sentences.read_bytes()))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB ({len(rows)} of {emb.shape[0]} word rows, {len(files)} GLUE files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
