# HTTP past saturation at the current code (defaults, 4 front ends), twice, with a CPU stall probe beside it
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/r6
python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --out /tmp/syn > $OUT/r6/train.log 2>&1; tail -1 $OUT/r6/train.log
python3 -c "
import time
end = time.time() + 330
while time.time() < end:
    a = time.perf_counter(); time.sleep(0.005); d = time.perf_counter() - a
    if d > 0.025: print(f'stall {time.time():.3f} {d * 1e3:.1f}ms', flush=True)
" > $OUT/r6/stall_probe.log &
for r in a b; do
  echo "== $r $(date +%T)" | tee -a $OUT/r6/sl.log
  timeout 140 python3 bench/serve_load.py --checkpoint /tmp/syn --rates 2000,4000,8000,12000 --duration 4 \
    --max-requests 48000 --history-len 32 --procs 4 --server-arg="--workers 4" \
    --json $OUT/r6/sl_$r.jsonl 2>&1 | grep -v "^INFO\|uvicorn" | tail -7 | tee -a $OUT/r6/sl.log
done
echo "stalls over 25 ms while probing: $(grep -c stall $OUT/r6/stall_probe.log)"
