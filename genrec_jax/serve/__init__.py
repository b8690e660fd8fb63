"""Serving: a trained checkpoint as compiled recommend / rank calls and an HTTP service.

    inputs.py        request history -> padded model inputs (``pad_batch``), catalogue ids
    steps.py         the compiled steps (prefill, extend, retrieve, generate, rank) over a K/V slot pool
    prefix_cache.py  per-user LRU of encoded history prefixes
    generative.py    semantic IDs: beam-search driver, trie, cold-start registration
    engine.py        ``Engine``: load, compile ahead of time, pad into buckets, run batches
    baseline.py      ``NaiveEngine``: every optimisation off (the benchmarks' comparison)
    batcher.py       dynamic batching with a bounded queue and deadlines
    schemas.py, app.py, metrics.py, errors.py   the FastAPI service
    supervisor.py, frontend.py, ipc.py          multi-process serving: HTTP front ends, one engine process
    cli.py           ``python serve.py``
"""
