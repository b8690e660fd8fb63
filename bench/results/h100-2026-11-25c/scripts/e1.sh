# Front ends resolving requests (serve.resolve_in_frontends): engine process alone through
# its socket, then HTTP with the copy on and off, alternating, one machine start
source .devscripts/pre.sh || exit 1
set -o pipefail
echo "cores: $(nproc)"
python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --out /tmp/syn > $OUT/train.log 2>&1; tail -1 $OUT/train.log
for u in none new; do for r in "" "--no-resolve"; do
  timeout 80 python3 bench/serve_ipc.py --checkpoint /tmp/syn --real --seconds 4 --users $u $r --server-buckets \
    --json $OUT/ipc.jsonl 2>&1 | tail -1 | tee -a $OUT/ipc.log
done; done
timeout 80 python3 bench/serve_ipc.py --checkpoint /tmp/syn --real --seconds 4 --users returning --server-buckets \
    --json $OUT/ipc.jsonl 2>&1 | tail -1 | tee -a $OUT/ipc.log
for r in on off on2 off2; do
  v=true; case $r in off*) v=false;; esac
  echo "== $r $(date +%T)" | tee -a $OUT/sl.log
  timeout 100 python3 bench/serve_load.py --checkpoint /tmp/syn --rates 2000,4000,8000,12000 --duration 4 \
    --max-requests 48000 --history-len 32 --procs 4 --server-arg="--workers 4" --set serve.resolve_in_frontends=$v \
    --json $OUT/sl_$r.jsonl 2>&1 | grep -v "^INFO\|uvicorn" | tail -7 | tee -a $OUT/sl.log
done
