"""TMA descriptor loads in the backward kernels: correctness, then fwd+bwd timing splits."""
import sys, time, json
sys.path.insert(0, ".devscripts/tma")
sys.path.insert(0, ".")
from tma_common import *  # noqa: F401,F403  (installs the scratch patch)
import tma_common as C
import numpy as np, jax.numpy as jnp

OUT = sys.argv[1]
t0 = time.time()
TL = dict(tma_loads=True)
C.check(4, 300, 2, 64, jnp.float32, False, ["separate"], lengths=np.array([1, 300, 157, 64], np.int32), **TL)
C.check(4, 300, 2, 64, jnp.bfloat16, True, ["separate"], lengths=np.array([1, 300, 157, 64], np.int32), **TL)
C.check(8, 1024, 4, 128, jnp.bfloat16, False, ["separate", "atomic"], **TL)
C.check(4, 512, 8, 64, jnp.bfloat16, True, ["separate"], **TL)
C.emit(kind="note", t=time.time() - t0)
cfg = lambda bm, bn, w, s: dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
V = [("fwdonly", "fwdonly", None),
     ("sep", "separate", None), ("nodq", "nodq", None),
     ("sep_tma", "separate", None, TL), ("nodq_tma", "nodq", None, TL),
     ("nodq_tma_32s2", "nodq", cfg(32, 128, 8, 2), TL), ("nodq_tma_64s2", "nodq", cfg(64, 128, 8, 2), TL),
     ("nodq_tma_32s4", "nodq", cfg(32, 128, 8, 4), TL),
     ("sep_tma_dq128s3", "separate", None, dict(TL, dq_config=cfg(128, 64, 8, 3))),
     ("sep_tma_dq128x128s2", "separate", None, dict(TL, dq_config=cfg(128, 128, 8, 2))),
     ("sep_b", "separate", None), ("sep_tma_b", "separate", None, TL)]
C.timing(32, 4096, 4, 128, False, V)
C.emit(kind="note", t=time.time() - t0)
C.timing(64, 512, 8, 64, True, [("sep", "separate", None), ("sep_tma", "separate", None, TL),
                                 ("atomic", "atomic", None), ("atomic_tma", "atomic", None, TL)])
C.emit(kind="note", t=time.time() - t0)
C.timing(32, 8192, 4, 128, False, [("sep", "separate", None), ("sep_tma", "separate", None, TL)], rounds=7)
C.emit(kind="note", t=time.time() - t0)
with open(OUT, "w") as f:
    for r in C.rows:
        f.write(json.dumps(r) + "\n")
