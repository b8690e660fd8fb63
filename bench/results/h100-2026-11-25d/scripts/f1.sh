# MFU against model width (XLA attention; Triton at the widest), then serve_engine recommend vs new-users
source .devscripts/pre.sh || exit 1
set -o pipefail
mkdir -p $OUT/f1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $OUT/f1/gpu.txt
run_w() { # width attn expert backends tag
  echo "== $5 $(date +%T)"
  timeout 200 python3 bench/train_throughput.py --attention $4 --steps 20 --set model.embed_dim=$1 \
    --set model.attn_dim=$2 --set model.linear_dim=$2 --set model.moe.expert_dim=$3 \
    --json $OUT/f1/tt_$5.jsonl 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tail -8 | tee $OUT/f1/tt_$5.log
}
run_w 512 64 1024 xla d512
run_w 1024 128 2048 xla,triton d1024
run_w 768 96 1536 xla d768
echo "== se $(date +%T)"
timeout 170 python3 bench/serve_engine.py --config configs/base.yaml --param-dtype bfloat16 --modes recommend,new-users \
  --no-naive --batch-buckets 16,32,48,64 --iters 40 --max-seconds 3 --json $OUT/f1/se.jsonl 2>&1 \
  | grep -v "^WARNING\|^I0000\|^W0000" | tail -25 | tee $OUT/f1/se.log
echo "== done $(date +%T)"
cd $OUT && tar czf f1.tgz f1 && rm -rf f1
