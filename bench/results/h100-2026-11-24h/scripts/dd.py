"""Where the host time of one recommend step goes on the GPU (diagnostic, not a benchmark)."""
import os, statistics, sys, time
sys.path.insert(0, ".")
import numpy as np
import jax
from bench import serve_engine as se
from genrec_jax.serve.inputs import pad_batch

extra = sys.argv[1:]
args = se.parse_args(["--config", os.environ.get("DD_CONFIG", "configs/base.yaml"), "--param-dtype", "bfloat16", "--modes", "recommend", "--no-naive",
                      "--batch-buckets", "48", *extra])
cfg, path, eng, naive, compile_s = se.build(args)
B, S = 48, 256
exe = eng._exec[("recommend", B, S)]
hs = se.histories(B, S, eng.num_items, 5)
batch = pad_batch(hs, B, S, eng.max_len)
excl = eng._exclude([], [], B) if False else jax.device_put(np.zeros((B, eng.exclude_width), np.int32), eng.sharding)
print("flags", os.environ.get("XLA_FLAGS", ""), extra, "weights leaves", len(eng.weights))
ins = (eng.weights, eng.item_table, np.int32(eng.live_items), batch, excl)
dev_batch = jax.device_put(batch, eng.sharding)
ins_dev = (eng.weights, eng.item_table, np.int32(eng.live_items), dev_batch, excl)

def timeit(a, n=40, block=True):
    d, t = [], []
    for _ in range(n):
        t0 = time.perf_counter(); out = exe(*a); t1 = time.perf_counter()
        jax.block_until_ready(out); t2 = time.perf_counter()
        d.append(t1 - t0); t.append(t2 - t0)
    return 1e3 * statistics.median(d), 1e3 * statistics.median(t)

for name, a in (("numpy inputs", ins), ("device inputs", ins_dev), ("numpy inputs", ins), ("device inputs", ins_dev)):
    timeit(a, 5)
    d, t = timeit(a)
    print(f"{name:<16} dispatch {d:.3f} ms  dispatch+wait {t:.3f} ms")
# back to back: does a call block while earlier steps run?
outs, ds = [], []
t0 = time.perf_counter()
for _ in range(20):
    t1 = time.perf_counter(); outs.append(exe(*ins_dev)); ds.append(time.perf_counter() - t1)
jax.block_until_ready(outs); tt = time.perf_counter() - t0
print("back-to-back 20 steps: per-call dispatch ms", " ".join(f"{1e3 * x:.2f}" for x in ds), f"; total {1e3 * tt / 20:.3f} ms/step")
prof = f"/tmp/dd_prof_{os.getpid()}"
jax.profiler.start_trace(prof, create_perfetto_trace=True)
for _ in range(10):
    jax.block_until_ready(exe(*ins))
jax.profiler.stop_trace()
os.system(f"python .devscripts/host_trace.py {prof} 10 | head -40")
from bench.common import summarize_trace, print_trace_summary
print_trace_summary(summarize_trace(prof, steps=10, top=12), "device")
