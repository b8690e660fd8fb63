# HTTP at 2,000 and 8,000 offered with the per-request queue-wait histogram; run b with every Python
# process logging its GC passes over 2 ms and its 5 ms sleeps that overran by 20 ms (sitecustomize)
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/h4 /tmp/stall
python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --out /tmp/syn > $OUT/h4/train.log 2>&1
cpu() { awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8+$9, $9}' /proc/stat; }
for r in a b; do
  if [ $r = b ]; then export STALL_LOG=/tmp/stall PYTHONPATH=$PWD/.devscripts/stall:$PYTHONPATH; fi
  read t0 s0 < <(cpu)
  echo "== $r $(date +%T)" | tee -a $OUT/h4/sl.log
  timeout 100 python3 bench/serve_load.py --checkpoint /tmp/syn --rates 2000,8000 --duration 4 \
    --max-requests 48000 --history-len 32 --procs 4 --server-arg="--workers 4" \
    --json $OUT/h4/sl_$r.jsonl 2>&1 | grep -v "^INFO\|uvicorn" | tail -4 | tee -a $OUT/h4/sl.log
  read t1 s1 < <(cpu)
  echo "cpu steal during run $r: $(( s1 - s0 )) of $(( t1 - t0 )) jiffies" | tee -a $OUT/h4/sl.log
done
python3 - <<'P' | tee $OUT/h4/stall_b.txt
import glob
for f in sorted(glob.glob("/tmp/stall/*.log")):
    lines = open(f).read().splitlines()
    head = lines[0][:100] if lines else ""
    st = [float(l.split()[2][:-2]) for l in lines if l.startswith("stall")]
    gc = [float(l.split()[3][:-2]) for l in lines if l.startswith("gc")]
    print(f"{head} | stalls {len(st)} max {max(st, default=0):.0f} ms | gc>2ms {len(gc)} max {max(gc, default=0):.1f} ms")
P
cd /tmp && tar czf $OUT/h4/stall_raw.tgz stall
