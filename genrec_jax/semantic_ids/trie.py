"""Prefix trie of the valid semantic IDs, as dense arrays usable inside ``jax.jit``.

An item's semantic ID is a code path ``(c_0, ..., c_{L-1})`` (the RQ-VAE levels plus the
de-duplication level). The trie stores, per level ``d``, the children of every node at
depth ``d`` in CSR form::

    node n at depth d owns children  child_ptr[d][n] : child_ptr[d][n + 1]
    child_code[d][j]                 the code of child j (sorted within each node)
    child j is node j at depth d + 1 (nodes of a depth are numbered in (parent, code) order)
    leaf_item[j]                     the item id of child j at the last level

so memory is O(number of items) per level, whatever the codebook sizes (16384 codes and a
million items cost a few MB). A node's allowed codes are looked up by a fixed-width window
``child_ptr[d][n] + arange(max_fanout[d])`` (``children``) -- the form beam search uses,
because it only scores real continuations. For small levels (``num_nodes x codebook`` up to
``dense_limit`` entries) a dense boolean mask ``[num_nodes, codebook]`` is kept as well, so
``allowed_mask`` is one gather there; for large levels it is scattered from the CSR window.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_DENSE_LIMIT = 1 << 22  # entries of a dense [nodes, codes] mask kept per level


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trie:
    """Valid code paths of a catalogue. A pytree: pass it into jitted functions."""

    child_ptr: tuple[jax.Array, ...]  # per level d: int32 [num_nodes[d] + 1]
    child_code: tuple[jax.Array, ...]  # per level d: int32 [num_nodes[d + 1]]
    leaf_item: jax.Array  # int32 [num_items_in_trie]: item id of each last-level child
    dense_mask: tuple[jax.Array | None, ...]  # per level d: bool [num_nodes[d], K_d] or None
    code_sizes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    max_fanout: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    num_nodes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))  # per depth 0..L

    @property
    def num_levels(self) -> int:
        return len(self.code_sizes)

    @property
    def num_items(self) -> int:
        return self.num_nodes[-1]

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_codes(cls, codes: np.ndarray, code_sizes: Sequence[int], item_ids: np.ndarray | None = None,
                   dense_limit: int = DEFAULT_DENSE_LIMIT) -> "Trie":
        """Build from ``codes`` int [M, L] (one unique path per item) and their item ids
        (default ``1..M``, i.e. ``codes`` is the item -> code table without the padding row).

        Raises:
            ValueError: on out-of-range codes, a shape mismatch, or two items with one path.
        """
        codes = np.asarray(codes, dtype=np.int64)
        code_sizes = tuple(int(k) for k in code_sizes)
        if codes.ndim != 2 or codes.shape[1] != len(code_sizes):
            raise ValueError(f"codes must be [M, {len(code_sizes)}], got shape {codes.shape}")
        m, num_levels = codes.shape
        if m == 0:
            raise ValueError("a trie needs at least one item")
        if (codes < 0).any() or (codes >= np.asarray(code_sizes)[None, :]).any():
            raise ValueError(f"codes out of range for codebook sizes {code_sizes}")
        item_ids = np.arange(1, m + 1) if item_ids is None else np.asarray(item_ids, dtype=np.int64)
        if item_ids.shape != (m,):
            raise ValueError("need one item id per code row")
        order = np.lexsort(codes.T[::-1])  # lexicographic by (c_0, c_1, ...)
        sc = codes[order]
        group = np.zeros(m, np.int64)  # node id at the current depth of each sorted row
        num_nodes = [1]
        ptrs, child_codes, masks, fanouts = [], [], [], []
        for d in range(num_levels):
            new = np.ones(m, bool)
            new[1:] = (group[1:] != group[:-1]) | (sc[1:, d] != sc[:-1, d])
            parent = group[new]
            code = sc[new, d]
            ptr = np.searchsorted(parent, np.arange(num_nodes[d] + 1)).astype(np.int32)
            ptrs.append(ptr)
            child_codes.append(code.astype(np.int32))
            fanouts.append(int(np.diff(ptr).max()))
            if num_nodes[d] * code_sizes[d] <= dense_limit:
                mask = np.zeros((num_nodes[d], code_sizes[d]), bool)
                mask[parent, code] = True
                masks.append(jnp.asarray(mask))
            else:
                masks.append(None)
            group = np.cumsum(new) - 1
            num_nodes.append(int(new.sum()))
        if num_nodes[-1] != m:
            dup = np.nonzero(~np.concatenate([[True], (np.diff(sc, axis=0) != 0).any(axis=1)]))[0]
            a, b = item_ids[order[dup[0] - 1]], item_ids[order[dup[0]]]
            raise ValueError(f"semantic IDs are not unique: items {a} and {b} share code {sc[dup[0]].tolist()}")
        return cls(
            child_ptr=tuple(jnp.asarray(p) for p in ptrs),
            child_code=tuple(jnp.asarray(c) for c in child_codes),
            leaf_item=jnp.asarray(item_ids[order].astype(np.int32)),
            dense_mask=tuple(masks),
            code_sizes=code_sizes,
            max_fanout=tuple(fanouts),
            num_nodes=tuple(num_nodes),
        )

    @classmethod
    def from_item_codes(cls, item_codes: np.ndarray, code_sizes: Sequence[int],
                        dense_limit: int = DEFAULT_DENSE_LIMIT) -> "Trie":
        """From the item -> code table ``[N + 1, L]`` whose row 0 is padding."""
        item_codes = np.asarray(item_codes)
        return cls.from_codes(item_codes[1:], code_sizes, np.arange(1, len(item_codes)), dense_limit)

    # ------------------------------------------------------------------ jit-side queries

    def children(self, level: int, node: jax.Array):
        """Fixed-width view of the children of ``node`` (int [...], nodes at depth ``level``).

        Returns ``(codes, next_node, valid)``, each [..., max_fanout[level]]: the allowed codes,
        the child node ids at depth ``level + 1`` (item ids at the last level; 0 where
        invalid) and which slots are real. ``level`` is a Python int (static).
        """
        f = self.max_fanout[level]
        ptr = self.child_ptr[level]
        start = jnp.take(ptr, node, axis=0)
        stop = jnp.take(ptr, node + 1, axis=0)
        idx = start[..., None] + jnp.arange(f, dtype=jnp.int32)
        valid = idx < stop[..., None]
        idx = jnp.where(valid, idx, 0)
        codes = jnp.take(self.child_code[level], idx, axis=0)
        nxt = jnp.take(self.leaf_item, idx, axis=0) if level == self.num_levels - 1 else idx
        return jnp.where(valid, codes, 0), jnp.where(valid, nxt, 0), valid

    def allowed_mask(self, level: int, node: jax.Array) -> jax.Array:
        """bool [..., K_level]: which codes may follow the prefix that ``node`` stands for."""
        if self.dense_mask[level] is not None:
            return jnp.take(self.dense_mask[level], node, axis=0)
        codes, _, valid = self.children(level, node)
        lead = node.shape
        flat_codes = codes.reshape(-1, codes.shape[-1])
        flat_valid = valid.reshape(-1, codes.shape[-1])
        rows = jnp.arange(flat_codes.shape[0])[:, None]
        mask = jnp.zeros((flat_codes.shape[0], self.code_sizes[level]), bool)
        mask = mask.at[rows, flat_codes].max(flat_valid)
        return mask.reshape(*lead, self.code_sizes[level])

    def mask_logits(self, level: int, node: jax.Array, logits: jax.Array) -> jax.Array:
        """``logits`` [..., K_level] with the codes the trie does not allow set to -inf."""
        return jnp.where(self.allowed_mask(level, node), logits, -jnp.inf)

    def step(self, level: int, node: jax.Array, code: jax.Array) -> jax.Array:
        """Child of ``node`` reached by ``code`` (-1 where that code is not allowed)."""
        codes, nxt, valid = self.children(level, node)
        hit = valid & (codes == code[..., None])
        return jnp.where(hit.any(-1), jnp.sum(jnp.where(hit, nxt, 0), -1), -1)

    # ------------------------------------------------------------------ host-side queries

    def lookup(self, codes: np.ndarray) -> np.ndarray:
        """Item id of each code path int [B, L] (0 where the path is not in the trie)."""
        codes = np.asarray(codes, dtype=np.int64).reshape(-1, self.num_levels)
        node = np.zeros(len(codes), np.int64)
        ok = np.ones(len(codes), bool)
        ptrs = [np.asarray(p) for p in self.child_ptr]
        ccodes = [np.asarray(c) for c in self.child_code]
        for d in range(self.num_levels):
            lo, hi = ptrs[d][node], ptrs[d][node + 1]
            pos = np.array([lo[i] + np.searchsorted(ccodes[d][lo[i]:hi[i]], codes[i, d]) for i in range(len(codes))],
                           dtype=np.int64)
            hit = (pos < hi) & (ccodes[d][np.minimum(pos, len(ccodes[d]) - 1)] == codes[:, d])
            ok &= hit
            node = np.where(ok, pos, 0)
        return np.where(ok, np.asarray(self.leaf_item)[node], 0).astype(np.int64)

    def paths(self) -> tuple[np.ndarray, np.ndarray]:
        """Every code path the trie admits, as (codes int [M, L], item ids [M])."""
        ptrs = [np.asarray(p) for p in self.child_ptr]
        ccodes = [np.asarray(c) for c in self.child_code]
        num_levels = self.num_levels
        # Walk back from the leaves: parent of child j at depth d+1 is the node whose range holds j.
        out = np.zeros((self.num_items, num_levels), np.int64)
        node = np.arange(self.num_items)
        for d in range(num_levels - 1, -1, -1):
            out[:, d] = ccodes[d][node]
            node = np.searchsorted(ptrs[d], node, side="right") - 1
        return out, np.asarray(self.leaf_item).astype(np.int64)
