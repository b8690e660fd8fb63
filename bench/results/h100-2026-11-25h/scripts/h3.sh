# As h2 (stage histograms, GPU clocks, CPU steal per run), four runs at 2,000 and 8,000 offered
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/h3
python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --out /tmp/syn > $OUT/h3/train.log 2>&1; tail -1 $OUT/h3/train.log
nvidia-smi dmon -s pcu -d 1 > $OUT/h3/dmon.log 2>&1 &
python3 -c "
import time
end = time.time() + 380
while time.time() < end:
    a = time.perf_counter(); time.sleep(0.005); d = time.perf_counter() - a
    if d > 0.015: print(f'stall {time.time():.3f} {d * 1e3:.1f}ms', flush=True)
" > $OUT/h3/stall_probe.log &
cpu() { awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8+$9, $9}' /proc/stat; }
for r in a b c d; do
  read t0 s0 < <(cpu)
  echo "== $r $(date +%T)" | tee -a $OUT/h3/sl.log
  timeout 110 python3 bench/serve_load.py --checkpoint /tmp/syn --rates 2000,8000 --duration 4 \
    --max-requests 48000 --history-len 32 --procs 4 --server-arg="--workers 4" \
    --json $OUT/h3/sl_$r.jsonl 2>&1 | grep -v "^INFO\|uvicorn" | tail -5 | tee -a $OUT/h3/sl.log
  read t1 s1 < <(cpu)
  echo "cpu steal during run $r: $(( s1 - s0 )) of $(( t1 - t0 )) jiffies" | tee -a $OUT/h3/sl.log
done
echo "stalls over 15 ms while probing: $(grep -c stall $OUT/h3/stall_probe.log)"
pkill -f "nvidia-smi dmon"; awk 'NR<=2 || NR%20==0' $OUT/h3/dmon.log | head -25
