"""RQ-VAE (Zeghidour et al. 2021; TIGER, Rajput et al. 2023): item content vector -> L codes.

    z     = Enc(x)                                      MLP, latent [B, D]
    r_0   = z;  c_l = argmin_k ||r_l - e_{l,k}||;  r_{l+1} = r_l - e_{l,c_l}    (l = 0..L-1)
    z_q   = sum_l e_{l,c_l};   x_hat = Dec(z + sg(z_q - z))   (straight-through gradients)
    loss  = ||x - x_hat||^2 + sum_l ||sg(r_l) - e_{l,c_l}||^2 + beta ||r_l - sg(e_{l,c_l})||^2

Codebooks are initialised by k-means on the first batch's residuals, level by level, and
codes no training batch picked for ``dead_code_every`` steps are restarted on random
residuals of the current batch. :func:`deduplicate` then appends one more level so that
every item's semantic ID is unique: items sharing all L codes get 0, 1, 2, ... there.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from genrec_jax.config import RQVAEConfig
from genrec_jax.model.layers import Dense, param


class RQVAE(nnx.Module):
    def __init__(self, in_dim: int, cfg: RQVAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.in_dim = in_dim
        dims = [in_dim, *cfg.hidden_dims, cfg.latent_dim]
        self.encoder = nnx.List([Dense(a, b, axes=("embed", "mlp"), rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        rdims = dims[::-1]
        self.decoder = nnx.List([Dense(a, b, axes=("mlp", "embed"), rngs=rngs) for a, b in zip(rdims[:-1], rdims[1:])])
        self.codebooks = nnx.List([
            param(rngs, nnx.initializers.normal(1.0 / np.sqrt(cfg.latent_dim)), (k, cfg.latent_dim), ("codebook", None))
            for k in cfg.codebook_sizes
        ])

    @property
    def code_sizes(self) -> tuple[int, ...]:
        return tuple(self.cfg.codebook_sizes)

    @staticmethod
    def _mlp(layers, x):
        for i, layer in enumerate(layers):
            x = layer(x)
            if i < len(layers) - 1:
                x = jax.nn.silu(x)
        return x

    def encode(self, x: jax.Array) -> jax.Array:
        return self._mlp(self.encoder, x)  # [B, D]

    def decode(self, z: jax.Array) -> jax.Array:
        return self._mlp(self.decoder, z)  # [B, F]

    def quantize(self, z: jax.Array, num_levels: int | None = None):
        """Greedy residual quantisation: (z_q [B, D], codes int32 [B, L], residuals [L, B, D])."""
        r = z
        zq = jnp.zeros_like(z)
        codes, residuals = [], []
        for cb in list(self.codebooks)[:num_levels]:
            e = cb[...]
            residuals.append(r)
            c = jnp.argmin(sq_dist(r, e), axis=-1)
            q = jnp.take(e, c, axis=0)
            codes.append(c.astype(jnp.int32))
            zq = zq + q
            r = r - q
        return zq, jnp.stack(codes, -1), jnp.stack(residuals, 0)

    def __call__(self, x: jax.Array):
        """Total loss and its parts for a batch of content vectors ``x`` [B, F]."""
        z = self.encode(x)
        r = z
        zq = jnp.zeros_like(z)
        q_loss = 0.0
        codes = []
        for cb in self.codebooks:
            e = cb[...]
            c = jnp.argmin(sq_dist(jax.lax.stop_gradient(r), e), axis=-1)
            q = jnp.take(e, c, axis=0)
            # codebook term pulls e to r; commitment term pulls r (the encoder) to e.
            q_loss = q_loss + jnp.mean(jnp.sum(jnp.square(jax.lax.stop_gradient(r) - q), -1))
            q_loss = q_loss + self.cfg.commitment_weight * jnp.mean(
                jnp.sum(jnp.square(r - jax.lax.stop_gradient(q)), -1))
            codes.append(c.astype(jnp.int32))
            zq = zq + q
            r = r - jax.lax.stop_gradient(q)
        z_st = z + jax.lax.stop_gradient(zq - z)  # straight-through estimator
        x_hat = self.decode(z_st)
        recon = jnp.mean(jnp.sum(jnp.square(x - x_hat), -1))
        loss = recon + q_loss
        return loss, {"loss": loss, "reconstruction": recon, "quantization": q_loss,
                      "codes": jnp.stack(codes, -1)}


def sq_dist(x: jax.Array, e: jax.Array) -> jax.Array:
    """Squared Euclidean distances [B, K] between rows of x [B, D] and e [K, D]."""
    return (jnp.sum(x * x, -1, keepdims=True) - 2.0 * x @ e.T + jnp.sum(e * e, -1)[None, :])


# --------------------------------------------------------------------------- k-means


@jax.jit
def _assign(x: jax.Array, c: jax.Array) -> jax.Array:
    return jnp.argmin(sq_dist(x, c), axis=-1)


def _assign_chunked(x: np.ndarray, c: np.ndarray, chunk: int = 8192) -> np.ndarray:
    cj = jnp.asarray(c)
    return np.concatenate([np.asarray(_assign(jnp.asarray(x[s:s + chunk]), cj)) for s in range(0, len(x), chunk)])


def kmeans(x: np.ndarray, k: int, *, rng: np.random.Generator, iters: int = 20) -> np.ndarray:
    """Lloyd's k-means: centroids [k, D]. With fewer distinct points than ``k`` the extra
    centroids are points plus small noise; empty clusters are re-seeded on the points
    farthest from their centroid."""
    x = np.asarray(x, np.float32)
    n = len(x)
    if n >= k:
        c = x[rng.choice(n, k, replace=False)].copy()
    else:
        c = x[rng.choice(n, k, replace=True)].copy()
        c += 0.01 * x.std() * rng.standard_normal(c.shape).astype(np.float32)
    for _ in range(iters):
        a = _assign_chunked(x, c)
        counts = np.bincount(a, minlength=k)
        sums = np.zeros_like(c)
        np.add.at(sums, a, x)
        nonempty = counts > 0
        c[nonempty] = sums[nonempty] / counts[nonempty, None]
        empty = np.flatnonzero(~nonempty)
        if len(empty) and n >= k:
            d = np.sum(np.square(x - c[a]), -1)
            far = np.argsort(-d)[: len(empty)]
            c[empty] = x[far]
    return c


def kmeans_init(model: RQVAE, x: np.ndarray, rng: np.random.Generator) -> None:
    """Set each codebook to k-means centroids of its level's residuals on ``x`` (in place)."""
    z = np.asarray(jax.jit(model.encode)(jnp.asarray(x)))
    r = z
    for cb in model.codebooks:
        c = kmeans(r, cb[...].shape[0], rng=rng)
        cb[...] = jnp.asarray(c)
        r = r - c[_assign_chunked(r, c)]


def restart_dead_codes(model: RQVAE, usage: np.ndarray | Sequence[np.ndarray], x: np.ndarray,
                       rng: np.random.Generator) -> list[int]:
    """Move every code with zero ``usage`` (per level, counts since the last restart) onto a
    random residual of ``x`` at its level. Returns the number restarted per level."""
    _, _, res = jax.jit(model.quantize)(model.encode(jnp.asarray(x)))
    res = np.asarray(res)
    restarted = []
    for level, cb in enumerate(model.codebooks):
        dead = np.flatnonzero(np.asarray(usage[level]) == 0)
        restarted.append(len(dead))
        if not len(dead):
            continue
        pick = rng.choice(len(x), len(dead), replace=len(dead) > len(x))
        noise = 0.01 * rng.standard_normal((len(dead), res.shape[-1])).astype(np.float32) * (res[level].std() + 1e-6)
        cb[...] = cb[...].at[jnp.asarray(dead)].set(jnp.asarray(res[level][pick] + noise))
    return restarted


# --------------------------------------------------------------------------- codes


def encode_codes(model: RQVAE, x: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """RQ codes int32 [M, L] of content vectors ``x`` [M, F]."""
    fn = jax.jit(lambda v: model.quantize(model.encode(v))[1])
    return np.concatenate([np.asarray(fn(jnp.asarray(x[s:s + chunk]))) for s in range(0, len(x), chunk)]
                          ) if len(x) else np.zeros((0, len(model.codebooks)), np.int32)


def reconstruction_error(model: RQVAE, x: np.ndarray) -> float:
    """Mean squared error per item (summed over features) of Dec(quantised Enc(x))."""
    fn = jax.jit(lambda v: jnp.sum(jnp.square(v - model.decode(model.quantize(model.encode(v))[0])), -1))
    return float(np.mean(np.concatenate([np.asarray(fn(jnp.asarray(x[s:s + 8192]))) for s in range(0, len(x), 8192)])))


def deduplicate(codes: np.ndarray) -> np.ndarray:
    """Append the de-duplication level: items sharing all codes get 0, 1, 2... in row order.

    ``codes`` int [M, L] -> int32 [M, L + 1], every row unique.
    """
    codes = np.asarray(codes, np.int64)
    m = len(codes)
    if m == 0:
        return np.zeros((0, codes.shape[1] + 1), np.int32)
    order = np.lexsort(np.concatenate([np.arange(m)[None, :], codes.T[::-1]], axis=0))  # by codes, then row
    sc = codes[order]
    start = np.ones(m, bool)
    start[1:] = (sc[1:] != sc[:-1]).any(axis=1)
    group_start = np.maximum.accumulate(np.where(start, np.arange(m), 0))
    dup = np.empty(m, np.int64)
    dup[order] = np.arange(m) - group_start
    return np.concatenate([codes, dup[:, None]], axis=1).astype(np.int32)


def collision_rate(codes: np.ndarray) -> float:
    """Share of items whose RQ codes (before de-duplication) another item already has:
    ``1 - #distinct code tuples / #items``."""
    codes = np.asarray(codes)
    if len(codes) == 0:
        return 0.0
    return float(1.0 - len(np.unique(codes, axis=0)) / len(codes))


def utilisation(codes: np.ndarray, code_sizes: Sequence[int]) -> list[float]:
    """Share of each level's codebook that at least one item uses."""
    return [float(len(np.unique(codes[:, level])) / k) for level, k in enumerate(code_sizes)]
