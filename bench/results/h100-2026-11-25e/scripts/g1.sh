# XLA attention with the hand-written blocked backward (new) against autodiff's (old):
# attention alone at the training shape, then the base train step, alternating
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/g1
sw() { if [ $1 = old ]; then cp -r .snap_old/. .; else cp -r .snap/. .; fi; }
for v in old new; do
  sw $v; timeout 120 python3 .devscripts/g_attn.py $v 2>&1 | grep "^{" | tee -a $OUT/g1/attn.jsonl
done
flt() { grep -v "^WARNING\|^I0000\|^W0000\|^E1125\|constant\|Constant\|^$\|^  %\|bug"; }
for v in old new old new; do
  sw $v; echo "== $v $(date +%T)"
  timeout 150 python3 bench/train_throughput.py --attention xla --steps 20 --json $OUT/g1/tt_${v}_$SECONDS.jsonl 2>&1 | flt | tail -2 | tee -a $OUT/g1/tt_$v.log
done
echo "== done $(date +%T)"
cd $OUT && tar czf g1.tgz g1 && rm -rf g1
