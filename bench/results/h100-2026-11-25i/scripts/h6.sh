# Slow-start latency at low load: vCPU wake-up? Alternate runs with and without 16 nice-19 CPU burners
# (they keep every vCPU busy, so none halts; a waking nice-0 task preempts them at once).
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/h6
for f in current_driver current_governor current_governor_ro available_governors; do
  echo "$f: $(cat /sys/devices/system/cpu/cpuidle/$f 2>&1)"; done | tee $OUT/h6/cpuidle.txt
ls /sys/devices/system/cpu/cpu0/cpuidle 2>&1 | head | tee -a $OUT/h6/cpuidle.txt
python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --out /tmp/syn > $OUT/h6/train.log 2>&1
st() { awk '/^cpu /{print "steal", $9, "idle", $5, "total", $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
for r in a b c d; do
  pids=""
  if [ $r = b ] || [ $r = d ]; then
    for i in $(seq 16); do nice -n 19 python3 -c "while True: pass" & pids="$pids $!"; done
  fi
  echo "== $r burners:$( [ -n "$pids" ] && echo on || echo off ) $(date +%T) $(st)" | tee -a $OUT/h6/sl.log
  timeout 100 python3 bench/serve_load.py --checkpoint /tmp/syn --rates 2000,8000 --duration 4 \
    --max-requests 48000 --history-len 32 --procs 4 --server-arg="--workers 4" \
    --json $OUT/h6/sl_$r.jsonl 2>&1 | grep -v "^INFO\|uvicorn" | tail -4 | tee -a $OUT/h6/sl.log
  [ -n "$pids" ] && kill $pids
  wait $pids 2>/dev/null
  echo "== $r after $(st)" | tee -a $OUT/h6/sl.log
done
