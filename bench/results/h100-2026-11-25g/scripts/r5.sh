# XLA GPU flags on the base train step (XLA attention), alternating with the defaults
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/r5
run() {  # name, XLA_FLAGS
  local name=$1; local flags=$2
  XLA_FLAGS="$flags" timeout 160 python3 bench/train_throughput.py --attention xla --steps 20 --json $OUT/r5/$name.jsonl 2>&1 \
    | grep -v "^WARNING\|^I0000\|^W0000\|^E1125" > $OUT/r5/$name.log
  echo "== $name ($flags)"; tail -2 $OUT/r5/$name.log | head -1
}
run default_a ""
run gemm_any "--xla_gpu_triton_gemm_any=true"
run cublaslt "--xla_gpu_enable_cublaslt=true"
run exhaustive "--xla_gpu_exhaustive_tiling_search=true"
run default_b ""
