# HTTP at 2,000 and 8,000 offered: the old synthetic width (64) against the new default (128), alternating
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/r7
python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --out /tmp/s128 > $OUT/r7/train128.log 2>&1
python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --set model.embed_dim=64 \
  --set train.learning_rate=0.002 --out /tmp/s64 > $OUT/r7/train64.log 2>&1
python3 -c "
import time
end = time.time() + 420
while time.time() < end:
    a = time.perf_counter(); time.sleep(0.005); d = time.perf_counter() - a
    if d > 0.025: print(f'stall {time.time():.3f} {d * 1e3:.1f}ms', flush=True)
" > $OUT/r7/stall_probe.log &
for r in 64a 128a 64b 128b; do
  echo "== $r $(date +%T)" | tee -a $OUT/r7/sl.log
  timeout 100 python3 bench/serve_load.py --checkpoint /tmp/s${r%?} --rates 2000,8000 --duration 4 \
    --max-requests 48000 --history-len 32 --procs 4 --server-arg="--workers 4" \
    --json $OUT/r7/sl_$r.jsonl 2>&1 | grep -v "^INFO\|uvicorn" | tail -4 | tee -a $OUT/r7/sl.log
done
echo "stalls over 25 ms while probing: $(grep -c stall $OUT/r7/stall_probe.log)"
