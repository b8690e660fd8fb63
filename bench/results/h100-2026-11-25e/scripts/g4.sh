# The cost of model.moe.remat_blocks (recompute the blocked MoE's weight copies in the backward)
# on the base XLA train step, alternating off / on in one machine start
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/g4
flt() { grep -v "^WARNING\|^I0000\|^W0000\|^E1125\|constant\|Constant\|^$\|^  %\|bug"; }
for v in false true false true; do
  echo "== remat_blocks=$v $(date +%T)"
  timeout 130 python3 bench/train_throughput.py --attention xla --steps 20 --set model.moe.remat_blocks=$v \
    --json $OUT/g4/tt_rb_${v}_$SECONDS.jsonl 2>&1 | flt | tail -2 | head -1 | tee -a $OUT/g4/tt_rb_$v.log
done
echo "== done $(date +%T)"
cd $OUT && tar czf g4.tgz g4 && rm -rf g4
