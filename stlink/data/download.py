"""Checksummed fetch of source files, from a URL or a local path.

Every fetch streams into a temporary sibling of the destination, hashes while it writes,
verifies the digest and only then renames into place: a failed, corrupt or interrupted fetch
leaves an earlier copy at the destination exactly as it was and no temporary file behind.
"""
from __future__ import annotations

import hashlib
import http.client
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

from stlink.progress import progress as progress_meter

from stlink.data.formats import DataError
from stlink.io import atomic_path

CHUNK = 1 << 20  # bytes per read
URL_SCHEMES = ("http", "https", "file")


class DownloadError(DataError):
    """A source file could not be fetched (HTTP error, unreachable host, missing file)."""


class ChecksumError(DataError):
    """A fetched file's sha256 differs from the expected one."""


def is_url(src: str) -> bool:
    return urllib.parse.urlsplit(str(src)).scheme.lower() in URL_SCHEMES


def check_digest(where: str, expected: str | None, actual: str) -> None:
    """Raise ``ChecksumError`` naming ``where`` unless ``expected`` is None or equals ``actual``."""
    if expected is not None and expected.strip().lower() != actual:
        raise ChecksumError(f"{where}: sha256 mismatch: expected {expected.strip().lower()}, got {actual}")


def fetch(src: str, dest_dir: Path, sha256: str | None, name: str | None = None,
          timeout: float = 30) -> tuple[Path, str]:
    """Download (URL) or copy (local path) ``src`` to ``dest_dir/name``; returns (path, sha256).

    A URL (http, https, file) needs ``sha256``; for a local path it is optional.  ``name``
    defaults to the last component of the URL or path.
    """
    src = str(src)
    url = is_url(src)
    if name is None:
        name = Path(urllib.parse.unquote(urllib.parse.urlsplit(src).path) if url else src).name
    if not name:
        raise DataError(f"{src}: cannot tell a file name from it; pass name=")
    if url and not sha256:
        raise DataError(f"{src}: a download needs its expected sha256 (data.sha256: {{{name}: <digest>}})")
    target = Path(dest_dir) / name
    with atomic_path(target, ".part") as tmp:
        actual = _download(src, tmp, timeout, name) if url else _copy(Path(src), tmp)
        check_digest(src, sha256, actual)
    return target, actual


def _copy(src: Path, tmp: Path) -> str:
    if not src.is_file():
        raise DownloadError(f"{src}: no such file")
    with open(src, "rb") as fin:
        return _stream(fin, tmp, total=None, label=src.name)


def _download(url: str, tmp: Path, timeout: float, label: str) -> str:
    request = urllib.request.Request(url, headers={"User-Agent": "stlink"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            digest = _stream(resp, tmp, total=total, label=label, progress=True)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DownloadError(f"{url}: {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"{url}: {type(exc).__name__}: {exc}") from None
    if total is not None and tmp.stat().st_size != total:
        raise DownloadError(f"{url}: truncated: got {tmp.stat().st_size} of {total} bytes")
    return digest


def _stream(fin: BinaryIO, tmp: Path, total: int | None, label: str, progress: bool = False) -> str:
    """Copy ``fin`` to ``tmp`` in chunks; returns the sha256 of what was written."""
    h = hashlib.sha256()
    with open(tmp, "wb") as fout, progress_meter(total=total, unit="B", unit_scale=True, desc=label,
                                                 file=sys.stderr, disable=not progress or total is None,
                                                 leave=False) as bar:
        for block in iter(lambda: fin.read(CHUNK), b""):
            h.update(block)
            fout.write(block)
            bar.update(len(block))
    return h.hexdigest()
