# Is the machine's CPU time capped by a cgroup quota (CFS bandwidth), and does the HTTP load hit it?
source .devscripts/pre.sh || exit 1
mkdir -p $OUT/h5
{
  echo "nproc $(nproc)"; grep -c ^processor /proc/cpuinfo; grep -m1 "model name" /proc/cpuinfo
  echo "--- /proc/self/cgroup"; cat /proc/self/cgroup
  echo "--- mounts"; grep cgroup /proc/mounts
  for f in /sys/fs/cgroup/cpu.max /sys/fs/cgroup/cpu.stat /sys/fs/cgroup/cpuset.cpus.effective /sys/fs/cgroup/cpu.weight \
           /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us /sys/fs/cgroup/cpu/cpu.stat \
           /sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us /sys/fs/cgroup/cpu,cpuacct/cpu.stat; do
    [ -e $f ] && { echo "--- $f"; cat $f; }
  done
  cgp=$(awk -F: '$1=="0"{print $3}' /proc/self/cgroup)
  [ -n "$cgp" ] && for f in cpu.max cpu.stat; do [ -e /sys/fs/cgroup$cgp/$f ] && { echo "--- /sys/fs/cgroup$cgp/$f"; cat /sys/fs/cgroup$cgp/$f; }; done
  echo "--- sched"; cat /proc/sys/kernel/sched_* 2>/dev/null | head; ls /proc/sys/kernel | grep sched | head -20
  echo "--- loadavg"; cat /proc/loadavg
} > $OUT/h5/cg.txt 2>&1
cat $OUT/h5/cg.txt
python3 train.py --no-progress --set train.num_steps=200 --set train.eval_every=0 --out /tmp/syn > $OUT/h5/train.log 2>&1
stat() { cat /sys/fs/cgroup/cpu.stat 2>/dev/null | tr '\n' ' '; awk '/^cpu /{print "steal", $9, "total", $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
for r in a b c; do
  echo "== $r $(date +%T) before: $(stat)" | tee -a $OUT/h5/sl.log
  timeout 100 python3 bench/serve_load.py --checkpoint /tmp/syn --rates 2000,8000 --duration 4 \
    --max-requests 48000 --history-len 32 --procs 4 --server-arg="--workers 4" \
    --json $OUT/h5/sl_$r.jsonl 2>&1 | grep -v "^INFO\|uvicorn" | tail -5 | tee -a $OUT/h5/sl.log
  echo "== $r after: $(stat)" | tee -a $OUT/h5/sl.log
done
