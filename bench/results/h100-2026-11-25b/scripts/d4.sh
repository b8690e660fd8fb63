# HTTP, four front ends, default settings: the previous commit's code and this one's (lean
# routes), alternating three times each at 4,000 and 8,000 requests/s offered, one machine start
source .devscripts/pre.sh || exit 1
set -o pipefail
cp -r .snap_old/. .
python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --out /tmp/syn > $OUT/train.log 2>&1; tail -1 $OUT/train.log
for r in old1 new1 old2 new2 old3 new3; do
  case $r in old*) cp -r .snap_old/. .;; *) cp -r .snap/. .;; esac
  echo "== $r $(date +%T) loadavg $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a $OUT/sl.log
  timeout 90 python3 bench/serve_load.py --checkpoint /tmp/syn --rates 4000,8000 --duration 3 \
    --max-requests 24000 --history-len 32 --procs 4 --server-arg="--workers 4" \
    --json $OUT/sl_$r.jsonl 2>&1 | grep -v "^INFO\|uvicorn" | tail -2 | tee -a $OUT/sl.log
done
cp -r .snap/. .
