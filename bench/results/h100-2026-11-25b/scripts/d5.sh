# HTTP, four front ends, this commit's code: is the load generator a limit? 4 against 8
# generator processes, alternating, one machine start
source .devscripts/pre.sh || exit 1
set -o pipefail
python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --out /tmp/syn > $OUT/train.log 2>&1; tail -1 $OUT/train.log
for r in p4a p8a p4b p8b; do
  procs=${r:1:1}
  echo "== $r $(date +%T) loadavg $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a $OUT/sl.log
  timeout 110 python3 bench/serve_load.py --checkpoint /tmp/syn --rates 2000,4000,8000,12000 --duration 3 \
    --max-requests 36000 --history-len 32 --procs $procs --server-arg="--workers 4" \
    --json $OUT/sl_$r.jsonl 2>&1 | grep -v "^INFO\|uvicorn" | tail -5 | tee -a $OUT/sl.log
done
