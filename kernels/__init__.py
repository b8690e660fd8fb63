"""Triton kernels (installed as genrec_jax.kernels)."""
