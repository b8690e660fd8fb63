# Dropout masks' generator in the base train step (XLA attention), alternating; plus dropout off
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/r1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee $OUT/r1/gpu.txt
run() {  # name, extra args
  local name=$1; shift
  timeout 150 python3 bench/train_throughput.py --attention xla --steps 20 --json $OUT/r1/$name.jsonl "$@" 2>&1 \
    | grep -v "^WARNING\|^I0000\|^W0000\|^E1125" > $OUT/r1/$name.log
  tail -3 $OUT/r1/$name.log
}
run threefry_a
run rbg_a --set train.dropout_rng=rbg
run nodrop --set model.dropout=0.0
run threefry_b
run rbg_b --set train.dropout_rng=rbg
