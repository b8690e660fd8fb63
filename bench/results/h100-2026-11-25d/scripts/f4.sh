# XLA attention in query blocks (model.attention_query_block): base train step, alternating
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/f4
run() { # tag block [extra sets]
  echo "== $1 $(date +%T)"
  timeout 150 python3 bench/train_throughput.py --attention xla --steps 20 --set model.attention_query_block=$2 $3 \
    --json $OUT/f4/tt_$1.jsonl 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|^E1125\|constant\|Constant\|^$\|^  %\|bug" | tail -3 | tee $OUT/f4/tt_$1.log
}
run qb0_a 0
run qb128_a 128
run qb64_a 64
run qb0_b 0
run qb128_b 128
run qb256_a 256
echo "== done $(date +%T)"
cd $OUT && tar czf f4.tgz f4 && rm -rf f4
