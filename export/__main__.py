"""``python -m genrec_jax.export --checkpoint RUN_DIR --out DIR``: see ``genrec_jax.export.cli``."""

import sys

from genrec_jax.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
