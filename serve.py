#!/usr/bin/env python
"""Serve a trained checkpoint over HTTP. `python serve.py --help` for the options."""

import sys

from genrec_jax.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
