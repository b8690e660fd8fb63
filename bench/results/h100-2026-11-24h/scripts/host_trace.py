"""Host-side events of a jax.profiler perfetto trace: top names by total time per thread."""
import collections, gzip, json, sys
from pathlib import Path
d, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 10
f = sorted(Path(d).rglob("perfetto_trace.json.gz"))[-1]
ev = json.load(gzip.open(f))
ev = ev["traceEvents"] if isinstance(ev, dict) else ev
procs = {e["pid"]: e.get("args", {}).get("name", "") for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in ev if e.get("ph") == "M" and e.get("name") == "thread_name"}
tot = collections.Counter(); cnt = collections.Counter(); dev_kernels = 0
for e in ev:
    if e.get("ph") != "X":
        continue
    pn = procs.get(e["pid"], "")
    if "gpu" in pn.lower() or "device" in pn.lower():
        dev_kernels += 1
        continue
    key = (pn[:20], threads.get((e["pid"], e["tid"]), str(e["tid"]))[:24], e["name"][:70])
    tot[key] += e.get("dur", 0.0); cnt[key] += 1
print(f"device events per batch: {dev_kernels / steps:.0f}")
print(f"{'process':<21}{'thread':<25}{'name':<71}{'calls/b':>8}{'ms/b':>9}")
for k, v in tot.most_common(45):
    print(f"{k[0]:<21}{k[1]:<25}{k[2]:<71}{cnt[k] / steps:>8.1f}{v / 1e3 / steps:>9.3f}")
