#!/usr/bin/env bash
# One pass of every GPU check and benchmark, results into one folder.
#
#     bash bench/run_gpu.sh OUT_DIR [kernels,train,serve]
#
# Each step runs under its own time limit (seconds, env STEP_LIMIT_<NAME>) so one slow
# step cannot starve the others; a step that fails or runs out of time is reported and
# the next one still runs. Needs a CUDA jax, jax-triton and the repo installed
# (pip install -e '.[gpu,plot]').
#
# Autotuning compiles every kernel configuration at every call site (minutes for a deep
# model), so the correctness check (whose "configs" group checks each configuration
# pinned), the training and the serving benchmarks run the first configuration
# (GENREC_TRITON_AUTOTUNE=0); the kernel benchmark autotunes.
set -u
OUT=${1:?usage: bash bench/run_gpu.sh OUT_DIR [steps]}
STEPS=${2:-kernels,train,serve}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME LIMIT CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
python3 -c "import jax, jaxlib, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

if [[ ,$STEPS, == *,kernels,* ]]; then
  step gpu_check "${STEP_LIMIT_GPU_CHECK:-420}" env GENREC_TRITON_AUTOTUNE=0 python3 bench/gpu_check.py --json "$OUT/gpu_check.json"
  step kernels "${STEP_LIMIT_KERNELS:-420}" python3 bench/kernels.py --skip-xla-above 4096 \
    --json "$OUT/kernels.json" --plot "$OUT/kernels.png"
fi
if [[ ,$STEPS, == *,train,* ]]; then
  step moe "${STEP_LIMIT_MOE:-150}" python3 bench/moe.py --tokens 8192,32768 --block-sizes 256,512,1024 \
    --json "$OUT/moe.json" --plot "$OUT/moe.png"
  step train_throughput "${STEP_LIMIT_TRAIN:-150}" env GENREC_TRITON_AUTOTUNE=0 python3 bench/train_throughput.py --attention xla,triton \
    --steps 20 --json "$OUT/train_throughput.json"
  step mfu_bound "${STEP_LIMIT_MFU_BOUND:-150}" env GENREC_TRITON_AUTOTUNE=0 python3 bench/mfu_bound.py --config base \
    --json "$OUT/mfu_bound.json"
fi
if [[ ,$STEPS, == *,serve,* ]]; then
  step serve_engine "${STEP_LIMIT_SERVE:-300}" env GENREC_TRITON_AUTOTUNE=0 python3 bench/serve_engine.py --batch-buckets 1,8,32,128 \
    --iters 20 --max-seconds 15 --json "$OUT/serve_engine.json" --plot "$OUT/serve_engine.png"
  step serve_frontend "${STEP_LIMIT_FRONTEND:-120}" python3 bench/serve_frontend.py --http --seconds 3 \
    --json "$OUT/serve_frontend.json"
fi
exit $status
