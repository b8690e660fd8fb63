import sys, re
sys.path.insert(0, "/work/main")
from genrec_jax.kernels import launch, hstu_ws as W
sig_common = {"SEQ_STARTS": "*i32", "SEQ_LENS": "*i32", "alpha": "fp32", "inv_max_len": "fp32", "pad_rows": "i32", "SCRATCH": "*i32"}
for kind, kern in W.WS_KERNELS.items():
    sig = dict(sig_common)
    for a in kern.arg_names:
        if a in ("Q", "K", "V", "DO", "OUT", "DK", "DV", "DQ"):
            sig[a] = "*bf16"
    for d in (128, 64):
        for cfg in W.WS_CONFIGS[kind]:
            kw = dict(cfg.kwargs)
            try:
                c = launch.compile_for_target(kern, sig, dict(H=4, D=d, NORM_COUNT=0, PADDED=1, SILU=2, GROUPED=1, **kw), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                rep = launch.ptxas_report(c)
                print(kind, d, kw, cfg.num_stages, "ws" if "setmaxnreg" in c.asm["ptx"] else "NO-WS", c.metadata.num_warps, c.metadata.shared, getattr(c.metadata, "global_scratch_size", None), re.findall(r"(\d+) bytes spill stores", rep)[:3])
            except Exception as e:
                print(kind, d, kw, "ERR", str(e)[-300:].replace("\n", " "))
