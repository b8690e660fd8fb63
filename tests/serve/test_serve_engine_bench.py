"""bench/serve_engine.py: a CPU smoke run of the anonymous and the new-user recommend paths;
each new-user request is a prefix-cache miss that fills a K/V slot, and both answer."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import serve_engine  # noqa: E402


def test_new_users_take_the_prefix_cache_path(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    tiny = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    rc = serve_engine.main(["--config", tiny, "--history-len", "8", "--batch-buckets", "1,4",
                            "--modes", "recommend,new-users", "--iters", "3", "--no-naive", "--json", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["mode"], r["batch"]) for r in rows} == {(m, b) for m in ("recommend", "new-users") for b in (1, 4)}
    assert all(r["requests_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)
    printed = capsys.readouterr().out
    # (3 timed + 2 warm batches) x (1 + 4) requests, every one a new user; recommend adds none
    assert "# prefix cache: 0 hits, 25 misses" in printed
