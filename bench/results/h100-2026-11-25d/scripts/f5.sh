# base step with the query-block default (128), XLA and Triton attention, at d=512 and d=1024
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/f5
echo "== d512 $(date +%T)"
timeout 200 python3 bench/train_throughput.py --attention xla,triton --steps 20 --json $OUT/f5/tt_d512.jsonl 2>&1 \
  | grep -v "^WARNING\|^I0000\|^W0000\|^E1125\|constant\|Constant\|^$\|^  %\|bug" | tail -5 | tee $OUT/f5/tt_d512.log
echo "== d1024 $(date +%T)"
timeout 230 python3 bench/train_throughput.py --attention xla,triton --steps 20 --set model.embed_dim=1024 \
  --set model.attn_dim=128 --set model.linear_dim=128 --set model.moe.expert_dim=2048 \
  --json $OUT/f5/tt_d1024.jsonl 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|^E1125\|constant\|Constant\|^$\|^  %\|bug" | tail -5 | tee $OUT/f5/tt_d1024.log
echo "== done $(date +%T)"
cd $OUT && tar czf f5.tgz f5 && rm -rf f5
