"""Small fixtures shared by the semantic-ID tests."""

import numpy as np
import pytest


def random_unique_codes(rng: np.random.Generator, num_items: int, sizes: tuple[int, ...]) -> np.ndarray:
    """int32 [num_items + 1, L] item -> code table with unique rows (row 0 = padding)."""
    space = int(np.prod(sizes))
    if num_items > space:
        raise ValueError("not enough distinct codes")
    flat = rng.choice(space, num_items, replace=False)
    codes = np.stack(np.unravel_index(flat, sizes), axis=1)
    return np.concatenate([np.zeros((1, len(sizes)), np.int64), codes]).astype(np.int32)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
