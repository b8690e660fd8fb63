"""Build variant copies of kernels/hstu_attention.py by text substitution (dev experiments)."""
import importlib.util, sys, pathlib, re

SRC = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "hstu_attention.py"

PP_FN = '''
@triton.jit
def _fwd_range_pp(
    acc, q, offs_m, pos_m, qts_m, lo, hi, hist, K, V, TS, POS_BIAS, TIME_BIAS, alpha, num_pos, num_buckets,
    H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, MASK: tl.constexpr,
    HAS_TARGETS: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, PRECISION: tl.constexpr,
    SILU: tl.constexpr, NC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Unmasked key blocks, S of the next block issued before SiLU and AV of this one."""
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    if SILU == 0:
        scale = alpha
    else:
        scale = 0.5 * alpha
    if lo < hi:
        offs_n = lo + tl.arange(0, BLOCK_N)
        k = tl.load(K + offs_n[:, None] * (H * DQK) + offs_dqk[None, :])
        x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        for start_n in range(lo + BLOCK_N, hi, BLOCK_N):
            v = tl.load(V + (start_n - BLOCK_N + tl.arange(0, BLOCK_N))[:, None] * (H * DV) + offs_dv[None, :])
            k = tl.load(K + (start_n + tl.arange(0, BLOCK_N))[:, None] * (H * DQK) + offs_dqk[None, :])
            x_next = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            a = _silu_pre(x, SILU)
            acc = tl.dot(a.to(v.dtype), v, acc, input_precision=PRECISION)
            x = x_next
        v = tl.load(V + (hi - BLOCK_N + tl.arange(0, BLOCK_N))[:, None] * (H * DV) + offs_dv[None, :])
        a = _silu_pre(x, SILU)
        acc = tl.dot(a.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc


# --------------------------------------------------------------------------- forward
'''

NC_FN = '''
@triton.jit
def _table_nc(TABLE, idx):
    """TABLE[idx] (f32) by one ld.global.nc per element: opaque to the pipeliner."""
    base = TABLE.to(tl.int64)
    return tl.inline_asm_elementwise(
        "{ .reg .u64 t; mul.wide.s32 t, $2, 4; add.u64 t, t, $1; ld.global.nc.f32 $0, [t]; }",
        "=f,l,r", [base + tl.zeros_like(idx).to(tl.int64), idx], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _fwd_range('''

SUBS = {
    "base": [],
    # warp specialisation on the forward key loop
    "ws": [("    for start_n in range(lo, hi, BLOCK_N):\n        offs_n = start_n + tl.arange(0, BLOCK_N)  # [BN] key rows",
            "    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):\n        offs_n = start_n + tl.arange(0, BLOCK_N)  # [BN] key rows")],
    # forward with no table loads (the bias from the indices by arithmetic): cost of the gathers
    "pp": [("\n# --------------------------------------------------------------------------- forward\n", PP_FN),
           ("        acc = _fwd_range(acc, q, offs_m, pos_m, qts_m, 0, a_full, hist,",
            "        acc = _fwd_range_pp(acc, q, offs_m, pos_m, qts_m, 0, a_full, hist,")],
    "nc": [("\n@triton.jit\ndef _fwd_range(", NC_FN),
           ("            x += bias_scale * tl.load(POS_BIAS + rel)", "            x += bias_scale * _table_nc(POS_BIAS, rel)"),
           ("            x += bias_scale * tl.load(TIME_BIAS + _time_bucket(qts_m[:, None] - ts_n[None, :], num_buckets))",
            "            x += bias_scale * _table_nc(TIME_BIAS, _time_bucket(qts_m[:, None] - ts_n[None, :], num_buckets))")],
    "no_hist": [("            for t in range(t_lo, t_hi + 1):\n                tot = tl.sum(tl.where(bkt == t, dst, 0.0))",
                 "            for t in range(t_lo, t_lo):\n                tot = tl.sum(tl.where(bkt == t, dst, 0.0))")],
    "no_posgrad": [("        if HAS_POS:\n            # History rows (i < hist)", "        if HAS_POS and ATOMIC_DQ == 2:\n            # History rows (i < hist)")],
    "hist_rows": [("            for t in range(t_lo, t_hi + 1):\n                tot = tl.sum(tl.where(bkt == t, dst, 0.0))\n                dtime += tl.where(offs_nb == t, tot, 0.0)",
                   "            for t in range(t_lo, t_hi + 1):\n                row = tl.sum(tl.where(bkt == t, dst, 0.0), axis=1)\n                dtime += tl.where(offs_nb[None, :] == t, row[:, None], 0.0)"),
                  ("        dtime = tl.zeros([BLOCK_NB], dtype=tl.float32)", "        dtime = tl.zeros([BLOCK_N, BLOCK_NB], dtype=tl.float32)"),
                  ("            tl.atomic_add(DTIME + offs_nb, dtime, mask=offs_nb < num_buckets, sem=\"relaxed\")",
                   "            tl.atomic_add(DTIME + offs_nb, tl.sum(dtime, axis=0), mask=offs_nb < num_buckets, sem=\"relaxed\")")],
    "nogather": [("            x += bias_scale * tl.load(POS_BIAS + rel)", "            x += bias_scale * rel.to(tl.float32) * 0.001"),
                 ("            x += bias_scale * tl.load(TIME_BIAS + _time_bucket(qts_m[:, None] - ts_n[None, :], num_buckets))",
                  "            x += bias_scale * _time_bucket(qts_m[:, None] - ts_n[None, :], num_buckets).to(tl.float32) * 0.001")],
}


def load(name):
    text = SRC.read_text()
    for a, b in SUBS[name]:
        assert a in text, (name, a[:60])
        text = text.replace(a, b)
    path = pathlib.Path("/tmp") / f"hstu_variant_{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"hstu_variant_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod
