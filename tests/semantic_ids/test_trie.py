"""Prefix trie of semantic IDs: admits exactly the valid IDs, on host and under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from genrec_jax.semantic_ids.trie import Trie

from .conftest import random_unique_codes


def walk_all_paths(trie: Trie) -> set[tuple]:
    """Every path reachable through the CSR arrays (the data beam search walks)."""
    ptrs = [np.asarray(p) for p in trie.child_ptr]
    codes = [np.asarray(c) for c in trie.child_code]
    leaf = np.asarray(trie.leaf_item)
    out = set()

    def rec(level, node, prefix):
        for j in range(ptrs[level][node], ptrs[level][node + 1]):
            path = prefix + (int(codes[level][j]),)
            if level == trie.num_levels - 1:
                out.add(path + (int(leaf[j]),))
            else:
                rec(level + 1, j, path)

    rec(0, 0, ())
    return out


@given(
    sizes=st.lists(st.integers(2, 6), min_size=1, max_size=4).map(tuple),
    frac=st.floats(0.05, 1.0),
    seed=st.integers(0, 10_000),
)
def test_trie_admits_exactly_the_valid_ids(sizes, frac, seed):
    rng = np.random.default_rng(seed)
    space = int(np.prod(sizes))
    n = max(1, int(frac * space))
    table = random_unique_codes(rng, n, sizes)
    trie = Trie.from_item_codes(table, sizes)
    expected = {tuple(int(c) for c in table[i]) + (i,) for i in range(1, n + 1)}
    assert walk_all_paths(trie) == expected, "the CSR walk does not give exactly the catalogue's IDs"
    paths, items = trie.paths()
    assert {tuple(p) + (int(i),) for p, i in zip(paths, items)} == expected
    np.testing.assert_array_equal(trie.lookup(table[1:]), np.arange(1, n + 1))
    # A path that is not an item is refused.
    missing = [c for c in np.ndindex(*sizes) if tuple(c) not in {e[:-1] for e in expected}]
    if missing:
        assert trie.lookup(np.array(missing[:5])).tolist() == [0] * len(missing[:5])
    # The dense per-level masks (small levels) agree with the CSR children.
    for level in range(len(sizes)):
        mask = trie.dense_mask[level]
        assert mask is not None
        ptr, code = np.asarray(trie.child_ptr[level]), np.asarray(trie.child_code[level])
        for node in range(trie.num_nodes[level]):
            want = np.zeros(sizes[level], bool)
            want[code[ptr[node]:ptr[node + 1]]] = True
            np.testing.assert_array_equal(np.asarray(mask[node]), want)


def test_children_and_masks_under_jit_match_for_dense_and_csr_levels():
    rng = np.random.default_rng(3)
    sizes = (4, 5, 3)
    table = random_unique_codes(rng, 40, sizes)
    dense = Trie.from_item_codes(table, sizes)
    sparse = Trie.from_item_codes(table, sizes, dense_limit=0)  # CSR only
    assert all(m is None for m in sparse.dense_mask)

    @jax.jit
    def masks(trie):
        out = []
        for level in range(len(sizes)):
            nodes = jnp.arange(trie.num_nodes[level])
            out.append(trie.allowed_mask(level, nodes))
        return out

    for a, b in zip(masks(dense), masks(sparse)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Stepping along every item's codes under jit ends at that item.
    codes = jnp.asarray(table[1:])

    @jax.jit
    def walk(trie, codes):
        node = jnp.zeros(codes.shape[0], jnp.int32)
        for level in range(len(sizes)):
            node = trie.step(level, node, codes[:, level])
        return node

    np.testing.assert_array_equal(np.asarray(walk(sparse, codes)), np.arange(1, 41))


def test_duplicate_ids_are_rejected():
    table = np.array([[0, 0], [1, 2], [1, 2]])
    with pytest.raises(ValueError, match="not unique"):
        Trie.from_item_codes(table, (3, 3))


def test_trie_scales_to_large_codebooks():
    """[1024, 4096, 16384] codebooks: the big levels use CSR arrays, memory stays O(items)."""
    rng = np.random.default_rng(0)
    sizes = (1024, 4096, 16384, 4)
    n = 50_000
    codes = np.stack([rng.integers(0, k, n) for k in sizes[:3]] + [np.zeros(n, np.int64)], 1)
    codes = np.unique(codes, axis=0)
    trie = Trie.from_codes(codes, sizes)
    assert trie.dense_mask[0] is not None and trie.dense_mask[2] is None
    total = sum(int(np.asarray(p).nbytes) for p in trie.child_ptr) + sum(
        int(np.asarray(c).nbytes) for c in trie.child_code)
    assert total < 40 * len(codes) * 4, "CSR storage should be linear in the number of items"
    np.testing.assert_array_equal(trie.lookup(codes[:100]), np.arange(1, 101))
