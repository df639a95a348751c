#!/bin/bash
# Device side (a lent GPU): rebuild model + data, GPU smoke of every job kind, then the full accuracy grids.
set -u
cd "$(dirname "$0")/../.."
T0=$(date +%s)
LIMIT=${LIMIT:-575}
WORKERS=${WORKERS:-15}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
python3 scripts/devpack/unpack.py /tmp/minilm /tmp/site || exit 4
mkdir -p runs/embedding && xz -dc .devpack/sentences.txt.xz > runs/embedding/sentences.txt
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch, transformers, onnxruntime; print('torch', torch.__version__, torch.cuda.is_available(), 'transformers', transformers.__version__, 'ort', onnxruntime.__version__)"
if [ "${SMOKE:-1}" = 1 ]; then
  timeout 170 python3 benchmarks/accuracy_parallel.py --quick --tasks STS-B --what grid,ablation,embedding \
     --workers $WORKERS -- --exporter legacy --data-dir /tmp/glue > $OUT/smoke.log 2>&1
  rc=$?
  tail -30 $OUT/smoke.log
  if [ $rc -ne 0 ]; then
    tar czf $OUT/smoke-logs.tgz runs/accuracy-parallel-quick
    for f in runs/accuracy-parallel-quick/*.log; do grep -l Traceback $f >/dev/null && { echo "== $f"; tail -25 $f; break; }; done
    exit 5
  fi
fi
NOW=$(date +%s); REM=$((LIMIT - (NOW - T0) - 50))
KILL=$(python3 -c "print(round($REM/60, 2))")
echo "full run: kill after $KILL min"
# PARALLEL_ARGS: runner flags (e.g. "--teacher baseline --what grid,seeds"); GRID_ARGS: accuracy.py flags
# for every job (e.g. "--augment 2 --results benchmarks/results/accuracy_gradual_tbase_aug2.json")
python3 benchmarks/accuracy_parallel.py ${PARALLEL_ARGS:-} --workers $WORKERS --stop-after-min $KILL --kill-after-min $KILL \
   --collect $OUT -- --exporter legacy --data-dir /tmp/glue ${GRID_ARGS:-} > $OUT/full.log 2>&1
tail -45 $OUT/full.log
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
