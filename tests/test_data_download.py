"""Downloads from a local HTTP server: checksum, cache, resume after a cut connection, mirrors, bad archives."""
import threading
import time

import pytest
from fixtures import FileServer, deb_bytes, sha256, zip_bytes

from d2v.data import download
from d2v.data.archives import ArchiveError, Package
from d2v.data.download import Artifact, ChecksumError, DownloadError, cache_path, fetch

PAYLOAD = bytes(range(256)) * 4000  # ~1 MB


def artifact(server, path="/f.bin", digest=None, **kw):
    return Artifact("f.bin", (server.url(path),), sha256=digest or sha256(PAYLOAD), **kw)


def test_fetch_verifies_and_caches(tmp_path, monkeypatch):
    with FileServer({"/f.bin": PAYLOAD}) as server:
        path = fetch(artifact(server), tmp_path)
        assert path.read_bytes() == PAYLOAD and path == cache_path(artifact(server), tmp_path)
        monkeypatch.setattr(download, "_exclusive", None)  # reading takes no lock: a shared cache may be read-only
        fetch(artifact(server), tmp_path)
        assert len(server.requests) == 1  # second call served from the cache


def test_resume_after_cut_connection(tmp_path):
    with FileServer({"/f.bin": PAYLOAD}) as server:
        server.cut["/f.bin"] = 300_000
        path = fetch(artifact(server), tmp_path, backoff=0)
        assert path.read_bytes() == PAYLOAD
        assert server.requests == [("/f.bin", None), ("/f.bin", "bytes=300000-")]


def test_server_ignoring_range_restarts_cleanly(tmp_path):
    with FileServer({"/f.bin": PAYLOAD}) as server:
        server.cut["/f.bin"] = 100_000
        server.ignore_range = True
        assert fetch(artifact(server), tmp_path, backoff=0).read_bytes() == PAYLOAD


def test_checksum_mismatch_is_an_error_and_leaves_nothing(tmp_path):
    with FileServer({"/f.bin": PAYLOAD}) as server:
        bad = artifact(server, digest="0" * 64)
        with pytest.raises(ChecksumError, match="expected 0000.*got " + sha256(PAYLOAD)):
            fetch(bad, tmp_path)
        folder = cache_path(bad, tmp_path).parent
        assert [p.name for p in folder.iterdir()] == ["f.bin.lock"]  # neither the file nor a .part survives


def test_a_mirror_serving_other_bytes_falls_back_to_the_next(tmp_path):
    """A mirror that answers 200 with an error page or another version: its bytes are dropped (a resume from them
    would extend the wrong file) and the next mirror's are kept; when none matches, the error names each."""
    with FileServer({"/error-page": b"<html>moved</html>", "/f.bin": PAYLOAD}) as server:
        art = Artifact("f.bin", (server.url("/error-page"), server.url("/f.bin")), sha256=sha256(PAYLOAD))
        assert fetch(art, tmp_path).read_bytes() == PAYLOAD
        wrong = Artifact("g.bin", (server.url("/error-page"), server.url("/f.bin")), sha256="0" * 64)
        with pytest.raises(ChecksumError, match=r"(?s)every mirror failed.*/error-page: .*mismatch.*/f.bin: .*mism"):
            fetch(wrong, tmp_path)
        assert not cache_path(wrong, tmp_path).with_name("g.bin.part").exists()


def test_a_corrupt_cached_copy_is_named_with_how_to_recover(tmp_path):
    with FileServer({"/f.bin": PAYLOAD}) as server:
        path = fetch(artifact(server), tmp_path)
        path.write_bytes(PAYLOAD[:-1])
        with pytest.raises(ChecksumError, match=r"the cached copy; delete it to download it again"):
            fetch(artifact(server), tmp_path)


def test_concurrent_fetches_of_one_artifact_download_it_once(tmp_path):
    """Two fetches at once (two pipeline jobs, two terminals) would append to one .part file; the second waits for
    the first and finds the file cached."""
    with FileServer({"/f.bin": PAYLOAD}) as server:
        server.hold = threading.Event()
        paths = []
        fetches = [threading.Thread(target=lambda: paths.append(fetch(artifact(server), tmp_path))) for _ in range(2)]
        for t in fetches:
            t.start()
        time.sleep(0.5)  # both started; without the lock both would be waiting on the server now
        server.hold.set()
        for t in fetches:
            t.join(timeout=30)
        assert len(paths) == 2 and paths[0].read_bytes() == PAYLOAD and paths[0] == paths[1]
        assert len(server.requests) == 1


def test_falls_back_to_the_next_mirror_and_names_all_failures(tmp_path):
    with FileServer({"/f.bin": PAYLOAD}) as server:
        art = Artifact("f.bin", (server.url("/gone"), server.url("/f.bin")), sha256=sha256(PAYLOAD))
        assert fetch(art, tmp_path).read_bytes() == PAYLOAD
        dead = Artifact("g.bin", (server.url("/a"), server.url("/b")), sha256=sha256(PAYLOAD))
        with pytest.raises(DownloadError, match=r"(?s)every mirror failed.*/a: HTTP 404.*/b: HTTP 404"):
            fetch(dead, tmp_path)


def test_unpinned_artifact_needs_explicit_opt_in():
    with pytest.raises(ValueError, match="pin a sha256 or md5"):
        Artifact("x", ("http://127.0.0.1/x",))
    assert Artifact("x", ("http://127.0.0.1/x",), unpinned=True).digest is None


def test_package_reads_deb_wheel_and_sdist_members(tmp_path):
    files = {"usr/share/x/data.txt": b"hello", "usr/share/x/odd.bin": b"abc"}
    (tmp_path / "p.deb").write_bytes(deb_bytes(files))
    (tmp_path / "p.whl").write_bytes(zip_bytes(files))
    for name in ("p.deb", "p.whl"):
        with Package(tmp_path / name) as pkg:
            assert pkg.read("usr/share/x/odd.bin") == b"abc"
            assert pkg.glob("usr/share/x/*.txt") == ["usr/share/x/data.txt"]
            with pytest.raises(ArchiveError, match="no member 'nope'"):
                pkg.read("nope")


def test_truncated_deb_is_a_clear_error(tmp_path):
    data = deb_bytes({"a": b"x" * 1000})
    (tmp_path / "t.deb").write_bytes(data[:-20])
    with pytest.raises(ArchiveError, match="t.deb: member 'data.tar.xz' truncated"):
        Package(tmp_path / "t.deb")
    (tmp_path / "h.deb").write_bytes(data[:8 + 60 + 4 + 30])  # cut inside the second member's header
    with pytest.raises(ArchiveError, match="h.deb: truncated member header"):
        Package(tmp_path / "h.deb")
    (tmp_path / "n.deb").write_bytes(b"garbage")
    with pytest.raises(ArchiveError, match="not an ar archive"):
        Package(tmp_path / "n.deb")
