"""The source chain (SPEC §8): order, verification of every file, corruption, interruption, errors."""

from __future__ import annotations

import gzip
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from amortized_bayes.data import ChecksumMismatchError, DataNotFoundError, TruncatedIDXError, resolve
from amortized_bayes.data.atomic import atomic_write_bytes
from amortized_bayes.data.sources import CacheSource, FolderSource, MirrorSource, Source, SourceUnavailable
from amortized_bayes.data.store import default_sources

from .helpers import tiny_dataset, write_files

REPO = Path(__file__).resolve().parents[1]


class Recording(Source):
    """A source that records being asked and offers nothing (or raises SourceUnavailable)."""

    def __init__(self, label, unavailable=False):
        self.label, self.unavailable, self.asked = label, unavailable, []

    def provide(self, dataset, files, scratch, note):
        self.asked.append([f.name for f in files])
        if self.unavailable:
            raise SourceUnavailable("not here")
        return {}


def test_default_chain_order(isolated_cache, tmp_path, monkeypatch):
    spec, _ = tiny_dataset()
    monkeypatch.setenv("AMORTIZED_BAYES_OFFLINE", "0")
    chain = default_sources(spec, data_dir=tmp_path / "mine")
    kinds = [type(s).__name__ for s in chain]
    assert kinds[:2] == ["FolderSource", "CacheSource"] and chain[0].user_supplied
    assert kinds[2:] == ["MirrorSource"] * len(spec.mirrors)
    from amortized_bayes.data.registry import FASHION_MNIST, MNIST

    fm = [type(s).__name__ for s in default_sources(FASHION_MNIST)]
    assert fm == ["CacheSource", "FolderSource", "MirrorSource", "MirrorSource", "MirrorSource", "DebianSource"]
    assert [type(s).__name__ for s in default_sources(MNIST)][-1] == "NpmSource"
    monkeypatch.setenv("AMORTIZED_BAYES_OFFLINE", "1")
    assert not any(isinstance(s, MirrorSource) for s in default_sources(MNIST))


def test_first_source_that_has_a_file_wins_and_later_ones_are_not_asked(isolated_cache, tmp_path):
    spec, blobs = tiny_dataset()
    first = FolderSource(write_files(tmp_path / "a", blobs), "A", cache_results=False)
    second = FolderSource(write_files(tmp_path / "b", blobs), "B")
    never = Recording("never")
    found = resolve(spec, sources=[Recording("empty"), first, second, never], note=lambda m: None)
    assert {vf.source for vf in found.values()} == {"A"}
    assert never.asked == []
    assert not isolated_cache.exists() or not any((isolated_cache / "data" / "tiny").glob("*-ubyte"))


def test_files_are_gathered_across_sources_and_cached(isolated_cache, tmp_path):
    spec, blobs = tiny_dataset()
    half = dict(list(blobs.items())[:2])
    rest = dict(list(blobs.items())[2:])
    a = FolderSource(write_files(tmp_path / "a", half, gz=True), "A")
    b = FolderSource(write_files(tmp_path / "b", rest), "B")
    found = resolve(spec, sources=[a, b], note=lambda m: None)
    assert [found[n].source for n in blobs] == ["A", "A", "B", "B"]
    cache = isolated_cache / "data" / "tiny"
    for name, data in blobs.items():  # cached decompressed, whatever the source's compression
        assert (cache / name).read_bytes() == data
    # Second time round the cache answers, remembering where each file came from.
    again = resolve(spec, sources=[CacheSource(cache), Recording("after")], note=lambda m: None)
    assert [again[n].source for n in blobs] == ["A", "A", "B", "B"]


def test_corrupt_file_from_a_download_source_is_rejected_and_next_source_used(isolated_cache, tmp_path):
    spec, blobs = tiny_dataset()
    bad = dict(blobs)
    name = "train-images-idx3-ubyte"
    bad[name] = bad[name][:-1] + bytes([bad[name][-1] ^ 1])  # same length, one bit flipped
    notes = []
    found = resolve(spec, sources=[FolderSource(write_files(tmp_path / "bad", bad), "BAD"),
                                   FolderSource(write_files(tmp_path / "good", blobs), "GOOD")],
                    note=notes.append)
    assert found[name].source == "GOOD"
    assert any("reject" in n and "SHA-256" in n and name in n for n in notes)
    assert (isolated_cache / "data" / "tiny" / name).read_bytes() == blobs[name]


def test_corrupt_file_in_user_folder_stops_with_its_name(isolated_cache, tmp_path):
    spec, blobs = tiny_dataset()
    mine = write_files(tmp_path / "mine", blobs)
    (mine / "t10k-labels-idx1-ubyte").write_bytes(blobs["t10k-labels-idx1-ubyte"][:-2])
    chain = [FolderSource(mine, "your folder", cache_results=False, user_supplied=True),
             FolderSource(write_files(tmp_path / "good", blobs), "GOOD")]
    with pytest.raises(TruncatedIDXError, match=r"mine/t10k-labels-idx1-ubyte.*truncated"):
        resolve(spec, sources=chain, note=lambda m: None)


def test_corrupt_cache_stops_unless_repair_then_replaced_and_bad_copy_kept(isolated_cache, tmp_path):
    spec, blobs = tiny_dataset()
    cache = isolated_cache / "data" / "tiny"
    write_files(cache, blobs)
    name = "train-labels-idx1-ubyte"
    damaged = blobs[name][:8] + bytes([(blobs[name][8] + 1) % 10]) + blobs[name][9:]
    (cache / name).write_bytes(damaged)
    good = FolderSource(write_files(tmp_path / "good", blobs), "GOOD")
    with pytest.raises(ChecksumMismatchError, match=r"train-labels-idx1-ubyte.*--repair"):
        resolve(spec, sources=[CacheSource(cache), good], note=lambda m: None)
    assert (cache / name).read_bytes() == damaged  # nothing was touched
    found = resolve(spec, sources=[CacheSource(cache), good], repair=True, note=lambda m: None)
    assert found[name].source == "GOOD"
    assert (cache / name).read_bytes() == blobs[name]
    assert (cache / (name + ".corrupt")).read_bytes() == damaged


def test_when_every_source_fails_the_error_lists_them_and_says_how_to_supply(isolated_cache, tmp_path):
    spec, _ = tiny_dataset()
    chain = [FolderSource(tmp_path / "nowhere", "your folder /nowhere", user_supplied=True),
             CacheSource(isolated_cache / "data" / "tiny"), Recording("npm registry", unavailable=True),
             MirrorSource("http://127.0.0.1:9/", timeout=2)]
    with pytest.raises(DataNotFoundError) as info:
        resolve(spec, sources=chain, note=lambda m: None)
    text = str(info.value)
    for label in ("your folder /nowhere", "cache", "npm registry: not here", "mirror http://127.0.0.1:9/"):
        assert label in text
    assert "--data-dir" in text and "AMORTIZED_BAYES_DATA" in text


def test_atomic_write_interrupted_leaves_old_file_and_no_litter(tmp_path, monkeypatch):
    target = tmp_path / "train-images-idx3-ubyte"
    target.write_bytes(b"good old bytes")

    def boom(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"new bytes that never land")
    assert target.read_bytes() == b"good old bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


class _Mirror(http.server.BaseHTTPRequestHandler):
    """Serves gzipped blobs; in drip mode it sends half a file and then stalls."""

    blobs: dict = {}
    drip = False
    half_sent = threading.Event()

    def do_GET(self):  # noqa: N802
        name = self.path.rsplit("/", 1)[-1].removesuffix(".gz")
        if name not in self.blobs:
            self.send_error(404)
            return
        body = gzip.compress(self.blobs[name])
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.drip:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            type(self).half_sent.set()
            time.sleep(30)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror():
    spec, blobs = tiny_dataset(n_train=400)  # large enough that half a file is a real partial body
    _Mirror.blobs, _Mirror.drip = blobs, False
    _Mirror.half_sent = threading.Event()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Mirror)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield spec, blobs, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


FETCH = """
import sys
from amortized_bayes.data import resolve
from amortized_bayes.data.sources import CacheSource, MirrorSource
from amortized_bayes.data.store import paths
from tests.helpers import tiny_dataset
spec, _ = tiny_dataset(n_train=400)
resolve(spec, sources=[CacheSource(paths.data_cache_dir(spec.name)), MirrorSource(sys.argv[1], timeout=60)])
print("done")
"""


def test_fetch_killed_mid_download_keeps_cached_good_file_and_resumes(isolated_cache, mirror):
    spec, blobs, url = mirror
    cache = isolated_cache / "data" / "tiny"
    keep = "train-labels-idx1-ubyte"
    write_files(cache, {keep: blobs[keep]})
    before = (cache / keep).stat()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    _Mirror.drip = True
    proc = subprocess.Popen([sys.executable, "-c", FETCH, url], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert _Mirror.half_sent.wait(30), "the fetch never started downloading"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert (cache / keep).read_bytes() == blobs[keep]
    assert (cache / keep).stat().st_mtime_ns == before.st_mtime_ns
    assert not (cache / "train-images-idx3-ubyte").exists()  # no partial file under a real name

    _Mirror.drip = False
    out = subprocess.run([sys.executable, "-c", FETCH, url], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name, data in blobs.items():
        assert (cache / name).read_bytes() == data
    leftovers = [p.name for p in cache.iterdir() if p.name.endswith(".part") or p.name.startswith(".fetch-")]
    assert leftovers == []


def test_mirror_download_is_verified_like_any_source(isolated_cache, mirror):
    spec, blobs, url = mirror
    found = resolve(spec, sources=[MirrorSource(url, timeout=10)], note=lambda m: None)
    assert {vf.source for vf in found.values()} == {f"mirror {url}"}
    assert all((isolated_cache / "data" / "tiny" / n).read_bytes() == d for n, d in blobs.items())


def test_download_stops_at_its_size_cap_and_names_a_full_disk(mirror, tmp_path):
    from amortized_bayes.data.sources import LocalDiskError, download

    spec, _, url = mirror
    name = spec.files[0].name + ".gz"
    with pytest.raises(ValueError, match="more than the 10"):
        download(url + name, tmp_path / "x.gz", timeout=10, max_bytes=10)
    if os.path.exists("/dev/full"):  # every write there fails with ENOSPC
        with pytest.raises(LocalDiskError, match="No space left"):
            download(url + name, Path("/dev/full"), timeout=10)
        from amortized_bayes.data.sources import _unreachable

        assert not _unreachable(LocalDiskError(28, "x"))


def test_atomic_writes_honour_the_umask(tmp_path):
    code = ("import os, sys; os.umask(0o077); from amortized_bayes.data.atomic import atomic_write_text; "
            "atomic_write_text(sys.argv[1], 'x'); print(oct(os.stat(sys.argv[1]).st_mode & 0o777))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f")], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "0o600"
    code = code.replace("0o077", "0o022")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "g")], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "0o644"
