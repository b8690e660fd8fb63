# MFU ceilings per attention backend: base, and base at twice the width
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/r3
f() { grep -v "^WARNING\|^I0000\|^W0000\|^E1125"; }
timeout 200 python3 bench/mfu_bound.py --config base --json $OUT/r3/base.jsonl 2>&1 | f | tee $OUT/r3/base.log
timeout 200 python3 bench/mfu_bound.py --config base --set model.embed_dim=1024 --set model.attn_dim=128 \
  --set model.linear_dim=128 --set model.moe.expert_dim=2048 --json $OUT/r3/d1024.jsonl 2>&1 | f | tee $OUT/r3/d1024.log
timeout 150 python3 bench/mfu_bound.py --config base --attention xla --set model.attention_query_block=0 --json $OUT/r3/dense.jsonl 2>&1 | f | tee $OUT/r3/dense.log
