"""hstu_tma.py = hstu_tma_v1.py + TMA descriptor loads (q/dO in the dK/dV kernel, k/v in the dQ kernel)."""
s = open("hstu_tma_v1.py").read()
def rep(a, b, n=1):
    global s
    c = s.count(a)
    assert c == n, (a[:80], c)
    s = s.replace(a, b)
rep("""    DQ_DESC, dq_row0, dq_col0,
    H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    MASK: tl.constexpr,  # 0: every pair visible (off-diagonal, keys < hist); 1: full mask""",
"""    DQ_DESC, dq_row0, dq_col0, Q_DESC, DO_DESC, do_col0,
    H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    MASK: tl.constexpr,  # 0: every pair visible (off-diagonal, keys < hist); 1: full mask
    TMA_LOADS: tl.constexpr,""")
rep("""        row_ok = offs_m < seq_len
        q = tl.load(Q + offs_m[:, None] * (H * DQK) + offs_dqk[None, :],
                    mask=row_ok[:, None] & (offs_dqk[None, :] < DQK), other=0.0)  # [BM, BDQK]
        do = tl.load(DO + offs_m[:, None] * (H * DV) + offs_dv[None, :],
                     mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)  # [BM, BDV]
""",
"""        row_ok = offs_m < seq_len
        if TMA_LOADS:
            q = Q_DESC.load([dq_row0 + start_m, dq_col0])  # rows past the sequence: masked below
            do = DO_DESC.load([dq_row0 + start_m, do_col0])
        else:
            q = tl.load(Q + offs_m[:, None] * (H * DQK) + offs_dqk[None, :],
                        mask=row_ok[:, None] & (offs_dqk[None, :] < DQK), other=0.0)  # [BM, BDQK]
            do = tl.load(DO + offs_m[:, None] * (H * DV) + offs_dv[None, :],
                         mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)  # [BM, BDV]
""")
rep("""            at = tl.where(vis, at, 0.0)
        dv = tl.dot(at.to(do.dtype), do, dv, input_precision=PRECISION)  # [BN, BDV]""",
"""            at = tl.where(vis, at, 0.0)
        if TMA_LOADS:
            if MASK == 0:
                at = tl.where(row_ok[None, :], at, 0.0)
        dv = tl.dot(at.to(do.dtype), do, dv, input_precision=PRECISION)  # [BN, BDV]""")
rep("""        if MASK == 1:
            dst = tl.where(vis, dst, 0.0)
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)  # [BN, BDQK]""",
"""        if MASK == 1:
            dst = tl.where(vis, dst, 0.0)
        if TMA_LOADS:
            if MASK == 0:
                dst = tl.where(row_ok[None, :], dst, 0.0)
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)  # [BN, BDQK]""")
rep("""    PADDED: tl.constexpr, ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr, SILU: tl.constexpr,
    NC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_NB: tl.constexpr, GROUPED: tl.constexpr,""",
"""    PADDED: tl.constexpr, ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr, SILU: tl.constexpr,
    NC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_NB: tl.constexpr, GROUPED: tl.constexpr, TMA_LOADS: tl.constexpr,""")
rep("""        dq_row0 = seq_start.to(tl.int32)
        dq_col0 = h * DQK
""", """        dq_row0 = seq_start.to(tl.int32)
        dq_col0 = h * DQK
        do_col0 = h * DV_DIM
        if TMA_LOADS:
            q_desc = tl.make_tensor_descriptor(Q, shape=[total_rows, H * DQK], strides=[H * DQK, 1],
                                               block_shape=[BLOCK_M, BLOCK_DQK])
            do_desc = tl.make_tensor_descriptor(DO, shape=[total_rows, H * DV_DIM], strides=[H * DV_DIM, 1],
                                                block_shape=[BLOCK_M, BLOCK_DV])
        else:
            q_desc = Q
            do_desc = DO
""")
s = s.replace("""num_buckets, dq_desc, dq_row0, dq_col0, H,""", """num_buckets, dq_desc, dq_row0, dq_col0, q_desc, do_desc, do_col0, H,""")
assert s.count("q_desc, do_desc, do_col0, H,") == 3
for m in ("DV_DIM, 1, NORM_COUNT", "DV_DIM, 0, NORM_COUNT"):
    s = s.replace(m, m.replace(", NORM_COUNT", ", TMA_LOADS, NORM_COUNT"))
assert s.count("TMA_LOADS, NORM_COUNT") == 3, s.count("TMA_LOADS, NORM_COUNT")
rep("""    K, V, TS, POS_BIAS, TIME_BIAS,  # offset to (sequence start, head)
    alpha, num_pos, num_buckets,
    H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    MASK: tl.constexpr,  # as in _fwd_range""",
"""    K, V, TS, POS_BIAS, TIME_BIAS,  # offset to (sequence start, head)
    alpha, num_pos, num_buckets,
    K_DESC, V_DESC, row0, k_col0, v_col0,
    H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    MASK: tl.constexpr,  # as in _fwd_range
    TMA_LOADS: tl.constexpr,""")
rep("""        if MASK == 0:
            k = tl.load(k_ptrs, mask=offs_dqk[None, :] < DQK, other=0.0)  # [BN, BDQK]
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < DV, other=0.0)  # [BN, BDV]
        else:""", """        if TMA_LOADS:
            k = K_DESC.load([row0 + start_n, k_col0])  # keys >= hi: their dS columns are zeroed
            v = V_DESC.load([row0 + start_n, v_col0])
        elif MASK == 0:
            k = tl.load(k_ptrs, mask=offs_dqk[None, :] < DQK, other=0.0)  # [BN, BDQK]
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < DV, other=0.0)  # [BN, BDV]
        else:""")
rep("""    num_pos, num_buckets, pad_rows,
    DQ,  # [T, H, DQK]
    H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    NORM_COUNT: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
    PADDED: tl.constexpr, PRECISION: tl.constexpr, SILU: tl.constexpr, NC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUPED: tl.constexpr,""",
"""    num_pos, num_buckets, pad_rows, total_rows,
    DQ,  # [T, H, DQK]
    SCRATCH,
    H: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    NORM_COUNT: tl.constexpr, HAS_TARGETS: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
    PADDED: tl.constexpr, PRECISION: tl.constexpr, SILU: tl.constexpr, NC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUPED: tl.constexpr, TMA_LOADS: tl.constexpr,""")
rep("""        dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
        a_end = tl.minimum(start_m, hist)""", """        dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
        row0 = seq_start.to(tl.int32)
        if TMA_LOADS:
            k_desc = tl.make_tensor_descriptor(K, shape=[total_rows, H * DQK], strides=[H * DQK, 1],
                                               block_shape=[BLOCK_N, BLOCK_DQK])
            v_desc = tl.make_tensor_descriptor(V, shape=[total_rows, H * DV], strides=[H * DV, 1],
                                               block_shape=[BLOCK_N, BLOCK_DV])
        else:
            k_desc = K
            v_desc = V
        a_end = tl.minimum(start_m, hist)""")
rep("""a_full, hist, K_seq, V_seq, TS_seq, POS_BIAS,
                       TIME_BIAS, alpha, num_pos, num_buckets, H, DQK, DV, 0, HAS_TARGETS""",
    """a_full, hist, K_seq, V_seq, TS_seq, POS_BIAS,
                       TIME_BIAS, alpha, num_pos, num_buckets, k_desc, v_desc, row0, h * DQK, h * DV, H, DQK, DV, 0,
                       TMA_LOADS, HAS_TARGETS""")
rep("""a_end, hist, K_seq, V_seq, TS_seq, POS_BIAS,
                       TIME_BIAS, alpha, num_pos, num_buckets, H, DQK, DV, 1, HAS_TARGETS""",
    """a_end, hist, K_seq, V_seq, TS_seq, POS_BIAS,
                       TIME_BIAS, alpha, num_pos, num_buckets, k_desc, v_desc, row0, h * DQK, h * DV, H, DQK, DV, 1,
                       TMA_LOADS, HAS_TARGETS""")
rep("""                       hist, K_seq, V_seq, TS_seq, POS_BIAS, TIME_BIAS, alpha, num_pos, num_buckets, H, DQK, DV, 2,
                       HAS_TARGETS""", """                       hist, K_seq, V_seq, TS_seq, POS_BIAS, TIME_BIAS, alpha, num_pos, num_buckets,
                       k_desc, v_desc, row0, h * DQK, h * DV, H, DQK, DV, 2, TMA_LOADS,
                       HAS_TARGETS""")
rep('DQ_MODES = {"separate": 0, "atomic": 1, "tma": 2, "store": 3}', 'DQ_MODES = {"separate": 0, "atomic": 1, "tma": 2, "store": 3, "nodq": 0}')
rep("    dq_atomic: int\n", "    dq_atomic: int\n    configs: tuple\n    mode: str\n    tma_loads: bool = False\n    nodq: bool = False\n")
rep("""    configs: tuple  # ((kernel kind, frozen config), ...) pinned by the caller
    mode: str
""", "")
rep("""                    GROUPED=self.max_seq_len >= GROUP_MIN_LEN)""",
    """                    GROUPED=self.max_seq_len >= GROUP_MIN_LEN,
                    **({"TMA_LOADS": self.tma_loads} if which in ("bwd", "dq") else {}))""")
rep("""    scratch = (b * st.heads * triton.cdiv(st.max_seq_len, 16) * SCRATCH_PER_PROGRAM + 128
               if st.dq_atomic == 2 else 1)""", """    scratch = (b * st.heads * triton.cdiv(st.max_seq_len, 16) * SCRATCH_PER_PROGRAM + 128
               if (st.dq_atomic == 2 or st.tma_loads) else 1)""")
rep("""    if st.dq_atomic:
        return dq.astype(q.dtype), dk, dv, dpos, dtime
    (dq,) = launch.triton_call(
        q, k, v, dout, starts, lens, targets, pos_bias, time_bias, ts, qts,
        st.alpha, st.inv_max_len, st.num_pos, st.num_buckets, st.pad_rows,
        kernel=st.kernel("dq"),
        out_shape=[jax.ShapeDtypeStruct((t, st.heads, st.dqk), q.dtype)],""",
"""    if st.dq_atomic:
        return dq.astype(q.dtype), dk, dv, dpos, dtime
    if st.nodq:  # timing only: the dK/dV kernel alone
        return jnp.zeros_like(q), dk, dv, dpos, dtime
    scratch = b * st.heads * triton.cdiv(st.max_seq_len, 16) * SCRATCH_PER_PROGRAM + 128 if st.tma_loads else 1
    (dq, _) = launch.triton_call(
        q, k, v, dout, starts, lens, targets, pos_bias, time_bias, ts, qts,
        st.alpha, st.inv_max_len, st.num_pos, st.num_buckets, st.pad_rows, t,
        kernel=st.kernel("dq"),
        out_shape=[jax.ShapeDtypeStruct((t, st.heads, st.dqk), q.dtype),
                   jax.ShapeDtypeStruct((triton.cdiv(scratch, 4),), jnp.int32)],""")
rep("""    dq_config: dict | None = None,
    launch_mode: str | None = None,
) -> jax.Array:
    \"\"\"HSTU self-attention over padded sequences;""", """    dq_config: dict | None = None,
    launch_mode: str | None = None,
    tma_loads: bool = False,
) -> jax.Array:
    \"\"\"HSTU self-attention over padded sequences;""")
rep("""        dq_atomic=_dq_atomic(dq_mode),
        configs=_pinned(fwd=fwd_config, bwd=bwd_config, dq=dq_config), mode=mode,
    )
    starts = jnp.arange(b, dtype=jnp.int32) * n""", """        dq_atomic=_dq_atomic(dq_mode), tma_loads=bool(tma_loads) and _block(dqk) == dqk and _block(dv) == dv,
        nodq=dq_mode == "nodq",
        configs=_pinned(fwd=fwd_config, bwd=bwd_config, dq=dq_config), mode=mode,
    )
    starts = jnp.arange(b, dtype=jnp.int32) * n""")
open("hstu_tma.py", "w").write(s)
print("written")
