"""Config loading: presets parse, overrides apply, bad values fail naming key and file."""

from pathlib import Path

import pytest

from genrec_jax.config import PRESET_DIR, ConfigError, config_from_dict, load_config, preset_path

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads(name):
    cfg = load_config(preset_path(name))
    assert cfg.data.max_seq_len > 0


def test_required_presets_exist():
    assert {"tiny", "synthetic", "beauty", "ml1m", "base", "xl"} <= set(PRESETS)


def test_overrides_apply_with_yaml_types():
    cfg = load_config(preset_path("tiny"), ["model.num_layers=4", "train.learning_rate=1e-4",
                                           "eval.ks=[1,3]", "model.l2_norm=false", "data.data_dir=/x"])
    assert cfg.model.num_layers == 4 and cfg.train.learning_rate == 1e-4
    assert cfg.eval.ks == [1, 3] and cfg.model.l2_norm is False and cfg.data.data_dir == "/x"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "model:\n  num_layer: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "model.num_layer" in str(e.value) and str(p) in str(e.value) and "num_layers" in str(e.value)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key.*modle"):
        load_config(write(tmp_path, "modle: {}\n"))


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.embed_dim: expected an integer, got 'big'"):
        load_config(write(tmp_path, "model:\n  embed_dim: big\n"))
    with pytest.raises(ConfigError, match=r"model\.l2_norm: expected true/false"):
        load_config(preset_path("tiny"), ["model.l2_norm=3"])
    with pytest.raises(ConfigError, match=r"model\.arch: must be one of"):
        load_config(preset_path("tiny"), ["model.arch=bert"])


def test_impossible_values(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.num_heads: must divide model\.embed_dim"):
        load_config(preset_path("tiny"), ["model.arch=sasrec", "model.embed_dim=30", "model.num_heads=4"])
    with pytest.raises(ConfigError, match=r"model\.moe\.top_k"):
        load_config(preset_path("tiny"), ["model.ffn=moe", "model.moe.num_experts=2", "model.moe.top_k=3"])
    with pytest.raises(ConfigError, match=r"model\.dropout"):
        config_from_dict({"model": {"dropout": 1.5}})
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(write(tmp_path, "data:\n  batch_size: 0\n"))
    with pytest.raises(ConfigError, match=r"serve\.gil_switch_interval_ms"):
        load_config(preset_path("tiny"), ["serve.gil_switch_interval_ms=-1"])
    with pytest.raises(ConfigError, match=r"serve\.http_workers"):
        load_config(preset_path("tiny"), ["serve.http_workers=-1"])
    assert load_config(preset_path("tiny"), ["serve.http_workers=4"]).serve.http_workers == 4


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["model.num_layers"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_data_dir_from_environment(monkeypatch):
    monkeypatch.setenv("GENREC_DATA_DIR", "/data")
    cfg = load_config(preset_path("beauty"))
    assert str(cfg.data.resolved_dir()) == "/data/amazon-beauty"
