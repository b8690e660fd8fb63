# HTTP at 2,000 and 8,000 offered with every Python process logging its GC passes over 2 ms and its
# 5 ms sleeps that overran by 20 ms (sitecustomize), plus the outside probe; two runs
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/r8 /tmp/stall
python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --out /tmp/syn > $OUT/r8/train.log 2>&1
python3 -c "
import time
end = time.time() + 300
while time.time() < end:
    a = time.perf_counter(); time.sleep(0.005); d = time.perf_counter() - a
    if d > 0.025: print(f'stall {time.time():.3f} {d * 1e3:.1f}ms', flush=True)
" > $OUT/r8/stall_probe.log &
export STALL_LOG=/tmp/stall PYTHONPATH=$PWD/.devscripts/stall:$PYTHONPATH
for r in a b; do
  echo "== $r $(date +%T)" | tee -a $OUT/r8/sl.log
  timeout 100 python3 bench/serve_load.py --checkpoint /tmp/syn --rates 2000,8000 --duration 4 \
    --max-requests 48000 --history-len 32 --procs 4 --server-arg="--workers 4" \
    --json $OUT/r8/sl_$r.jsonl 2>&1 | grep -v "^INFO\|uvicorn" | tail -4 | tee -a $OUT/r8/sl.log
  python3 - "$r" <<'P' | tee $OUT/r8/stall_$r.txt
import glob, sys
for f in sorted(glob.glob("/tmp/stall/*.log")):
    lines = open(f).read().splitlines()
    head = lines[0][:110] if lines else ""
    st = [float(l.split()[2][:-2]) for l in lines if l.startswith("stall")]
    gc = [float(l.split()[3][:-2]) for l in lines if l.startswith("gc")]
    print(f"{head} | stalls {len(st)} max {max(st, default=0):.0f} ms | gc>2ms {len(gc)} max {max(gc, default=0):.1f} ms")
P
  mkdir -p $OUT/r8/raw_$r && cp /tmp/stall/*.log $OUT/r8/raw_$r/ 2>/dev/null; rm -f /tmp/stall/*.log
done
echo "outside probe: $(grep -c stall $OUT/r8/stall_probe.log) stalls"
cd $OUT && tar czf r8_raw.tgz r8/raw_a r8/raw_b && rm -rf r8/raw_a r8/raw_b
