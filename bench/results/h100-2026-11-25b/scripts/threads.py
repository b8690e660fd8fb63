"""CPU use of every thread of the serving processes over an interval: python threads.py SECONDS"""
import os, sys, time

def snap():
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()[:90]
            if "python" not in cmd:
                continue
            for tid in os.listdir(f"/proc/{pid}/task"):
                st = open(f"/proc/{pid}/task/{tid}/stat").read()
                name = st[st.index("(") + 1:st.rindex(")")]
                f = st.rsplit(")", 1)[1].split()
                out[(pid, tid)] = (cmd, name, int(f[11]) + int(f[12]))
        except OSError:
            pass
    return out

dt = float(sys.argv[1])
a = snap(); time.sleep(dt); b = snap()
hz = os.sysconf("SC_CLK_TCK")
rows = []
for k, (cmd, name, t) in b.items():
    if k in a:
        u = (t - a[k][2]) / hz / dt
        if u > 0.02:
            rows.append((u, k[0], k[1], name, cmd))
by_pid = {}
for u, pid, tid, name, cmd in rows:
    by_pid.setdefault((pid, cmd), 0.0)
    by_pid[(pid, cmd)] += u
print(f"== CPU over {dt:.0f} s, by process (cores)")
for (pid, cmd), u in sorted(by_pid.items(), key=lambda x: -x[1]):
    print(f"{u:5.2f}  {pid:>7}  {cmd}")
print("== by thread (>= 0.02 cores)")
for u, pid, tid, name, cmd in sorted(rows, reverse=True)[:40]:
    print(f"{u:5.2f}  {pid:>7} {tid:>7} {name:16} {cmd[:60]}")
