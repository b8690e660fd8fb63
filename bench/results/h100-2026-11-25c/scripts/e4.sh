# Fresh machine start: HTTP past saturation with the front ends resolving (on) and not (off),
# and on with the adaptive in-flight limit (target 15 ms); outputs in one tar
source .devscripts/pre.sh || exit 1
set -o pipefail
mkdir -p /tmp/e4
python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --out /tmp/syn > /tmp/e4/train.log 2>&1; tail -1 /tmp/e4/train.log
for r in on off on_t15 on2; do
  extra="--set serve.resolve_in_frontends=true"
  case $r in off*) extra="--set serve.resolve_in_frontends=false";; on_t15) extra="$extra --set serve.target_latency_ms=15";; esac
  echo "== $r $(date +%T) $extra" | tee -a /tmp/e4/sl.log
  timeout 130 python3 bench/serve_load.py --checkpoint /tmp/syn --rates 2000,4000,8000,12000 --duration 4 \
    --max-requests 48000 --history-len 32 --procs 4 --server-arg="--workers 4" $extra \
    --json /tmp/e4/sl_$r.jsonl 2>&1 | grep -v "^INFO\|uvicorn" | tail -7 | tee -a /tmp/e4/sl.log
  tar -C /tmp -czf $OUT/e4.tgz e4
done
