#!/usr/bin/env python
"""Semantic-ID benchmarks: the quality bars of the generative half.

    python bench/semantic_ids.py synthetic [--json rows.jsonl]
        RQ-VAE on the synthetic catalogue (3 x 256 codes): codebook utilisation per level,
        collision rate before de-duplication; then a UGT with the decoder, 50 planted
        cold-start items registered with add_items, and how many of them beam search
        (top-50) retrieves for test users of their cluster.

    GENREC_DATA_DIR=/path python bench/semantic_ids.py beauty [--fit train+valid] [--set k=v]
                                 [--eval-split valid] [--history kept|removed|both]
        Amazon Beauty (TIGER's split): RQ-VAE over co-occurrence vectors (training events
        only) -> UGT + decoder trained jointly -> test Recall@5/10, NDCG@5/10 of beam search
        beside the retrieval head and the transition / popularity baselines, all fitted on
        the same events (--fit train: every user's events but the last two; train+valid:
        all but the last, i.e. everything before the test target). With repeat-aware
        decoding (the preset's model.decoder.history_bias) the same model's beams are also
        scored with the offsets set to 0 (rows "generative (beam), offsets 0").
        --history kept|removed|both: history items left in the ranking (the protocol of the
        published rows), dropped from it after the search, or both.

Both print a table; ``--json PATH`` writes one JSON object per row. No FLOP formula: these
are quality benchmarks (wall-clock seconds are reported per stage).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_rows  # noqa: E402
from genrec_jax.config import load_config, preset_path  # noqa: E402
from genrec_jax.eval.evaluate import evaluate_baselines, format_table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

SYNTHETIC_OVERRIDES = [
    "data.dataset=synthetic", "data.max_seq_len=32", "data.batch_size=64", "data.bucket_sizes=[16,32]",
    "model.embed_dim=48", "model.num_layers=2", "model.num_heads=2", "model.attn_dim=24", "model.linear_dim=24",
    "model.dropout=0.2", "model.decoder.enabled=true", "model.decoder.num_layers=1", "model.decoder.num_heads=2",
    "model.decoder.head_dim=32", "model.decoder.ffn_dim=128", "model.decoder.positions_per_seq=0",
    "model.decoder.beam_width=50", "train.num_steps=1500", "train.warmup_steps=100", "train.learning_rate=0.002",
    "train.eval_every=0", "train.checkpoint_every=0", "train.log_every=100", "eval.ks=[5,10,20,50]",
    "eval.batch_size=256", "rqvae.num_steps=2000",
]


def _train(cfg, out: Path, fit: str, progress: bool, resume: bool = False):
    """setup + train_loop on the events ``fit`` names (data.fit); ``resume``: continue the
    run in ``out`` from its latest checkpoint (to train.num_steps)."""
    import dataclasses

    from genrec_jax.train.loop import save_checkpoint, setup, train_loop

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, fit=fit))
    ctx = setup(cfg, out, progress=progress, resume=resume)
    ctx.start_step = ctx.step
    t0 = time.perf_counter()
    train_loop(ctx)
    if ctx.checkpointer.latest_step() != ctx.step:
        save_checkpoint(ctx, ctx.step)
    ctx.train_seconds = time.perf_counter() - t0
    return ctx


def _test_rows(ctx, ks: list[int], beam_width: int, max_users: int = 0, renormalized: bool = False,
               split: str = "test", history: str = "kept", extra_beams: tuple[int, ...] = ()) -> dict[str, dict]:
    """Retrieval head, beam search and the baselines on ``split`` (test or valid), with
    history items left in the ranking (``history="kept"``), removed from it (``"removed"``,
    rows tagged ``", history removed"``) or both. ``extra_beams``: beam search again at these
    widths on the same model (rows ``"generative (beam W)"``), a paired comparison."""
    from genrec_jax.semantic_ids.generative_eval import evaluate_generative
    from genrec_jax.semantic_ids.trie import Trie
    from genrec_jax.eval.evaluate import evaluate_model
    from genrec_jax.train.loop import collate_options

    cfg, ds = ctx.cfg, ctx.dataset
    es = getattr(ctx.split, split)
    opts = collate_options(cfg, ds, train=False)
    model = ctx.steps.model(ctx.state["params"])
    trie = Trie.from_item_codes(np.asarray(model.item_codes[...]), model.decoder.code_sizes)
    rows = {}
    for excl in {"kept": [False], "removed": [True], "both": [False, True]}[history]:
        tag = ", history removed" if excl else ""
        t0 = time.perf_counter()
        rows["retrieval head" + tag] = evaluate_model(
            ctx.steps, ctx.state["params"], es, num_items=ds.num_items, max_len=cfg.data.max_seq_len,
            ks=ks, batch_size=cfg.eval.batch_size, progress=False, options=opts, max_users=max_users,
            exclude_history=excl)
        rows["retrieval head" + tag]["seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows["generative (beam)" + tag] = evaluate_generative(
            model, es, trie=trie, max_len=cfg.data.max_seq_len, ks=ks, batch_size=cfg.eval.batch_size,
            beam_width=beam_width, options=opts, max_users=max_users, exclude_history=excl)
        rows["generative (beam)" + tag]["seconds"] = time.perf_counter() - t0
        if renormalized:  # softmax over the trie's allowed codes only, at every level
            rows["generative (beam, renorm.)" + tag] = evaluate_generative(
                model, es, trie=trie, max_len=cfg.data.max_seq_len, ks=ks, batch_size=cfg.eval.batch_size,
                beam_width=beam_width, options=opts, max_users=max_users, renormalize=True, exclude_history=excl)
        for w in extra_beams:
            t0 = time.perf_counter()
            rows[f"generative (beam {w})" + tag] = evaluate_generative(
                model, es, trie=trie, max_len=cfg.data.max_seq_len, ks=ks, batch_size=cfg.eval.batch_size,
                beam_width=w, options=opts, max_users=max_users, exclude_history=excl)
            rows[f"generative (beam {w})" + tag]["seconds"] = time.perf_counter() - t0
        if getattr(model.decoder, "repeat_bias", None) is not None:  # same model, offsets set to 0: the
            # plain decoder's beams (a detached run's model is trained exactly as without the option)
            import jax.numpy as jnp

            plain = ctx.steps.model(ctx.state["params"])
            plain.decoder.repeat_bias[...] = jnp.zeros_like(plain.decoder.repeat_bias[...])
            t0 = time.perf_counter()
            rows["generative (beam), offsets 0" + tag] = evaluate_generative(
                plain, es, trie=trie, max_len=cfg.data.max_seq_len, ks=ks, batch_size=cfg.eval.batch_size,
                beam_width=beam_width, options=opts, max_users=max_users, exclude_history=excl)
            rows["generative (beam), offsets 0" + tag]["seconds"] = time.perf_counter() - t0
        base = evaluate_baselines(ctx.fit_events, es, num_items=ds.num_items, ks=ks, max_users=max_users,
                                  exclude_history=excl)
        rows.update({f"{name} baseline{tag}": r for name, r in base.items()})
    return rows


# --------------------------------------------------------------------------- beauty


def bench_beauty(args) -> list[dict]:
    from genrec_jax.semantic_ids.train_rqvae import run_rqvae

    cfg = load_config(args.config or REPO / "configs" / "beauty_generative.yaml", args.overrides)
    out = Path(args.out or "runs/bench_beauty")
    ids_done = (out / "semantic_ids" / "meta.json").is_file() and (out / "semantic_ids" / "report.json").is_file()
    if args.resume and ids_done:  # a run cut short (e.g. by a time limit): keep its IDs and checkpoints
        if args.ids_from == "retrieval":
            raise SystemExit("--resume keeps the semantic IDs of the run in --out; it does not support "
                             "--ids-from retrieval (run without --resume)")
        report = json.loads((out / "semantic_ids" / "report.json").read_text())
        rq_seconds = 0.0
        print(f"resuming {out}: semantic IDs kept, training continues from the latest checkpoint")
    else:
        if out.exists():
            shutil.rmtree(out)
        t0 = time.perf_counter()
        if args.ids_from == "retrieval":  # stage 0: a retrieval-only model's item table -> RQ-VAE input
            cfg = retrieval_ids_config(cfg, out, args)
        report = run_rqvae(cfg, out, progress=args.progress)
        rq_seconds = time.perf_counter() - t0
    resume = args.resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    ctx = _train(cfg, out, args.fit, args.progress, resume=resume)
    rows = _test_rows(ctx, [5, 10, 20], cfg.model.decoder.beam_width, args.max_users, renormalized=args.renorm,
                      split=args.eval_split, history=args.history, extra_beams=args.extra_beams)
    ctx.logger.close()
    ctx.checkpointer.close()
    cols = ["Recall@5", "NDCG@5", "Recall@10", "NDCG@10", "Recall@20"]
    es = getattr(ctx.split, args.eval_split)
    print(f"\nAmazon Beauty {args.eval_split} set ({len(es)} users, {ctx.dataset.num_items} items), "
          f"leave-one-out, fitted on: {args.fit}; {cfg.train.num_steps} steps "
          f"({'resumed at ' + str(ctx.start_step) + ', ' if ctx.start_step else ''}{ctx.train_seconds:.0f} s), "
          f"RQ-VAE {rq_seconds:.0f} s; semantic IDs from {cfg.rqvae.features} vectors")
    print(format_table(rows, cols))
    print("published TIGER: Recall@5 0.0454  NDCG@5 0.0321  Recall@10 0.0648  NDCG@10 0.0384")
    tags = {"kept": [""], "removed": [", history removed"], "both": ["", ", history removed"]}[args.history]
    for tag in tags:
        ret = rows["retrieval head" + tag]
        for name in ["generative (beam)"] + [f"generative (beam {w})" for w in args.extra_beams]:
            ratio = rows[name + tag]["Recall@10"] / ret["Recall@10"] if ret["Recall@10"] > 0 else float("nan")
            print(f"{name} / retrieval Recall@10{tag}: {ratio:.3f}")
    print(f"semantic IDs: utilisation {[round(u, 3) for u in report['utilisation']]}, collision rate "
          f"{report['collision_rate']:.4f}")
    out_rows = [{"bench": "beauty", "model": name, "fit": args.fit, "split": args.eval_split,
                 "steps": cfg.train.num_steps, "seed": cfg.train.seed, "overrides": list(args.overrides), "ids_from": args.ids_from,
                 **{k: v for k, v in r.items() if k in cols + ["MRR", "Coverage", "seconds"]}}
                for name, r in rows.items()]
    out_rows.append({"bench": "beauty", "model": "rqvae", **{k: report[k] for k in (
        "utilisation", "collision_rate", "reconstruction_mse", "code_sizes")}})
    return out_rows


def retrieval_ids_config(cfg, out: Path, args):
    """Train the encoder with the retrieval head only (``--ids-steps`` steps, same fit events),
    save its L2-normalised item table as ``<out>/retrieval_items.npy`` and return ``cfg``
    with ``rqvae.features=file`` pointing at it (collaborative IDs from the retrieval model)."""
    import copy

    c0 = copy.deepcopy(cfg)
    c0.model.decoder.enabled = False
    c0.train.num_steps = args.ids_steps
    c0.train.warmup_steps = min(c0.train.warmup_steps, args.ids_steps // 10)
    ctx = _train(c0, out / "retrieval_ids", args.fit, args.progress)
    model = ctx.steps.model(ctx.state["params"])
    table = np.array(model.item_table(), np.float32)
    table[0] = 0.0
    ctx.logger.close()
    ctx.checkpointer.close()
    path = out / "retrieval_items.npy"
    np.save(path, table)
    print(f"retrieval-only stage: {args.ids_steps} steps in {ctx.train_seconds:.0f} s -> {path}")
    c1 = copy.deepcopy(cfg)
    c1.rqvae.features = "file"
    c1.rqvae.features_path = str(path)
    return c1


# --------------------------------------------------------------------------- synthetic


def cold_start_retrievability(model, sid, ds, split, cfg, *, num_new: int, seed: int, k: int = 50,
                              users_per_item: int = 20, popular_among: int = 10) -> dict:
    """Register ``num_new`` planted items and beam-search (top-k) for test users of each one's
    cluster. An item is retrievable when it is in the top-k of at least half of them.

    ``add_items`` sees only the new items' content, the RQ-VAE, the model and the training
    popularity; the planted clusters pick the test users and nothing else."""
    from genrec_jax.data.synthetic import generate_cold_start_items
    from genrec_jax.data.sequences import collate_eval
    from genrec_jax.semantic_ids.beam_search import make_recommend_fn
    from genrec_jax.semantic_ids.cold_start import add_items
    import jax
    from flax import nnx

    feats, clusters = generate_cold_start_items(ds, num_new, seed)
    res = add_items(model, sid, feats.dense_matrix()[1:], item_popularity=ds.item_popularity(split.train),
                    popular_among=popular_among)
    fn = make_recommend_fn(model, beam_width=max(k, cfg.model.decoder.beam_width), k=k, uniform_last_level=True)
    state = nnx.state(model)
    graphdef = nnx.graphdef(model)

    @jax.jit
    def retrieval_top_k(state, batch):  # the retrieval head over the grown item table
        m = nnx.merge(graphdef, state)
        states, _ = m.encode(batch)
        scores = m.score_items(m.user_vectors(m.last_states(states, batch["lengths"])))
        return jax.lax.top_k(scores[:, 1:], k)[1] + 1

    user_cluster = ds.extras["user_cluster"][split.test.history.user_index]
    rng = np.random.default_rng(seed)
    shares, shares_ret = [], []
    for item, c in zip(res.item_ids, clusters[1:]):
        users = np.flatnonzero(user_cluster == c)
        users = rng.choice(users, min(users_per_item, len(users)), replace=False)
        batch = collate_eval(split.test, users, cfg.data.max_seq_len)
        batch = {key: v for key, v in batch.items() if key != "history_items"}
        items, _ = fn(state, batch, res.trie)
        shares.append(float(np.mean((np.asarray(items) == item).any(1))))
        shares_ret.append(float(np.mean((np.asarray(retrieval_top_k(state, batch)) == item).any(1))))
    shares, shares_ret = np.asarray(shares), np.asarray(shares_ret)
    return {"retrievable": float(np.mean(shares >= 0.5)), "in_top_k_of_any_user": float(np.mean(shares > 0)),
            "mean_user_share": float(shares.mean()),
            "retrievable_retrieval_head": float(np.mean(shares_ret >= 0.5)),
            "mean_user_share_retrieval_head": float(shares_ret.mean()), "num_new": num_new, "k": k,
            "old_ids_unchanged": bool((res.semantic_ids.codes[: sid.num_items + 1] == sid.codes).all())}


def bench_synthetic(args) -> list[dict]:
    import jax
    from flax import nnx

    from genrec_jax.semantic_ids.train_rqvae import load_semantic_ids, run_rqvae

    cfg = load_config(args.config or preset_path("tiny"), SYNTHETIC_OVERRIDES + [
        "data.synthetic={num_users: 2000, num_items: 1000, num_clusters: 10, num_categories: 20, num_tags: 64, "
        "min_len: 8, max_len: 60, seed: 0}", "rqvae.codebook_sizes=[256,256,256]", "rqvae.latent_dim=32",
        "rqvae.hidden_dims=[256,128]", "rqvae.batch_size=1024"] + args.overrides)
    out = Path(args.out or "runs/bench_synthetic")
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    report = run_rqvae(cfg, out, progress=args.progress)
    rq_seconds = time.perf_counter() - t0
    rows = [{"bench": "synthetic", "model": "rqvae", "code_sizes": report["code_sizes"],
             "utilisation": report["utilisation"], "min_utilisation": min(report["utilisation"]),
             "collision_rate": report["collision_rate"], "reconstruction_mse": report["reconstruction_mse"],
             "seconds": rq_seconds}]
    print(f"\nRQ-VAE on {report['num_items']} synthetic items, codes {report['code_sizes']}:")
    print(f"  utilisation per level {[round(u, 3) for u in report['utilisation']]} (bar >= 0.90)")
    print(f"  collision rate before de-duplication {report['collision_rate']:.4f} (bar <= 0.05)")
    if args.skip_model:
        return rows
    ctx = _train(cfg, out, "train", args.progress)
    test = _test_rows(ctx, [5, 10, 20, 50], cfg.model.decoder.beam_width, args.max_users)
    ctx.logger.close()
    ctx.checkpointer.close()
    print(format_table(test, ["Recall@10", "NDCG@10", "Recall@50"]))
    rows += [{"bench": "synthetic", "model": n, **{k: v for k, v in r.items() if "@" in k or k == "seconds"}}
             for n, r in test.items()]
    sid = load_semantic_ids(out / "semantic_ids")
    seeds = [int(v) for v in str(args.cold_start_seeds).split(",")]
    for i, seed in enumerate(seeds):
        # a fresh copy of the trained model per draw: add_items grows it in place
        model = nnx.merge(ctx.steps.graphdef, *(jax.tree.map(lambda a: a.copy(), t)
                                                 for t in (ctx.state["params"], ctx.steps.rest)))
        cs = cold_start_retrievability(model, sid, ctx.dataset, ctx.split, cfg, num_new=args.num_new, seed=seed,
                                       popular_among=args.popular_among)
        label = "cold start" if i == 0 else f"cold start, draw seed {seed}"
        print(f"{label}: {cs['num_new']} planted items, retrievable (top-{cs['k']} for >= half of 20 users of "
              f"their cluster) {cs['retrievable']:.3f} (bar >= 0.95); in the top-{cs['k']} of any of them "
              f"{cs['in_top_k_of_any_user']:.3f}; mean share of users {cs['mean_user_share']:.3f}; "
              f"old IDs unchanged: {cs['old_ids_unchanged']}")
        print(f"{label} through the retrieval head (embeddings from the items the decoder writes for the new "
              f"item's content neighbours): retrievable {cs['retrievable_retrieval_head']:.3f}; mean share of "
              f"users {cs['mean_user_share_retrieval_head']:.3f}")
        rows.append({"bench": "synthetic", "model": "cold_start", "seed": seed, **cs})
    if len(seeds) > 1:  # the rate over every planted item of every draw, with its uncertainty
        draws = [r for r in rows if r.get("model") == "cold_start"]
        hits = int(round(sum(r["retrievable"] * r["num_new"] for r in draws)))
        total = sum(r["num_new"] for r in draws)
        lo, hi = wilson_interval(hits, total)
        print(f"cold start pooled over {len(draws)} draws: {hits} of {total} planted items retrievable = "
              f"{hits / total:.3f} (Wilson 95% interval {lo:.3f}-{hi:.3f}; bar >= 0.95); draws below the bar: "
              f"{sum(r['retrievable'] < 0.95 for r in draws)}")
        rows.append({"bench": "synthetic", "model": "cold_start_pooled", "draws": len(draws), "retrievable_items": hits,
                     "planted_items": total, "retrievable": hits / total, "wilson95": [lo, hi]})
    return rows


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``hits / n``."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["synthetic", "beauty"])
    p.add_argument("--config", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="run directory (replaced, unless --resume)")
    p.add_argument("--resume", action="store_true",
                   help="beauty: continue the run already in --out (its semantic IDs and latest checkpoint) and "
                        "score it, instead of starting over -- for a run stopped by a time limit")
    p.add_argument("--fit", choices=["train", "train+valid"], default="train",
                   help="events the model and the baselines are fitted on (beauty)")
    p.add_argument("--eval-split", choices=["test", "valid"], default="test",
                   help="score on the test event, or on the validation event for model selection (needs --fit train)")
    p.add_argument("--history", choices=["kept", "removed", "both"], default="kept",
                   help="beauty: score with the user's history items left in the ranking, removed from it, or both")
    p.add_argument("--exclude-history", action="store_true", help="the same as --history both")
    p.add_argument("--extra-beams", default="", help="beauty: comma-separated beam widths to also search with, "
                   "on the same model (paired comparison with the configured width)")
    p.add_argument("--renorm", action="store_true",
                   help="beauty: also score beam search with each level's softmax taken over the trie's codes only")
    p.add_argument("--ids-from", choices=["config", "retrieval"], default="config",
                   help="beauty: semantic IDs from rqvae.features (config) or from the item table of a "
                        "retrieval-only model trained first on the same events (retrieval)")
    p.add_argument("--ids-steps", type=int, default=4000, help="steps of that retrieval-only model")
    p.add_argument("--num-new", type=int, default=50, help="planted cold-start items (synthetic)")
    p.add_argument("--popular-among", type=int, default=30,
                   help="cold start: candidate code paths per new item (the first this many items beam search "
                        "gives a pseudo-user made of its content neighbours; add_items' popular_among)")
    p.add_argument("--cold-start-seeds", default="1",
                   help="synthetic: comma-separated seeds of planted cold-start draws (the first is the headline)")
    p.add_argument("--skip-model", action="store_true", help="synthetic: RQ-VAE bar only")
    p.add_argument("--max-users", type=int, default=0, help="evaluate a subset of test users (smoke runs; 0 = all)")
    p.add_argument("--json", default=None, help="write one JSON object per row to this file")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    if args.exclude_history:
        args.history = "both"
    args.extra_beams = tuple(int(w) for w in args.extra_beams.split(",") if w.strip())
    if args.eval_split == "valid" and args.fit != "train":
        p.error("--eval-split valid needs --fit train (a model fitted on the validation event cannot be selected on it)")
    rows = bench_beauty(args) if args.which == "beauty" else bench_synthetic(args)
    write_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
