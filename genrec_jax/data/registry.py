"""Load the data set a DataConfig names (synthetic, Amazon P5, MovieLens-1M)."""

from __future__ import annotations

from genrec_jax.config import DataConfig
from genrec_jax.data.types import Dataset


def load_dataset(cfg: DataConfig) -> Dataset:
    if cfg.dataset == "synthetic":
        from genrec_jax.data.synthetic import generate_synthetic

        s = cfg.synthetic
        return generate_synthetic(
            num_users=s.num_users, num_items=s.num_items, num_clusters=s.num_clusters,
            num_categories=s.num_categories, num_tags=s.num_tags, min_len=s.min_len, max_len=s.max_len,
            zipf_exponent=s.zipf_exponent, markov_weight=s.markov_weight, seed=s.seed,
        )
    directory = cfg.resolved_dir()
    if directory is None:
        raise FileNotFoundError(
            f"data.dataset={cfg.dataset!r} needs a data directory: set data.data_dir in the config "
            "(--set data.data_dir=/path) or the GENREC_DATA_DIR environment variable; "
            "`python -m genrec_jax.data.fetch --help` downloads the public data sets"
        )
    if cfg.dataset == "amazon":
        from genrec_jax.data.p5 import load_p5

        return load_p5(directory, name=directory.name)
    if cfg.dataset == "movielens":
        from genrec_jax.data.movielens import load_movielens_1m

        return load_movielens_1m(directory)
    raise ValueError(f"data.dataset: unknown data set {cfg.dataset!r}")
