# TMA descriptor loads (q/dO in the dK/dV kernel, k/v in the dQ kernel): checks and timing
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/f3
timeout 540 python3 .devscripts/tma/f3.py $OUT/f3/tma.jsonl 2>&1 | grep '^{\|rror' | tail -40 | tee $OUT/f3/tma.log
echo "== done $(date +%T)"
cd $OUT && tar czf f3.tgz f3 && rm -rf f3
