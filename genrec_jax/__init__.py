from genrec_jax.version import __version__
