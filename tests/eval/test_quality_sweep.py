"""The sweep file of bench/quality_sweep.py: errors name the file and the key; presets load."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("quality_sweep", REPO / "bench" / "quality_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quality_sweep"] = mod
    spec.loader.exec_module(mod)
    return mod


def write(tmp_path, text):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return str(p)


def test_shipped_sweep_files_load(sweep):
    files = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
    assert files
    for f in files:
        spec = sweep.read_sweep(str(f))
        assert spec["candidates"]


@pytest.mark.parametrize("text,needle", [
    ("dataset: synthetic\n", "missing key 'candidates'"),
    ("dataset: synthetic\ncandidates: {hstu: {a: []}}\nfoo: 1\n", "unknown keys ['foo']"),
    ("dataset: synthetic\nselect_by: AUC\ncandidates: {hstu: {a: []}}\n", "select_by"),
    ("dataset: synthetic\ncandidates: {hstu: {a: model.dropout=0.1}}\n", "candidates.hstu.a"),
    ("dataset: synthetic\ncandidates: {hstu: {a: [model.nope=1]}}\n", "model.nope"),
    ("dataset: synthetic\ncandidates: {hstu: {a: [model.dropout=1.5]}}\n", "candidates.hstu.a"),
])
def test_bad_sweep_files_name_the_problem(sweep, tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(sweep.SweepError) as e:
        sweep.read_sweep(path)
    assert needle in str(e.value)
    assert path in str(e.value)


def test_validation_runs_never_see_the_test_event(sweep):
    spec = {"exclude_history": True, "common": ["train.num_steps=10"]}
    valid = sweep.job_overrides(spec, ["model.dropout=0.1"], "train")
    final = sweep.job_overrides(spec, ["model.dropout=0.1"], "train+valid")
    assert valid[0] == "data.fit=train" and final[0] == "data.fit=train+valid"
    # the candidate's own settings come last, so they win over the common ones
    assert valid[-1] == "model.dropout=0.1" and "train.num_steps=10" in valid


def test_selected_must_name_a_candidate(sweep, tmp_path, capsys):
    path = write(tmp_path, "dataset: synthetic\ncandidates: {hstu: {a: []}}\n")
    assert sweep.main([path, "--selected", "hstu=b"]) == 2
    assert "hstu=b" in capsys.readouterr().err
    assert sweep.main([str(tmp_path / "missing.yaml")]) == 2
