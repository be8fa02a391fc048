#!/usr/bin/env bash
# Cirrus on one H200 in one device call: decode (Cirrus Sampler vs HF generate on cuda vs the
# plain JAX loop) and train throughput (Cirrus fp32 / bf16 vs nanoGPT-torch on cuda), JSON lines.
#
# Before the call, on the dev machine (the peers must travel in an ignored folder):
#   echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu/peers; cp ../shared/peers/*.py .gpu/peers/
# The call (device tool `run`, carry [".gpu"], timeout_s 420):
#   set -o pipefail; bash bench/gpu/run_h200.sh 2>&1 | tee $OUT/log.txt
# Dry run on CPU (tiny sizes; the peers' venv has torch + transformers + jax):
#   OUT=/tmp/h200 PY=.venv/bin/python JAX_PLATFORMS=cpu bash bench/gpu/run_h200.sh --quick \
#     --python ~/.cache/cirrus-peers-venv/bin/python --batches 1,2 --reps 2 --train_batch 2 \
#     --train_steps 2 --train_warmup 2
# Results: $OUT/results.json (one JSON object a line; the last is the summary), $OUT/log.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/h200_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Several processes (this driver and each peer) share the GPU: no 75% preallocation.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
if [ ! -f .gpu/peers/decode_jax.py ]; then
  echo "no .gpu/peers: copy ../shared/peers/*.py there and carry .gpu" >&2
  exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi \
  --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem,temperature.gpu \
  --format=csv || true
"$PY" - <<'EOF' || true
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "torch", "transformers",
             "tokenizers", "numpy", "etils", "grain", "gin", "array_record", "tensorboardX"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as error:  # noqa: BLE001
        print(f"{name} MISSING ({type(error).__name__})")
EOF
timeout "${DRIVER_TIMEOUT:-400}" "$PY" bench/gpu/h200.py --peers .gpu/peers --python "$PY" \
  --out "$OUT/results.json" --deadline "${DEADLINE:-240}" "$@"
rc=$?
command -v nvidia-smi >/dev/null && nvidia-smi \
  --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv || true
exit $rc
