"""Diagnostics for every Python process started with STALL_LOG=DIR: garbage collections
over 2 ms, and stalls of a thread that sleeps 5 ms (waiting > 20 ms for the GIL or a CPU)."""
import gc
import os
import sys
import threading
import time

if os.environ.get("STALL_LOG"):
    _f = open(f"{os.environ['STALL_LOG']}/{os.getpid()}.log", "a", buffering=1)
    _f.write(f"# {' '.join(sys.argv)[:160]}\n")
    _t0 = [0.0]

    def _cb(phase, info):
        if phase == "start":
            _t0[0] = time.perf_counter()
        else:
            d = time.perf_counter() - _t0[0]
            if d > 0.002:
                _f.write(f"gc {time.time():.3f} gen{info['generation']} {d * 1e3:.1f}ms collected {info['collected']}\n")

    gc.callbacks.append(_cb)

    def _watch():
        while True:
            a = time.perf_counter()
            time.sleep(0.005)
            d = time.perf_counter() - a
            if d > 0.025:
                _f.write(f"stall {time.time():.3f} {d * 1e3:.1f}ms\n")

    threading.Thread(target=_watch, name="stall-watch", daemon=True).start()
