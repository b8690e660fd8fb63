#!/usr/bin/env python
"""Train genrec-jax. `python train.py --help` for the options; no arguments = synthetic preset."""

import sys

from genrec_jax.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
