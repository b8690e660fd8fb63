# Same machine start: engine process alone (new users, resolved vs not, alternating), then HTTP
# with the front ends resolving on and off, alternating; stall / GC logs of every process
source .devscripts/pre.sh || exit 1
set -o pipefail
[ -d /tmp/syn ] || { python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --out /tmp/syn > $OUT/train.log 2>&1; tail -1 $OUT/train.log; }
for n in new new_raw new2 new_raw2; do
  r=""; case $n in *raw*) r="--no-resolve";; esac
  timeout 100 python3 bench/serve_ipc.py --checkpoint /tmp/syn --real --seconds 4 --users new $r --server-buckets \
    --json $OUT/ipc_$n.jsonl 2>&1 | grep "real" | tee -a $OUT/ipc.log
done
mkdir -p /tmp/stall
export STALL_LOG=/tmp/stall PYTHONPATH=$PWD/.devscripts/stall:$PYTHONPATH
for r in on off on2 off2; do
  v=true; case $r in off*) v=false;; esac
  echo "== $r $(date +%T)" | tee -a $OUT/sl.log
  timeout 110 python3 bench/serve_load.py --checkpoint /tmp/syn --rates 2000,8000 --duration 4 \
    --max-requests 40000 --history-len 32 --procs 4 --server-arg="--workers 4" --set serve.resolve_in_frontends=$v \
    --json $OUT/sl_$r.jsonl 2>&1 | grep -v "^INFO\|uvicorn" | tail -4 | tee -a $OUT/sl.log
  for f in /tmp/stall/*.log; do echo "### $r $f"; cat $f; done >> $OUT/stall.txt; rm -f /tmp/stall/*.log
done
