# XLA attention products in the inputs' dtype (v2) against float32 products (old): the attention
# alone, its profile, and the base train step, alternating
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/g3
sw() { if [ $1 = old ]; then cp -r .snap/. .; else cp -r .snap_$1/. .; fi; }
for v in old v2; do
  sw $v; timeout 100 python3 .devscripts/g_attn.py $v 2>&1 | grep "^{" | tee -a $OUT/g3/attn.jsonl
done
sw old
XLA_FLAGS="--xla_dump_to=/tmp/hloa --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_loss" timeout 100 python3 .devscripts/g_attn_prof.py > $OUT/g3/attn_prof_old.jsonl 2>$OUT/g3/attn_prof_old.err
python3 .devscripts/hlo_map.py $OUT/g3/attn_prof_old.jsonl /tmp/hloa $OUT/g3/hlo_map_attn_old.txt > /dev/null 2>&1
grep '"kind": "class"' $OUT/g3/attn_prof_old.jsonl
flt() { grep -v "^WARNING\|^I0000\|^W0000\|^E1125\|constant\|Constant\|^$\|^  %\|bug"; }
for v in old v2 old v2; do
  sw $v; echo "== $v $(date +%T)"
  timeout 130 python3 bench/train_throughput.py --attention xla --steps 20 --json $OUT/g3/tt_${v}_$SECONDS.jsonl 2>&1 | flt | tail -2 | head -1 | tee -a $OUT/g3/tt_$v.log
done
echo "== done $(date +%T)"
cd $OUT && tar czf g3.tgz g3 && rm -rf g3
