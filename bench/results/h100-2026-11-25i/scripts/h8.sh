# HTTP at 2,000 and 8,000 offered with the new round-trip (front end -> engine process) and
# engine-side request histograms: where does the tail go on this machine start?
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/h8
python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --out /tmp/syn > $OUT/h8/train.log 2>&1
st() { awk '/^cpu /{print "steal", $9, "total", $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
for r in a b; do
  echo "== $r $(date +%T) $(st)" | tee -a $OUT/h8/sl.log
  timeout 100 python3 bench/serve_load.py --checkpoint /tmp/syn --rates 2000,8000 --duration 4 \
    --max-requests 48000 --history-len 32 --procs 4 --server-arg="--workers 4" \
    --json $OUT/h8/sl_$r.jsonl 2>&1 | grep -v "^INFO\|uvicorn" | tail -4 | tee -a $OUT/h8/sl.log
  echo "== $r after $(st)" | tee -a $OUT/h8/sl.log
done
