"""Skip markers shared by the kernel tests: what each group of tests needs installed."""

from __future__ import annotations

import importlib.util

import jax
import pytest

HAVE_TRITON = importlib.util.find_spec("triton") is not None
HAVE_TORCH = importlib.util.find_spec("torch") is not None

needs_interpreter = pytest.mark.skipif(
    not (HAVE_TRITON and HAVE_TORCH),
    reason="needs triton and torch (CPU) for the Triton interpreter; CI installs neither (intended)",
)
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="needs triton (static sm_90 compile)")


def gpu_ready() -> bool:
    try:
        if not any(d.platform == "gpu" for d in jax.devices()):
            return False
        import jax_triton  # noqa: F401
    except Exception:
        return False
    return True


needs_gpu = pytest.mark.skipif(not gpu_ready(), reason="needs a CUDA GPU and jax-triton")
