"""bench/serve_frontend.py: both route paths answer every request (checked), and each row
reports the CPU per request and its ratio to the framework path."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import serve_frontend  # noqa: E402


def test_rows_for_both_paths(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert serve_frontend.main(["--requests", "40", "--history-lens", "3", "--candidates", "5",
                                "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["endpoint"], r["lean_routes"]) for r in rows} == {(e, lean) for e in ("recommend", "rank")
                                                                 for lean in (False, True)}
    for r in rows:
        assert r["mode"] == "asgi" and r["history_len"] == 3 and r["cpu_us_per_request"] > 0
        assert r["cpu_ratio_vs_framework"] == 1.0 if not r["lean_routes"] else r["cpu_ratio_vs_framework"] > 0
    assert "CPU us/req" in capsys.readouterr().out


def test_a_broken_answer_stops_the_run(monkeypatch):
    async def wrong(self, a):  # the backend answers fewer items than asked
        return {"items": [], "model_version": "stub"}

    monkeypatch.setattr(serve_frontend.StubBackend, "recommend", wrong)
    try:
        serve_frontend.main(["--requests", "5", "--history-lens", "2"])
    except SystemExit as e:
        assert "0 items" in str(e)
    else:
        raise AssertionError("a wrong answer must stop the benchmark")
