# The same descriptor kernels with and without warp specialisation: correctness and time.
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/w2
F="grep -v ^WARNING\|^I0000\|^W0000\|^E11"
GENREC_WS_OFF=1 timeout 150 python3 bench/gpu_check.py --only ws --json $OUT/w2/gc_ws_off.json 2>&1 | $F > $OUT/w2/gc_ws_off.log; tail -1 $OUT/w2/gc_ws_off.log
grep "^FAIL" $OUT/w2/gc_ws_off.log | head -5
for ws in off on off on; do
  if [ $ws = off ]; then export GENREC_WS_OFF=1; else export GENREC_WS_OFF=0; fi
  timeout 150 python3 bench/kernels.py --ns 4096 --only attention --rab none --impls triton-ws --configs sweep --verbose --json $OUT/w2/k_$ws.json 2>&1 | $F >> $OUT/w2/k_$ws.log
  echo "== WS $ws"; grep -E "^hstu_attention|triton-ws N" $OUT/w2/k_$ws.log | tail -17
done
