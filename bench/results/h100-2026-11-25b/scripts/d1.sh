# HTTP front ends: this session's lean routes against the previous commit's code (alternating,
# one machine start), the front end's CPU per request, the engine process alone
source .devscripts/pre.sh || exit 1
set -o pipefail
python3 -c "import uvloop, httptools; print('uvloop', uvloop.__version__, 'httptools', httptools.__version__)"
echo "cores: $(nproc)"
python3 bench/serve_frontend.py --http --seconds 3 --json $OUT/fe.jsonl 2>&1 | tail -14 | tee $OUT/fe.log
python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --out /tmp/syn > $OUT/train.log 2>&1; tail -1 $OUT/train.log
python3 bench/serve_ipc.py --checkpoint /tmp/syn --real --seconds 4 --json $OUT/ipc.jsonl 2>&1 | tail -4 | tee $OUT/ipc.log
for r in new old new2; do
  if [ $r = old ]; then cp -r .snap_old/. .; else cp -r .snap/. .; fi
  echo "== $r $(date +%T)" | tee -a $OUT/sl.log
  timeout 170 python3 bench/serve_load.py --checkpoint /tmp/syn --rates 2000,4000,8000,12000 --duration 4 \
    --max-requests 48000 --history-len 32 --procs 4 --server-arg="--workers 4" \
    --json $OUT/sl_$r.jsonl 2>&1 | grep -v "^INFO\|uvicorn" | tail -7 | tee -a $OUT/sl.log
done
cp -r .snap/. .
