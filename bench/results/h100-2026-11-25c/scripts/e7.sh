# Resolving front ends: pipeline depth 1 against 2 through HTTP, alternating on one machine start
source .devscripts/pre.sh || exit 1
set -o pipefail
mkdir -p /tmp/e7
python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --out /tmp/syn > /tmp/e7/train.log 2>&1; tail -1 /tmp/e7/train.log
for r in p1 p2 p1b p2b; do
  d=1; case $r in p2*) d=2;; esac
  echo "== $r $(date +%T) serve.pipeline_depth=$d" | tee -a /tmp/e7/sl.log
  timeout 110 python3 bench/serve_load.py --checkpoint /tmp/syn --rates 2000,8000,12000 --duration 4 \
    --max-requests 48000 --history-len 32 --procs 4 --server-arg="--workers 4" --set serve.pipeline_depth=$d \
    --json /tmp/e7/sl_$r.jsonl 2>&1 | grep -v "^INFO\|uvicorn" | tail -5 | tee -a /tmp/e7/sl.log
  tar -C /tmp -czf $OUT/e7.tgz e7
done
