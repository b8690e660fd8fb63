# Another machine start: CPU probe, host load, then HTTP with stall / GC logs in every process
# (on), and without (on2); outputs in one tar
source .devscripts/pre.sh || exit 1
set -o pipefail
mkdir -p /tmp/e5 /tmp/stall
cd /tmp/e5 && { nproc; cat /proc/loadavg; top -bn1 | head -15; } > host.txt 2>&1; cd - >/dev/null
probe() { python3 -c "import time; t=time.perf_counter(); x=0
for i in range(5_000_000): x+=i
print(f'cpu probe {time.perf_counter()-t:.3f} s')"; }
probe | tee -a /tmp/e5/sl.log
python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --out /tmp/syn > /tmp/e5/train.log 2>&1; tail -1 /tmp/e5/train.log
for r in on on2; do
  probe | tee -a /tmp/e5/sl.log
  echo "== $r $(date +%T)" | tee -a /tmp/e5/sl.log
  if [ $r = on ]; then export STALL_LOG=/tmp/stall PYTHONPATH=$PWD/.devscripts/stall:$PYTHONPATH; else unset STALL_LOG; fi
  timeout 130 python3 bench/serve_load.py --checkpoint /tmp/syn --rates 2000,4000,8000,12000 --duration 4 \
    --max-requests 48000 --history-len 32 --procs 4 --server-arg="--workers 4" \
    --json /tmp/e5/sl_$r.jsonl 2>&1 | grep -v "^INFO\|uvicorn" | tail -7 | tee -a /tmp/e5/sl.log
  for f in /tmp/stall/*.log; do [ -f $f ] && { echo "### $f"; cat $f; }; done > /tmp/e5/stall_$r.txt; rm -f /tmp/stall/*.log
  tar -C /tmp -czf $OUT/e5.tgz e5
done
