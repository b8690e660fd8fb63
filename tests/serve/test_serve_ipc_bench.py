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
    assert "engine CPU us/req" in capsys.readouterr().out
