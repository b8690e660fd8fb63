"""The semantic-ID side of serving: beam-search driver, trie, and cold-start registration.

Kept apart from the engine so that ``mode="generative"`` and ``POST /v1/items`` plug in
``genrec_jax.semantic_ids`` (decoder, trie, beam search, RQ-VAE, cold start) without the
engine knowing their internals. Two independent capabilities:

* generation needs the semantic-ID decoder in the checkpoint (``model.decoder``);
* cold start needs the RQ-VAE (the run's ``semantic_ids/`` folder): a new item is placed
  as ``cold_start.add_items`` places it with the served model (``cold_start.place_items``:
  content-bridge voters, the decoder's beams for a pseudo-user of those voters when the
  checkpoint has a decoder, else the items nearest the voters' mean embedding with training
  popularity), so it is recommendable (both modes), rankable and usable in histories at once.

Without them the engine still serves retrieval and ranking; these features answer 409.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from genrec_jax.serve.errors import Conflict, RequestError


@dataclasses.dataclass
class Registration:
    """New items' semantic IDs and embeddings (from ``cold_start.place_items``)."""

    codes: np.ndarray  # int32 [M, L]
    neighbours: list[np.ndarray]  # per new item: existing internal ids its embedding averages
    embeddings: np.ndarray  # float32 [M, D]: their retrieval embeddings (mean of the neighbours' rows)
    trie: object  # the grown Trie
    semantic_ids: object  # the grown SemanticIDs (taken by ``commit``)


class SemanticSide:
    def __init__(self, model, semantic_dir: Path | None = None, item_popularity: np.ndarray | None = None):
        self.search: Callable | None = None
        self.trie = None
        self.decoder_reason = None
        if getattr(model, "decoder", None) is None:
            self.decoder_reason = ("this checkpoint has no semantic-ID decoder (trained with "
                                   "model.decoder.enabled=false); use mode=retrieval")
        else:
            from genrec_jax.semantic_ids.beam_search import decoder_beam_search
            from genrec_jax.semantic_ids.trie import Trie

            self.search = decoder_beam_search
            self.trie = Trie.from_item_codes(np.asarray(model.item_codes[...], np.int32), model.decoder.code_sizes)
        # Repeat-aware decoder (model.decoder.history_bias): beam search takes the history
        # items' semantic IDs, looked up on the host in the live code table (grows with
        # registrations).
        self.repeat_aware = getattr(getattr(model, "decoder", None), "repeat_bias", None) is not None
        self.repeat_item_mode = self.repeat_aware and model.decoder.cfg.history_bias_mode == "item"
        # The live item -> code table and its prefix sizes (host): the semantic IDs of history
        # items (repeat-aware decoders) and of excluded items (dropped inside the search).
        self.live_codes = self._sizes = None
        if self.can_generate:
            self._set_live_codes(np.asarray(model.item_codes[...], np.int32))
        self.semantic_dir = semantic_dir
        self.has_decoder = getattr(model, "decoder", None) is not None
        # Training interaction counts [N + 1] (placement without a decoder); new items count 0.
        self.item_popularity = None if item_popularity is None else np.asarray(item_popularity, np.float64)
        if self.item_popularity is not None and len(self.item_popularity) != int(model.num_items) + 1:
            raise ValueError(f"item_popularity has {len(self.item_popularity)} rows; the model has "
                             f"{int(model.num_items)} items (+1 padding row)")
        self._sid = None  # SemanticIDs with the RQ-VAE: loaded by the first registration

    @property
    def can_generate(self) -> bool:
        return self.search is not None

    def require_decoder(self) -> None:
        if not self.can_generate:
            raise Conflict(self.decoder_reason)

    # ----------------------------------------------------------------- cold start

    def cold_start_reason(self) -> str | None:
        """Why new items cannot be registered (None when they can)."""
        d = self.semantic_dir
        if d is None or not (d / "meta.json").is_file() or not (d / "codes.npy").is_file():
            return ("this checkpoint has no RQ-VAE (no semantic_ids/ folder from `python train.py --stage rqvae`), "
                    "so new items cannot get semantic IDs")
        try:
            import genrec_jax.semantic_ids.cold_start  # noqa: F401
        except ImportError:
            return "cold-start registration needs genrec_jax.semantic_ids.cold_start, missing from this build"
        return None

    def feature_width(self) -> int | None:
        sid = self._semantic_ids()
        return None if sid.rqvae is None else int(sid.rqvae.in_dim)

    def _semantic_ids(self):
        if self._sid is None:
            from genrec_jax.semantic_ids.train_rqvae import load_semantic_ids

            self._sid = load_semantic_ids(self.semantic_dir, with_model=True)
            if self._sid.rqvae is None:
                raise Conflict(f"{self.semantic_dir} holds semantic IDs but not the RQ-VAE that made them")
        return self._sid

    def item_codes(self) -> np.ndarray:
        """The live item -> semantic ID table int32 [N + 1, L] (registered items included)."""
        return self._semantic_ids().codes

    def register(self, features: Sequence[Sequence[float]], num_items: int, item_embeddings: np.ndarray,
                 model=None) -> Registration:
        """Semantic IDs and embeddings for new items (raw content vectors, like the
        catalogue's), placed as ``cold_start.add_items`` does with the served model.

        ``num_items``: items the engine has now (the IDs must agree); ``item_embeddings``
        float32 [num_items + 1, D]: their retrieval embeddings as served; ``model``: the
        served model with its decoder (its item table covering every live item), or None
        without a decoder. Nothing here changes ``model`` or the served state (``commit``
        adopts the result).
        """
        reason = self.cold_start_reason()
        if reason:
            raise Conflict(reason)
        from genrec_jax.semantic_ids import cold_start

        sid = self._semantic_ids()
        if sid.num_items != num_items:
            raise Conflict(f"the semantic IDs cover {sid.num_items} items, the served model {num_items}: "
                           "were they made for another run?")
        width = self.feature_width()
        rows = [len(f) for f in features]
        bad = [i for i, n in enumerate(rows) if n != width]
        if bad:
            raise RequestError(f"items[{bad[0]}].features", f"{rows[bad[0]]} values; the RQ-VAE takes {width}")
        emb = np.asarray(item_embeddings, np.float32)
        if len(emb) != num_items + 1:
            raise ValueError(f"item_embeddings has {len(emb)} rows for {num_items} items (+1 padding row)")
        pop = self.item_popularity
        if pop is not None:  # items registered since start have no training interactions
            pop = np.pad(pop, (0, num_items + 1 - len(pop)))
        try:
            res = cold_start.place_items(model if self.has_decoder else None, sid, np.asarray(features, np.float32),
                                         item_embeddings=emb, item_popularity=pop)
        except cold_start.CapacityError as e:
            raise Conflict(str(e)) from None
        except ValueError as e:
            raise RequestError("items", str(e)) from None
        neighbours = [np.asarray(n) for n in res.neighbours]
        return Registration(np.asarray(res.codes, np.int32), neighbours, cold_start.neighbour_mean(emb, neighbours),
                            res.trie, res.semantic_ids)

    def commit(self, reg: Registration) -> None:
        """Adopt a registration once the engine serves it (the next one builds on it)."""
        self._sid = reg.semantic_ids
        if self.can_generate:
            self.trie = reg.trie
        if self.can_generate:
            self._set_live_codes(np.concatenate([self.live_codes, np.asarray(reg.codes, np.int32)]))

    def _set_live_codes(self, codes: np.ndarray) -> None:
        from genrec_jax.semantic_ids.decoder import prefix_sizes

        self.live_codes = codes
        self._sizes = np.asarray(prefix_sizes(codes))

    def code_arrays(self, rows: Sequence[np.ndarray], batch: int, width: int, marks: bool) -> tuple:
        """(codes int32 [batch, width, L], valid bool [batch, width], marks bool [batch,
        width, L] or None) of each row's item ids (internal; rows past ``len(rows)`` empty);
        marks: where each item's path is unique (``prefix_sizes == 1``)."""
        codes = np.zeros((batch, width, self.live_codes.shape[1]), np.int32)
        valid = np.zeros((batch, width), bool)
        unique = np.zeros(codes.shape, bool) if marks else None
        for r, items in enumerate(rows):
            items = np.asarray(items, np.int64)[-width:] if len(items) else np.zeros(0, np.int64)
            codes[r, :len(items)] = self.live_codes[items]
            valid[r, :len(items)] = items > 0
            if marks:
                unique[r, :len(items)] = self._sizes[items] == 1
        return codes, valid, unique

    def history_codes(self, windows: Sequence, batch: int, max_len: int) -> tuple:
        """``code_arrays`` of the windows' items for a repeat-aware decoder (marks in "item"
        mode, see ``decoder.history_marks``)."""
        return self.code_arrays([w.items for w in windows], batch, max_len, self.repeat_item_mode)

    def exclusion_codes(self, excludes: Sequence[np.ndarray], batch: int, width: int) -> tuple:
        """``code_arrays`` of each row's excluded items, with marks (beam_search's ``exclude``)."""
        return self.code_arrays(excludes, batch, width, True)
