# (d7: d6 again, with the profilers started once the front end is busy)
# Where the time goes under HTTP load: serve.py --workers 4 at 8,000 requests/s offered;
# per-thread CPU of every Python process, and py-spy profiles of the engine process and one
# front end, both while the load runs
source .devscripts/pre.sh || exit 1
export PATH=/tmp/site/bin:$PATH
py-spy --version
python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --out /tmp/syn > $OUT/train.log 2>&1; tail -1 $OUT/train.log
python3 serve.py --checkpoint /tmp/syn --port 8123 --workers 4 > $OUT/server.log 2>&1 &
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
FE=$(pgrep -f "genrec_jax.serve.frontend" | head -1)
echo "engine process $SP, front end $FE"
python3 bench/serve_load.py --url http://127.0.0.1:8123 --rates 8000,8000 --duration 10 --max-requests 80000 \
  --history-len 32 --procs 4 --json $OUT/sl.jsonl > $OUT/sl.log 2>&1 &
LP=$!
python3 .devscripts/waitbusy.py $FE; sleep 2   # the warm-up phase is 200/s: wait for the loaded phase
python3 .devscripts/waitbusy.py $FE
py-spy record -p $SP -d 5 -r 200 --threads --nonblocking -f raw -o $OUT/engine.raw > $OUT/pyspy_engine.log 2>&1 &
S1=$!
py-spy record -p $FE -d 5 -r 200 --nonblocking -f raw -o $OUT/frontend.raw > $OUT/pyspy_fe.log 2>&1 &
S2=$!
python3 .devscripts/threads.py 4 > $OUT/threads.txt 2>&1
wait $S1 $S2
wait $LP
cat $OUT/threads.txt | head -30; tail -4 $OUT/sl.log; tail -3 $OUT/pyspy_engine.log
kill $SP; sleep 3
