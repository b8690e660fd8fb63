"""bench/serve_ipc.py: the engine side starts in a child process, answers every request sent
through its socket, and the row reports the rate and the engine's CPU per request."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import serve_ipc  # noqa: E402


def test_engine_process_answers_through_its_socket(tiny_run, tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    rc = serve_ipc.main(["--checkpoint", str(tiny_run), "--seconds", "1", "--frontends", "2", "--concurrency", "8",
                         "--history-len", "5", "--json", str(out)])
    assert rc == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["errors"] == 0 and row["answered"] > 0
    assert row["rate"] > 0 and row["engine_cpu_us_per_request"] > 0 and row["mean_batch"] >= 1
    assert row["resolved"] and row["users"] == "none" and row["python_threads_cpu_us_per_request"] > 0
    assert "CPU us/req" in capsys.readouterr().out


def test_user_ids_and_unresolved_histories(tiny_run, tmp_path):
    rows = []
    for users in ("new", "returning"):
        out = tmp_path / f"{users}.jsonl"
        rc = serve_ipc.main(["--checkpoint", str(tiny_run), "--seconds", "1", "--frontends", "1", "--concurrency", "4",
                             "--history-len", "5", "--users", users, "--user-pool", "3", "--no-resolve", "--real",
                             "--json", str(out)])
        assert rc == 0
        rows += [json.loads(line) for line in out.read_text().splitlines()]
    new, returning = rows
    assert new["errors"] == 0 and not new["resolved"] and new["prefix_misses"] == new["answered"]
    assert returning["errors"] == 0 and returning["prefix_hits"] > 0, "returning users should hit their prefix"
