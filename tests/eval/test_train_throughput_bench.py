"""bench/train_throughput.py's scaling mode on simulated CPU devices: weak scaling keeps the
per-device batch, every layout is timed and its efficiency computed from the one-device row."""

import json
import sys
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import train_throughput as tt  # noqa: E402
from genrec_jax.config import MeshConfig  # noqa: E402


def test_layout_names_map_to_meshes():
    assert tt.layout_mesh("data", 4) == MeshConfig(data=4, fsdp=1, tensor=1, expert=1)
    assert tt.layout_mesh("fsdp", 4) == MeshConfig(data=1, fsdp=4, tensor=1, expert=1)
    assert tt.layout_mesh("data=2+expert=2", 4) == MeshConfig(data=2, fsdp=1, tensor=1, expert=2)


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
def test_weak_scaling_rows(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    rc = tt.main(["--config", str(Path(tt.REPO) / "configs" / "tiny.yaml"), "--set", "data.batch_size=8",
                  "--scaling", "--layouts", "data,fsdp", "--steps", "1", "--warmup", "0", "--peak-tflops", "1",
                  "--json", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    n = len(jax.devices())
    assert [(r["layout"], r["devices"], r["global_batch"]) for r in rows] == [
        ("single", 1, 8), ("data", n, 8 * n), ("fsdp", n, 8 * n)]
    for r in rows[1:]:
        assert r["scaling_efficiency"] == pytest.approx(r["tokens_per_s"] / n / rows[0]["tokens_per_s"])
    for r in rows:  # steady state and one-at-a-time timings are both reported
        assert r["step_ms"] > 0 and r["step_ms_blocked"] > 0
    assert "per-device efficiency" in capsys.readouterr().out
