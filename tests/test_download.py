"""fetch: checksummed download (real HTTP server on 127.0.0.1) and local copy, atomic on failure."""
import hashlib

import pytest
from fixtures_gen import closed_port, serve_folder

from stlink.data.download import ChecksumError, DownloadError, fetch
from stlink.data.formats import DataError

PAYLOAD = bytes(range(256)) * 4000  # ~1 MB: more than one read chunk
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
OLD = b"the earlier copy\n"


@pytest.fixture()
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "speed data.bin").write_bytes(PAYLOAD)
    with serve_folder(served) as base:
        yield base


@pytest.fixture()
def dest(tmp_path):
    """Download folder that already holds an earlier copy of the target."""
    d = tmp_path / "dest"
    d.mkdir()
    (d / "speed data.bin").write_bytes(OLD)
    return d


def assert_untouched(dest):
    """Only the earlier copy is there, byte for byte: no temp file, no partial download."""
    assert sorted(p.name for p in dest.iterdir()) == ["speed data.bin"]
    assert (dest / "speed data.bin").read_bytes() == OLD


def test_download_verifies_and_replaces(server, dest, capsys):
    path, digest = fetch(f"{server}/speed%20data.bin", dest, DIGEST.upper())
    assert path == dest / "speed data.bin"
    assert digest == DIGEST
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in dest.iterdir()) == ["speed data.bin"]
    assert "speed data.bin" in capsys.readouterr().err  # tqdm progress bar, size known


def test_download_under_another_name(server, tmp_path):
    path, _ = fetch(f"{server}/speed%20data.bin", tmp_path / "new", DIGEST, name="x.bin")
    assert path == tmp_path / "new" / "x.bin" and path.read_bytes() == PAYLOAD


def test_bad_checksum_keeps_earlier_copy(server, dest):
    url = f"{server}/speed%20data.bin"
    with pytest.raises(ChecksumError) as err:
        fetch(url, dest, "0" * 64)
    msg = str(err.value)
    assert url in msg and "0" * 64 in msg and DIGEST in msg
    assert isinstance(err.value, DataError)
    assert_untouched(dest)


def test_http_404(server, dest):
    url = f"{server}/missing.bin"
    with pytest.raises(DownloadError, match="404") as err:
        fetch(url, dest, DIGEST, name="speed data.bin")
    assert url in str(err.value)
    assert_untouched(dest)


def test_unreachable_host(dest):
    url = f"http://127.0.0.1:{closed_port()}/speed.bin"
    with pytest.raises(DownloadError) as err:
        fetch(url, dest, DIGEST, name="speed data.bin", timeout=5)
    assert url in str(err.value)
    assert_untouched(dest)


def test_truncated_download(server, dest):
    url = f"{server}/truncated/5000"
    with pytest.raises(DownloadError) as err:
        fetch(url, dest, DIGEST, name="speed data.bin")
    assert url in str(err.value)
    assert_untouched(dest)


def test_url_needs_checksum(server, dest):
    with pytest.raises(DataError, match="sha256"):
        fetch(f"{server}/speed%20data.bin", dest, None)
    assert_untouched(dest)


def test_file_url(tmp_path, dest):
    src = tmp_path / "speed data.bin"
    src.write_bytes(PAYLOAD)
    path, digest = fetch(src.as_uri(), dest, DIGEST)
    assert digest == DIGEST and path.read_bytes() == PAYLOAD
    with pytest.raises(DownloadError, match="nothing.bin"):
        fetch((tmp_path / "nothing.bin").as_uri(), dest, DIGEST, name="speed data.bin")
    assert (dest / "speed data.bin").read_bytes() == PAYLOAD


def test_local_copy_without_checksum(tmp_path):
    src = tmp_path / "a.csv"
    src.write_bytes(PAYLOAD)
    path, digest = fetch(str(src), tmp_path / "out", None)
    assert path == tmp_path / "out" / "a.csv" and path.read_bytes() == PAYLOAD and digest == DIGEST


def test_local_copy_with_checksum(tmp_path, dest):
    src = tmp_path / "speed data.bin"
    src.write_bytes(PAYLOAD)
    path, _ = fetch(str(src), dest, DIGEST)
    assert path.read_bytes() == PAYLOAD
    path.write_bytes(OLD)
    with pytest.raises(ChecksumError, match=str(src)):
        fetch(str(src), dest, "f" * 64)
    assert_untouched(dest)


def test_missing_local_file(tmp_path, dest):
    missing = tmp_path / "nope.bin"
    with pytest.raises(DownloadError, match="nope.bin"):
        fetch(str(missing), dest, None, name="speed data.bin")
    assert_untouched(dest)
