"""Download public data sets and verify them: ``python -m genrec_jax.data.fetch NAME --dest DIR``.

Each data set lands in ``DIR/NAME/`` (the layout the loaders and ``data.data_dir`` /
``GENREC_DATA_DIR`` expect). Every download goes to a temporary file in the destination
directory, is hashed while it streams, and is renamed into place only when its sha256
matches the registry, so an interrupted or corrupted download never leaves a file that
looks complete. Only the standard library does the network work.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 20
DEFAULT_TIMEOUT = 60.0


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One file to download; an archive when ``extract`` names members to unpack."""

    url: str
    filename: str  # name under the data set directory (archives: removed after unpacking)
    sha256: str | None  # None: unknown; the download is refused unless explicitly allowed
    extract: tuple[tuple[str, str], ...] = ()  # (member in the zip archive, name to write)


@dataclasses.dataclass(frozen=True)
class DataSource:
    name: str
    description: str
    files: tuple[RemoteFile, ...]


_P5_COMMIT = "2200ad9fef647ef755c01d6d7e5c5de3082606c5"
_P5_RAW = f"https://raw.githubusercontent.com/Wenyueh/LLM-RecSys-ID/{_P5_COMMIT}/data/beauty"

REGISTRY: dict[str, DataSource] = {
    "ml-1m": DataSource(
        name="ml-1m",
        description="MovieLens 1M (GroupLens), ratings/movies/users .dat files",
        files=(
            RemoteFile(
                url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
                filename="ml-1m.zip",
                # Not computed in this repository (no network here); it matches the value
                # pinned by several independent projects, e.g. the TensorFlow Recommenders
                # MovieLens example, and GroupLens publishes md5 c4d9eecfca2ab87c1945afe126590906.
                sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
                extract=(
                    ("ml-1m/ratings.dat", "ratings.dat"),
                    ("ml-1m/movies.dat", "movies.dat"),
                    ("ml-1m/users.dat", "users.dat"),
                    ("ml-1m/README", "README"),
                ),
            ),
        ),
    ),
    "amazon-beauty": DataSource(
        name="amazon-beauty",
        description=f"Amazon Beauty (5-core) in the P5 sequential format, Wenyueh/LLM-RecSys-ID@{_P5_COMMIT[:12]}",
        files=(
            # Checked (sha256sum) against the copies this project evaluates on.
            RemoteFile(
                url=f"{_P5_RAW}/sequential_data.txt",
                filename="sequential_data.txt",
                sha256="f85a84ab47d70e82bf0e7301804270af10fb51e127ab8f0885697d593f6f6d43",
            ),
            RemoteFile(
                url=f"{_P5_RAW}/datamaps.json",
                filename="datamaps.json",
                sha256="715ab04838ff1ba21238475ed453a89e8c30aa6214b904d27a79e4168fc7b612",
            ),
        ),
    ),
}


class FetchError(RuntimeError):
    """A download or unpacking step failed; nothing partial was left behind."""


class ChecksumMismatchError(FetchError):
    pass


class UnverifiedDownloadError(FetchError):
    """The registry has no hash for the file and unverified downloads were not allowed."""


def fetch(
    name: str,
    dest: str | Path,
    *,
    allow_unverified: bool = False,
    force: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = True,
) -> Path:
    """Download (and unpack) data set ``name`` into ``dest/name``; return that directory.

    Files already present are kept (plain files only if their hash still matches) unless
    ``force`` is set.
    """
    if name not in REGISTRY:
        raise KeyError(f"unknown data set {name!r}; known: {', '.join(sorted(REGISTRY))}")
    target = Path(dest) / name
    target.mkdir(parents=True, exist_ok=True)
    for remote in REGISTRY[name].files:
        if not force and _already_present(target, remote):
            _say(progress, f"{name}: {remote.filename} already present, skipping")
            continue
        path = target / remote.filename
        download(remote.url, path, remote.sha256, allow_unverified=allow_unverified, timeout=timeout, progress=progress)
        if remote.extract:
            extract_members(path, target, remote.extract)
            path.unlink()  # the unpacked files are what the loaders read
    return target


def _already_present(target: Path, remote: RemoteFile) -> bool:
    if remote.extract:
        return all((target / out).is_file() for _, out in remote.extract)
    path = target / remote.filename
    return path.is_file() and (remote.sha256 is None or sha256_file(path) == remote.sha256)


def download(
    url: str,
    path: str | Path,
    sha256: str | None,
    *,
    allow_unverified: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = True,
) -> str:
    """Stream ``url`` to ``path`` atomically, verifying sha256; return the hex digest.

    The bytes go to a temporary file next to ``path`` and are renamed over it only after
    the hash checks out; on any failure the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    digest = _copy_hashing(response, out, _content_length(response), path.name, progress)
            except OSError as err:  # URLError, timeouts and HTTP errors are all OSErrors
                raise FetchError(f"could not download {url}: {err}") from err
            out.flush()
            os.fsync(out.fileno())  # the rename must not publish bytes still in flight
        _verify(url, digest, sha256, allow_unverified, progress)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


def _content_length(response) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


def _copy_hashing(source: BinaryIO, out: BinaryIO, total: int | None, label: str, progress: bool) -> str:
    hasher = hashlib.sha256()
    bar = None
    if progress and total is not None:
        from tqdm import tqdm  # only needed for interactive downloads

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, file=sys.stderr)
    try:
        while chunk := source.read(_CHUNK):
            hasher.update(chunk)
            out.write(chunk)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return hasher.hexdigest()


def _verify(url: str, digest: str, expected: str | None, allow_unverified: bool, progress: bool) -> None:
    if expected is None:
        if not allow_unverified:
            raise UnverifiedDownloadError(
                f"no sha256 is registered for {url}; the download has sha256 {digest}. "
                "Check it against a trusted source and rerun with --allow-unverified to keep it."
            )
        _say(progress, f"warning: {url} kept unverified, sha256 {digest}")
    elif digest != expected.lower():
        raise ChecksumMismatchError(f"sha256 mismatch for {url}: expected {expected}, got {digest}; file discarded")


def extract_members(archive: str | Path, target: str | Path, members: tuple[tuple[str, str], ...]) -> None:
    """Unpack the named zip members to ``target/<name>``, each written atomically.

    Only the listed members are read and the output names come from the registry, so an
    archive cannot write outside ``target``.
    """
    target = Path(target)
    try:
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            missing = [m for m, _ in members if m not in names]
            if missing:
                raise FetchError(f"{archive} lacks {', '.join(missing)}")
            for member, out_name in members:
                if Path(out_name).name != out_name:
                    raise FetchError(f"refusing to extract to {out_name!r}: not a plain file name")
                _write_atomically(target / out_name, zf.open(member))
    except zipfile.BadZipFile as err:
        raise FetchError(f"{archive} is not a valid zip archive: {err}") from err


def _write_atomically(path: Path, source: BinaryIO) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with source, os.fdopen(fd, "wb") as out:
            while chunk := source.read(_CHUNK):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def sha256_file(path: str | Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m genrec_jax.data.fetch",
        description="Download a public data set into DEST/NAME and verify its sha256.",
        epilog="Data sets: " + "; ".join(f"{s.name}: {s.description}" for s in REGISTRY.values()),
    )
    parser.add_argument("name", choices=sorted(REGISTRY), help="data set to download")
    parser.add_argument(
        "--dest", type=Path, default=None, help="destination folder (default: $GENREC_DATA_DIR)"
    )
    parser.add_argument(
        "--allow-unverified", action="store_true", help="keep files for which no sha256 is registered"
    )
    parser.add_argument("--force", action="store_true", help="download again even if the files are present")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="network timeout in seconds")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    dest = args.dest or (Path(os.environ["GENREC_DATA_DIR"]) if os.environ.get("GENREC_DATA_DIR") else None)
    if dest is None:
        parser.error("--dest is required when GENREC_DATA_DIR is not set")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    try:
        target = fetch(
            args.name,
            dest,
            allow_unverified=args.allow_unverified,
            force=args.force,
            timeout=args.timeout,
            progress=not args.quiet,
        )
    except FetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
