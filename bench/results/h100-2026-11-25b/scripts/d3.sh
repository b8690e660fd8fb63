# As d2, with the refined adaptive limit (binding check, 50 ms windows): fixed cap against
# serve.target_latency_ms=15 and the previous commit's code, alternating; TIME_WAIT sockets counted
source .devscripts/pre.sh || exit 1
set -o pipefail
probe() { python3 - <<'PY'
import time
t = time.perf_counter(); s = 0
for i in range(5_000_000): s += i
mhz = [float(l.split(":")[1]) for l in open("/proc/cpuinfo") if l.startswith("cpu MHz")]
tw = sum(1 for f in ("/proc/net/tcp", "/proc/net/tcp6") for l in open(f).readlines()[1:] if l.split()[3] == "06")
print(f"time-wait sockets {tw}; cpu probe: 5M-iteration loop {time.perf_counter() - t:.3f} s; cpu MHz mean {sum(mhz) / len(mhz):.0f} "
      f"min {min(mhz):.0f} max {max(mhz):.0f}; loadavg {open('/proc/loadavg').read().split()[:3]}")
PY
}
# trained by the previous commit's code, so that its config.yaml has no key that code lacks
cp -r .snap_old/. .
python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --out /tmp/syn > $OUT/train.log 2>&1; tail -1 $OUT/train.log
for r in fixed target old target2 fixed2; do
  if [ $r = old ]; then cp -r .snap_old/. .; else cp -r .snap/. .; fi
  flag=""; case $r in target*) flag="--set serve.target_latency_ms=15";; esac
  echo "== $r $(date +%T) $flag" | tee -a $OUT/sl.log
  probe | tee -a $OUT/sl.log
  timeout 120 python3 bench/serve_load.py --checkpoint /tmp/syn --rates 2000,4000,8000,12000 --duration 3 \
    --max-requests 36000 --history-len 32 --procs 4 --server-arg="--workers 4" $flag \
    --json $OUT/sl_$r.jsonl 2>&1 | grep -v "^INFO\|uvicorn" | tail -7 | tee -a $OUT/sl.log
done
probe | tee -a $OUT/sl.log
cp -r .snap/. .
