# Engine process alone (fixed queue settings), then one HTTP run with stall / GC logging in every process
source .devscripts/pre.sh || exit 1
set -o pipefail
[ -d /tmp/syn ] || { python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --out /tmp/syn > $OUT/train.log 2>&1; tail -1 $OUT/train.log; }
for u in new none; do for r in "" "--no-resolve"; do
  n=ipc_${u}${r:+_raw}
  timeout 60 python3 bench/serve_ipc.py --checkpoint /tmp/syn --real --seconds 4 --users $u $r --server-buckets \
    --json $OUT/$n.jsonl 2>&1 | tail -2 | head -1 | tee -a $OUT/ipc.log
done; done
mkdir -p $OUT/stall
export STALL_LOG=$OUT/stall PYTHONPATH=$PWD/.devscripts/stall:$PYTHONPATH
echo "== on $(date +%T)" | tee -a $OUT/sl.log
timeout 150 python3 bench/serve_load.py --checkpoint /tmp/syn --rates 2000,2000,8000 --duration 5 \
    --max-requests 60000 --history-len 32 --procs 4 --server-arg="--workers 4" \
    --json $OUT/sl_on.jsonl 2>&1 | grep -v "^INFO\|uvicorn" | tail -6 | tee -a $OUT/sl.log
