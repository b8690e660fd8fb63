"""Download and verification, offline: sources are ``file://`` URLs to files the tests write."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from genrec_jax.data import fetch as fetch_module
from genrec_jax.data.fetch import (
    REGISTRY,
    ChecksumMismatchError,
    DataSource,
    FetchError,
    RemoteFile,
    UnverifiedDownloadError,
    download,
    fetch,
    main,
)
from genrec_jax.data.movielens import load_movielens_1m
from genrec_jax.data.p5 import load_p5


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _serve(tmp_path: Path, name: str, data: bytes) -> str:
    """Write ``data`` to a source folder and return its file:// URL."""
    source = tmp_path / "server"
    source.mkdir(exist_ok=True)
    (source / name).write_bytes(data)
    return (source / name).as_uri()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_registry_entries_are_complete() -> None:
    assert {"ml-1m", "amazon-beauty"} <= set(REGISTRY)
    for source in REGISTRY.values():
        for remote in source.files:
            assert remote.url.startswith("https://")
            assert remote.sha256 is None or len(remote.sha256) == 64
    beauty = REGISTRY["amazon-beauty"].files
    assert all("2200ad9fef647ef755c01d6d7e5c5de3082606c5" in f.url for f in beauty)
    assert [f.filename for f in beauty] == ["sequential_data.txt", "datamaps.json"]


def test_download_verifies_and_writes(tmp_path: Path) -> None:
    data = b"hello world\n" * 1000
    target = tmp_path / "out" / "file.txt"
    digest = download(_serve(tmp_path, "file.txt", data), target, _sha(data), progress=True)
    assert digest == _sha(data) and target.read_bytes() == data
    assert _leftovers(target.parent) == ["file.txt"]  # no temporary file left


def test_wrong_checksum_leaves_nothing_behind(tmp_path: Path) -> None:
    url = _serve(tmp_path, "file.txt", b"tampered")
    out = tmp_path / "out"
    with pytest.raises(ChecksumMismatchError, match="sha256 mismatch") as info:
        download(url, out / "file.txt", _sha(b"original"), progress=False)
    assert _sha(b"tampered") in str(info.value)
    assert _leftovers(out) == []


def test_wrong_checksum_keeps_an_existing_good_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "file.txt").write_bytes(b"previous")
    with pytest.raises(ChecksumMismatchError):
        download(_serve(tmp_path, "file.txt", b"tampered"), out / "file.txt", _sha(b"x"), progress=False)
    assert (out / "file.txt").read_bytes() == b"previous" and _leftovers(out) == ["file.txt"]


def test_unknown_checksum_is_refused_unless_allowed(tmp_path: Path) -> None:
    data = b"no hash registered"
    url = _serve(tmp_path, "file.txt", data)
    out = tmp_path / "out"
    with pytest.raises(UnverifiedDownloadError, match=_sha(data)):
        download(url, out / "file.txt", None, progress=False)
    assert _leftovers(out) == []
    assert download(url, out / "file.txt", None, allow_unverified=True, progress=False) == _sha(data)
    assert (out / "file.txt").read_bytes() == data


def test_unreachable_url_is_a_fetch_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(FetchError, match="could not download"):
        download((tmp_path / "missing.bin").as_uri(), out / "f", None, progress=False)
    assert _leftovers(out) == []


def _ml_zip(tmp_path: Path) -> bytes:
    """A tiny ml-1m.zip laid out like the GroupLens archive."""
    archive = tmp_path / "build" / "ml-1m.zip"
    archive.parent.mkdir()
    files = {
        "ratings.dat": "1::1::5::978300760\n1::2::3::978300761\n",
        "movies.dat": "1::Amélie (2001)::Comedy|Romance\n2::Heat (1995)::Action|Crime|Thriller\n",
        "users.dat": "1::F::25::3::12345\n",
        "README": "test archive\n",
    }
    with zipfile.ZipFile(archive, "w") as zf:
        for name, text in files.items():
            zf.writestr(f"ml-1m/{name}", text.encode("latin-1"))
    return archive.read_bytes()


@pytest.fixture()
def fake_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, DataSource]:
    archive = _ml_zip(tmp_path)
    sequences, datamaps = b"1 1 2\n2 2 1 3\n", b'{"id2item": {"1": "A", "2": "B", "3": "C"}}'
    members = tuple((f"ml-1m/{n}", n) for n in ("ratings.dat", "movies.dat", "users.dat", "README"))
    registry = {
        "ml-1m": DataSource(
            "ml-1m", "test", (RemoteFile(_serve(tmp_path, "ml-1m.zip", archive), "ml-1m.zip", _sha(archive), members),)
        ),
        "amazon-beauty": DataSource(
            "amazon-beauty",
            "test",
            (
                RemoteFile(_serve(tmp_path, "sequential_data.txt", sequences), "sequential_data.txt", _sha(sequences)),
                RemoteFile(_serve(tmp_path, "datamaps.json", datamaps), "datamaps.json", _sha(datamaps)),
            ),
        ),
    }
    monkeypatch.setattr(fetch_module, "REGISTRY", registry)
    return registry


def test_fetch_archive_extracts_and_loads(tmp_path: Path, fake_registry) -> None:
    target = fetch("ml-1m", tmp_path / "data", progress=False)
    assert target == tmp_path / "data" / "ml-1m"
    assert _leftovers(target) == ["README", "movies.dat", "ratings.dat", "users.dat"]  # archive removed
    ml = load_movielens_1m(target)
    assert ml.num_items == 2 and ml.extras["movie_titles"][1] == "Amélie"


def test_fetch_plain_files_and_load(tmp_path: Path, fake_registry) -> None:
    target = fetch("amazon-beauty", tmp_path / "data", progress=False)
    assert _leftovers(target) == ["datamaps.json", "sequential_data.txt"]
    ds = load_p5(target)
    assert ds.num_users == 2 and list(ds.item_ids) == ["<pad>", "A", "B", "C"]


def test_fetch_skips_present_files_and_replaces_corrupt_ones(tmp_path: Path, fake_registry) -> None:
    target = fetch("amazon-beauty", tmp_path, progress=False)
    (target / "datamaps.json").write_text("corrupted")
    seq_mtime = (target / "sequential_data.txt").stat().st_mtime_ns
    fetch("amazon-beauty", tmp_path, progress=False)
    assert (target / "datamaps.json").read_text().startswith('{"id2item"')
    assert (target / "sequential_data.txt").stat().st_mtime_ns == seq_mtime


def test_fetch_wrong_checksum_leaves_no_file(tmp_path: Path, fake_registry, monkeypatch) -> None:
    remote = fake_registry["ml-1m"].files[0]
    wrong = RemoteFile(remote.url, remote.filename, "0" * 64, remote.extract)
    monkeypatch.setitem(fake_registry, "ml-1m", DataSource("ml-1m", "bad", (wrong,)))
    with pytest.raises(ChecksumMismatchError):
        fetch("ml-1m", tmp_path / "data", progress=False)
    assert _leftovers(tmp_path / "data" / "ml-1m") == []


def test_archive_without_expected_member(tmp_path: Path, fake_registry, monkeypatch) -> None:
    remote = fake_registry["ml-1m"].files[0]
    broken = RemoteFile(remote.url, remote.filename, remote.sha256, (("ml-1m/absent.dat", "absent.dat"),))
    monkeypatch.setitem(fake_registry, "ml-1m", DataSource("ml-1m", "x", (broken,)))
    with pytest.raises(FetchError, match="absent.dat"):
        fetch("ml-1m", tmp_path, progress=False)
    assert not (tmp_path / "ml-1m" / "absent.dat").exists()


def test_cli_downloads(tmp_path: Path, fake_registry, capsys) -> None:
    assert main(["amazon-beauty", "--dest", str(tmp_path), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "amazon-beauty")


def test_cli_uses_environment_destination(tmp_path: Path, fake_registry, monkeypatch) -> None:
    monkeypatch.setenv("GENREC_DATA_DIR", str(tmp_path / "env"))
    assert main(["amazon-beauty", "--quiet"]) == 0
    assert (tmp_path / "env" / "amazon-beauty" / "sequential_data.txt").is_file()


def test_cli_reports_checksum_errors(tmp_path: Path, fake_registry, monkeypatch, capsys) -> None:
    remote = fake_registry["amazon-beauty"].files[0]
    unhashed = RemoteFile(remote.url, remote.filename, None)
    monkeypatch.setitem(fake_registry, "amazon-beauty", DataSource("amazon-beauty", "x", (unhashed,)))
    assert main(["amazon-beauty", "--dest", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--allow-unverified" in err and "sha256" in err
    assert _leftovers(tmp_path / "amazon-beauty") == []
    assert main(["amazon-beauty", "--dest", str(tmp_path), "--quiet", "--allow-unverified"]) == 0


@pytest.mark.parametrize(
    "argv",
    [[], ["no-such-data-set", "--dest", "x"], ["ml-1m", "--timeout", "0", "--dest", "x"], ["ml-1m", "--bogus"]],
)
def test_cli_argument_errors(argv, monkeypatch, capsys) -> None:
    monkeypatch.delenv("GENREC_DATA_DIR", raising=False)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_cli_needs_a_destination(monkeypatch, capsys) -> None:
    monkeypatch.delenv("GENREC_DATA_DIR", raising=False)
    with pytest.raises(SystemExit):
        main(["ml-1m"])
    assert "GENREC_DATA_DIR" in capsys.readouterr().err


def test_fetch_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="ml-1m"):
        fetch("nope", tmp_path)
