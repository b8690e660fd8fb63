# HTTP load with the engine's new stage histograms: where an admitted request's time goes, on this machine start
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/h1
python3 -c "import fastapi, uvicorn, httptools, orjson; print('serve stack ok', fastapi.__version__, uvicorn.__version__)" || exit 1
python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --out /tmp/syn > $OUT/h1/train.log 2>&1; tail -1 $OUT/h1/train.log
python3 -c "
import time
end = time.time() + 400
while time.time() < end:
    a = time.perf_counter(); time.sleep(0.005); d = time.perf_counter() - a
    if d > 0.015: print(f'stall {time.time():.3f} {d * 1e3:.1f}ms', flush=True)
" > $OUT/h1/stall_probe.log &
for r in a b c; do
  echo "== $r $(date +%T)" | tee -a $OUT/h1/sl.log
  timeout 110 python3 bench/serve_load.py --checkpoint /tmp/syn --rates 2000,4000,8000 --duration 4 \
    --max-requests 48000 --history-len 32 --procs 4 --server-arg="--workers 4" \
    --json $OUT/h1/sl_$r.jsonl 2>&1 | grep -v "^INFO\|uvicorn" | tail -6 | tee -a $OUT/h1/sl.log
done
echo "stalls over 15 ms while probing: $(grep -c stall $OUT/h1/stall_probe.log)"; tail -5 $OUT/h1/stall_probe.log
