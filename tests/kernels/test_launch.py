"""The launch layer's switches, no GPU needed."""

from __future__ import annotations

import logging

import pytest

from genrec_jax.kernels import launch


@pytest.mark.parametrize("value,expected", [
    (None, True), ("1", True), ("yes", True), ("0", False), ("false", False), ("OFF", False), (" no ", False),
])
def test_autotune_switch(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("GENREC_TRITON_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("GENREC_TRITON_AUTOTUNE", value)
    assert launch.autotune_enabled() is expected


def test_autotune_off_pins_the_first_configuration():
    triton = pytest.importorskip("triton")
    from genrec_jax.kernels import hstu_attention as ka

    kernel = ka.autotuned("fwd", 128, False)
    assert isinstance(kernel, triton.runtime.Autotuner)
    first = launch.autotune_configs(kernel)[0]
    assert first == {**ka.fwd_configs(128, False)[0].kwargs, "num_warps": ka.fwd_configs(128, False)[0].num_warps,
                     "num_stages": ka.fwd_configs(128, False)[0].num_stages}


def test_only_the_autotune_key_warning_is_dropped(caplog):
    launch._quiet_autotune_warning()
    launch._quiet_autotune_warning()  # idempotent
    log = logging.getLogger("absl")
    assert log.filters.count(launch._warning_filter) == 1
    with caplog.at_level(logging.WARNING, logger="absl"):
        log.warning("Auto-tuning key does not include all scalar arguments. We may perform redundant auto-tuning.")
        log.warning("something else")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["something else"]


def test_empty_triton_cache_dir_gets_a_directory(monkeypatch, tmp_path):
    """The native launcher's guard: an empty cache directory (the GPU machine's "Could not
    create or locate cache dir") becomes TRITON_CACHE_DIR or a temp directory; a set one is
    left alone."""
    pytest.importorskip("triton")
    from triton import knobs

    monkeypatch.setattr(knobs.cache, "dir", "")
    monkeypatch.setenv("TRITON_CACHE_DIR", "")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    launch._ensure_cache_dir()
    assert knobs.cache.dir == str(tmp_path / "genrec-triton-cache") and (tmp_path / "genrec-triton-cache").is_dir()
    monkeypatch.setattr(knobs.cache, "dir", str(tmp_path / "mine"))
    launch._ensure_cache_dir()
    assert knobs.cache.dir == str(tmp_path / "mine")
