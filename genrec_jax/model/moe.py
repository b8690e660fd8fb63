"""Mixture-of-experts feed-forward block (OneRec's MoE FFN).

    p      = softmax(W_r · x)                       router probabilities over E experts
    S      = top-k(p)                               chosen experts per token
    g_e    = p_e / Σ_{e' in S} p_e'   (e in S)      gates, summing to 1 over the chosen
    y      = Σ_{e in S} g_e · W2_e · GELU(W1_e · x)

Three executions of the same routing, all dropless (every token reaches its k experts,
no capacity) and equal on the same routing (tested):
* ``blocked``: token copies sorted by expert, each expert's group padded to a multiple of
  a block of M rows, and the blocks pushed through one batched matmul against their
  expert's weights (selected per block by a one-hot product, so the weight gradient is a
  matmul too). Work: the real top-k FLOPs plus at most E·(M-1) padding rows, plus the
  per-block weight copies. The default.
* ``dropless``: the same sorted copies through ``jax.lax.ragged_dot``. XLA lowers it on
  CPU -- and, by default, on GPU -- by masking every row against every expert's weights,
  i.e. E times the real FLOPs (``bench/moe.py`` measures the three).
* ``dense``: every expert on every token, combined with the (mostly zero) gates; works on
  any JAX version.

Expert parallelism (an ``expert`` mesh axis > 1): with ``moe.dispatch="xla"`` the routing
stays global and XLA's partitioner places it; with ``"all_to_all"`` each device routes its
own tokens, sends every token copy to the device that holds its expert (a fixed number of
slots per receiver, ``moe.capacity_factor``; 0 = room for all, dropless) with one
all-to-all, runs its local experts through the routing above, and a second all-to-all
returns the outputs (equal to the one-device layer when nothing is dropped; tested on 8
host devices).

Auxiliary losses: Switch-style load balance E · Σ_e f_e · P_e (f_e: share of routed token
copies, P_e: mean router probability) and the router z-loss mean(logsumexp(logits)²).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from genrec_jax.config import MoEConfig
from genrec_jax.model.layers import dropout, param
from genrec_jax.ops.grouped_matmul import grouped_matmul

HAS_RAGGED_DOT = hasattr(jax.lax, "ragged_dot")
_ROUTINGS = {"blocked": "_experts_blocked", "dropless": "_experts_dropless", "dense": "_experts_dense"}


@jax.custom_vjp
def gather_rows(x: jax.Array, idx: jax.Array, inv: jax.Array) -> jax.Array:
    """``x[idx]`` with zero rows where ``idx`` is out of range, for a one-to-one ``idx``:
    ``inv`` is its inverse (``idx[inv[j]] == j`` for every row j of x that is read, and out
    of range for rows that are not). The gradient is then the gather ``dout[inv]`` -- XLA
    otherwise writes the gradient of a gather as a scatter-add, which on GPUs adds 16-bit
    rows by atomic compare-and-swap loops (0.30 ms per MoE layer at the `base` shape, for
    64 MB of rows)."""
    return x.at[idx].get(mode="fill", fill_value=0)


def _gather_rows_fwd(x, idx, inv):
    return gather_rows(x, idx, inv), inv


def _gather_rows_bwd(inv, g):
    return g.at[inv].get(mode="fill", fill_value=0), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def block_rows(copies: int, num_experts: int, cap: int) -> int:
    """Rows per block of the ``blocked`` routing: the power of two nearest above the mean
    rows per expert, at least 8 (small batches pad little) and at most ``cap``."""
    mean = max(1, -(-copies // num_experts))
    return int(max(1, min(cap, max(8, 1 << (mean - 1).bit_length()))))


class MoEFFN(nnx.Module):
    def __init__(self, embed_dim: int, cfg: MoEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 routing: str | None = None):
        self.cfg, self.dtype = cfg, dtype
        self.routing = routing or cfg.routing
        if self.routing == "dropless" and not HAS_RAGGED_DOT:
            self.routing = "blocked"
        e, f = cfg.num_experts, cfg.expert_dim
        self.router = param(rngs, nnx.initializers.normal(0.02), (embed_dim, e), ("embed", None))
        self.w1 = param(rngs, nnx.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=(0,)),
                        (e, embed_dim, f), ("exp", "embed", "mlp"))
        self.b1 = param(rngs, nnx.initializers.zeros, (e, f), ("exp", "mlp"))
        self.w2 = param(rngs, nnx.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=(0,)),
                        (e, f, embed_dim), ("exp", "mlp", "embed"))
        self.b2 = param(rngs, nnx.initializers.zeros, (e, embed_dim), ("exp", "embed"))

    def route(self, x: jax.Array, router: jax.Array | None = None):
        """Router logits [T, E], chosen experts [T, k] and their gates [T, k]."""
        logits = jnp.dot(x.astype(jnp.float32), self.router[...] if router is None else router)
        probs = jax.nn.softmax(logits, axis=-1)
        top_p, top_e = jax.lax.top_k(probs, self.cfg.top_k)
        gates = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
        return logits, probs, top_e, gates

    def _experts_dense(self, x, top_e, gates, w1, b1, w2, b2, kernel_ok=True):
        h = jnp.einsum("td,edf->tef", x, w1) + b1
        y = jnp.einsum("tef,efd->ted", jax.nn.gelu(h), w2) + b2
        combine = jnp.sum(jax.nn.one_hot(top_e, w1.shape[0], dtype=gates.dtype) * gates[..., None], axis=1)
        return jnp.einsum("ted,te->td", y, combine.astype(y.dtype))

    def _experts_dropless(self, x, top_e, gates, w1, b1, w2, b2, kernel_ok=True):
        t, k = top_e.shape
        e = w1.shape[0]
        flat_e = top_e.reshape(-1)  # [T*k], copy c of token c // k
        order = jnp.argsort(flat_e, stable=True)  # a permutation: sorted copy -> copy
        # Every gather below reads a permutation (unique indices), so its gradient is a plain
        # permuted write, not a scatter-add of many rows into few; the k copies of a token
        # are summed by a reshape.
        xs = jnp.repeat(x, k, axis=0).at[order].get(unique_indices=True)  # [T*k, D]
        sizes = jnp.bincount(flat_e, length=e).astype(jnp.int32)
        es = jax.nn.one_hot(flat_e[order], e, dtype=self.dtype)  # [T*k, E] expert of each row
        h = jax.lax.ragged_dot(xs, w1, sizes) + es @ b1
        y = jax.lax.ragged_dot(jax.nn.gelu(h), w2, sizes)
        y = y + es @ b2
        y = y * gates.reshape(-1).at[order].get(unique_indices=True).astype(y.dtype)[:, None]
        inverse = jnp.argsort(order)  # copy -> its row in the sorted order
        return y.at[inverse].get(unique_indices=True).reshape(t, k, -1).sum(axis=1)

    def _experts_blocked(self, x, top_e, gates, w1, b1, w2, b2, kernel_ok=True):
        """``kernel_ok``: the arrays are this device's own (no mesh, or inside a per-shard
        map), so the Triton grouped matmul may run (``moe.kernel``)."""
        t, k = top_e.shape
        if not isinstance(t, int):  # symbolic batch (shape-polymorphic export): no static block count
            return self._experts_dense(x, top_e, gates, w1, b1, w2, b2)
        e, d = w1.shape[0], x.shape[-1]
        n = t * k
        m = block_rows(n, e, self.cfg.block_size)
        tiles = -(-(n + e * (m - 1)) // m)  # static bound on the padded blocks
        flat_e = top_e.reshape(-1)  # [n], copy c of token c // k
        # Each copy's rank among the copies routed to its expert (in copy order, what a stable
        # sort by expert gives) from a running count per expert: no sort, whose GPU lowering
        # is several kernel launches per layer.
        onehot = jax.nn.one_hot(flat_e, e, dtype=jnp.int32)  # [n, E]
        seen = jnp.cumsum(onehot, axis=0)  # copies so far per expert, this one included
        sizes = seen[-1]
        rank = jnp.sum(seen * onehot, axis=1) - 1
        padded = (sizes + m - 1) // m * m
        pend = jnp.cumsum(padded)
        # padded row of each copy: its expert's padded start + its rank within the expert
        row = ((pend - padded)[flat_e] + rank).astype(jnp.int32)
        src = jnp.full(tiles * m, n, jnp.int32).at[row].set(jnp.arange(n, dtype=jnp.int32), unique_indices=True)
        # Padding rows point past the end and read zeros; every real row is read once, so
        # each gradient is the inverse gather (``gather_rows``), and the k copies of a token
        # sum by a reshape.
        xp = gather_rows(jnp.repeat(x, k, axis=0), src, row).reshape(tiles, m, d)
        # compare_all: E comparisons per block. The default binary search is a loop, which
        # XLA runs as host-driven iterations (one per bit of E) in every layer of every step.
        block_e = jnp.minimum(jnp.searchsorted(pend, jnp.arange(tiles) * m, side="right", method="compare_all"),
                              e - 1)
        oh = jax.nn.one_hot(block_e, e, dtype=self.dtype)  # [tiles, E]

        backend = self.cfg.kernel if kernel_ok else "xla"

        def blocks(xp, oh, w1, b1, w2, b2):
            # x[t] @ w[expert of block t]: the reference copies each block's expert weights
            # (one-hot product); the Triton kernels read them in place (moe.kernel)
            h = grouped_matmul(xp, w1, block_e, backend=backend) + (oh @ b1)[:, None, :]
            return grouped_matmul(jax.nn.gelu(h), w2, block_e, backend=backend) + (oh @ b2)[:, None, :]

        if self.cfg.remat_blocks:  # keep only the inputs for the backward pass, not the copies
            blocks = jax.checkpoint(blocks)
        y = blocks(xp, oh, w1, b1, w2, b2)
        y = gather_rows(y.reshape(tiles * m, d), row, src)  # [n, D] in copy order
        y = y * gates.reshape(-1).astype(y.dtype)[:, None]
        return y.reshape(t, k, d).sum(axis=1)

    def _all_to_all(self, fn, x, router, w1, b1, w2, b2, *, devices: int):
        """One device's part of expert-parallel dispatch (inside ``shard_map``): ``x`` [T, D]
        its tokens, ``w*`` its E / ``devices`` experts. Each token copy goes to slot
        (rank among this device's copies for that receiver) of the receiver holding its
        expert; one all-to-all sends the slots, ``fn`` runs the local experts on what
        arrived, a second all-to-all brings the outputs back to the copies' slots. Returns
        (y, logits, probs, chosen experts, kept copies [T, k])."""
        logits, probs, top_e, gates = self.route(x, router)
        t, k = top_e.shape
        d, local = x.shape[-1], w1.shape[0]
        cap = t * k if self.cfg.capacity_factor <= 0 else max(1, -(-int(self.cfg.capacity_factor * t * k) // devices))
        cap = min(cap, t * k)
        flat_e = top_e.reshape(-1)
        dest = flat_e // local  # receiving device along the expert axis
        order = jnp.argsort(dest, stable=True)
        counts = jnp.bincount(dest, length=devices)
        rank_sorted = jnp.arange(t * k) - (jnp.cumsum(counts) - counts)[dest[order]]
        rank = jnp.zeros(t * k, jnp.int32).at[order].set(rank_sorted.astype(jnp.int32), unique_indices=True)
        kept = rank < cap
        slot = jnp.where(kept, dest * cap + rank, devices * cap)  # out of range = dropped
        send = jnp.zeros((devices * cap, d), x.dtype).at[slot].set(jnp.repeat(x, k, axis=0), mode="drop",
                                                                  unique_indices=True)
        send_e = jnp.full(devices * cap, -1, jnp.int32).at[slot].set(flat_e % local, mode="drop",
                                                                      unique_indices=True)
        recv = jax.lax.all_to_all(send.reshape(devices, cap, d), "expert", 0, 0).reshape(devices * cap, d)
        recv_e = jax.lax.all_to_all(send_e.reshape(devices, cap), "expert", 0, 0).reshape(devices * cap)
        # empty slots run through expert 0 with a zero gate (static shapes)
        y = fn(recv, jnp.maximum(recv_e, 0)[:, None], (recv_e >= 0).astype(x.dtype)[:, None], w1, b1, w2, b2)
        back = jax.lax.all_to_all(y.reshape(devices, cap, d), "expert", 0, 0).reshape(devices * cap, d)
        yc = back.at[slot].get(mode="fill", fill_value=0) * gates.reshape(-1).astype(y.dtype)[:, None]
        return yc.reshape(t, k, d).sum(axis=1), logits, probs, top_e, kept.reshape(t, k)

    def _expert_parallel(self, fn, x, w):
        """``_all_to_all`` under ``shard_map`` when the mesh allows it (expert axis > 1,
        tensor axis 1, the tokens split over the expert axis, experts divisible over it);
        None otherwise."""
        from jax.sharding import PartitionSpec as P

        from genrec_jax.sharding import _spec_entry, batch_axes

        mesh = jax.sharding.get_abstract_mesh()
        sizes = dict(mesh.shape)
        n = sizes.get("expert", 1)
        axes = batch_axes(sizes, x.shape[0])
        if (self.cfg.dispatch != "all_to_all" or n <= 1 or sizes.get("tensor", 1) > 1 or "expert" not in axes
                or self.cfg.num_experts % n):
            return None
        tok = P(_spec_entry(axes), None)
        exp = P("expert")
        body = lambda x, router, w1, b1, w2, b2: self._all_to_all(fn, x, router, w1, b1, w2, b2, devices=n)
        return jax.shard_map(body, mesh=mesh, in_specs=(tok, P(), exp, exp, exp, exp),
                             out_specs=(tok, tok, tok, tok, tok), check_vma=False)(
            x, w["router"], w["w1"], w["b1"], w["w2"], w["b2"])

    def _routed(self, fn, x):
        """Route the tokens and run ``fn`` (one of the routings) on their copies; returns
        (y, router logits, probabilities, chosen experts).

        Top-k and the sort of the copies by expert are global operations that XLA's
        partitioner does not split over a sharded token axis: it would gather every token
        onto every device and run all of them there. Under a mesh whose expert and tensor
        axes are 1 (data / fsdp parallel) routing is per token, so each shard routes its own
        tokens (``sharding.per_shard``); the weights are gathered as FSDP gathers them
        anyway, and their gradients summed. With experts or hidden units split over devices
        the global form stays, and XLA places it."""
        dt = self.dtype
        w = dict(router=self.router[...], w1=self.w1[...].astype(dt), b1=self.b1[...].astype(dt),
                 w2=self.w2[...].astype(dt), b2=self.b2[...].astype(dt))

        def local(x, router, **w):
            logits, probs, top_e, gates = self.route(x, router)
            return fn(x, top_e, gates, **w), logits, probs, top_e

        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.empty and self.cfg.dispatch == "all_to_all":
            out = self._expert_parallel(fn, x, w)
            if out is not None:
                return out
        if mesh.empty:
            return local(x, **w)
        if mesh.shape.get("expert", 1) > 1 or mesh.shape.get("tensor", 1) > 1:  # global, placed by XLA
            fn = functools.partial(fn, kernel_ok=False)
            return local(x, **w)
        from genrec_jax.sharding import per_shard

        tok = ("batch", None)
        return per_shard(local, dict(x=x, **w),
                         dict(x=tok, router=(None,) * 2, w1=(None,) * 3, b1=(None,) * 2, w2=(None,) * 3,
                              b2=(None,) * 2), (tok,) * 4)

    def __call__(self, x: jax.Array, valid: jax.Array | None = None, key: jax.Array | None = None,
                 routing: str | None = None):
        """x [..., D] -> (y [..., D], aux). ``valid`` marks real tokens (padding is excluded
        from the balance statistics)."""
        shape = x.shape
        xt = x.reshape(-1, shape[-1]).astype(self.dtype)
        mode = routing or self.routing
        if mode not in _ROUTINGS:
            raise ValueError(f"moe.routing: unknown routing {mode!r}; expected one of {sorted(_ROUTINGS)}")
        if mode == "dropless" and not HAS_RAGGED_DOT:
            raise ValueError("moe.routing: 'dropless' needs jax.lax.ragged_dot, which this JAX lacks; use 'blocked'")
        y, logits, probs, top_e, *kept = self._routed(getattr(self, _ROUTINGS[mode]), xt)
        m = jnp.ones(xt.shape[0], jnp.float32) if valid is None else valid.reshape(-1).astype(jnp.float32)
        denom = jnp.maximum(jnp.sum(m), 1.0)
        e = self.cfg.num_experts
        assign = jnp.sum(jax.nn.one_hot(top_e, e), axis=1) * m[:, None]  # [T, E] copies per expert
        load = jnp.sum(assign, axis=0) / (denom * self.cfg.top_k)  # f_e, sums to 1
        importance = jnp.sum(probs * m[:, None], axis=0) / denom  # P_e
        balance = e * jnp.sum(load * importance)
        z = jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * m) / denom
        aux = {
            "moe_balance_loss": self.cfg.balance_loss_weight * balance,
            "moe_z_loss": self.cfg.z_loss_weight * z,
            "moe_load_max": jnp.max(load) * e,  # 1.0 = perfectly even
            "moe_load_min": jnp.min(load) * e,
        }
        if kept:  # explicit expert-parallel dispatch: share of the real tokens' copies dropped
            aux["moe_dropped"] = 1.0 - jnp.sum(jnp.mean(kept[0].astype(jnp.float32), axis=1) * m) / denom
        return y.reshape(shape).astype(x.dtype), aux


class DenseFFN(nnx.Module):
    """Plain two-layer GELU feed-forward block with the same call signature as MoEFFN."""

    def __init__(self, embed_dim: int, ffn_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, dropout_rate: float = 0.0):
        from genrec_jax.model.layers import Dense

        self.fc1 = Dense(embed_dim, ffn_dim, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = Dense(ffn_dim, embed_dim, axes=("mlp", "embed"), rngs=rngs, dtype=dtype)
        self.dropout_rate = dropout_rate

    def __call__(self, x, valid=None, key=None):
        return self.fc2(dropout(jax.nn.gelu(self.fc1(x)), self.dropout_rate, key)), {}
