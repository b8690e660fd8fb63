# Where the engine process's interpreter lock goes under HTTP load (resolving front ends):
# py-spy --gil (only samples holding the GIL), with and without native frames; per-thread CPU
source .devscripts/pre.sh || exit 1
export PATH=/tmp/site/bin:$PATH
mkdir -p /tmp/e6
python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --out /tmp/syn > /tmp/e6/train.log 2>&1; tail -1 /tmp/e6/train.log
python3 serve.py --checkpoint /tmp/syn --port 8123 --workers 4 > /tmp/e6/server.log 2>&1 &
SP=$!
python3 - <<'PY'
import time, urllib.request
for _ in range(300):
    try:
        if urllib.request.urlopen("http://127.0.0.1:8123/readyz", timeout=1).status == 200:
            print("ready"); break
    except OSError:
        pass
    time.sleep(1)
PY
sleep 3
FE=$(pgrep -f "genrec_jax.serve.frontend" | head -1)
python3 bench/serve_load.py --url http://127.0.0.1:8123 --rates 8000,8000,8000 --duration 8 --max-requests 80000 \
  --history-len 32 --procs 4 --json /tmp/e6/sl.jsonl > /tmp/e6/sl.log 2>&1 &
LP=$!
python3 .devscripts/waitbusy.py $FE; sleep 3
python3 .devscripts/threads.py 3 > /tmp/e6/threads.txt 2>&1
py-spy record -p $SP -d 5 -r 200 --threads --gil -f raw -o /tmp/e6/engine_gil.raw > /tmp/e6/pyspy1.log 2>&1
py-spy record -p $SP -d 5 -r 100 --threads --gil --native -f raw -o /tmp/e6/engine_gil_native.raw > /tmp/e6/pyspy2.log 2>&1
wait $LP
kill $SP; wait $SP 2>/dev/null
tail -5 /tmp/e6/sl.log
tar -C /tmp -czf $OUT/e6.tgz e6
