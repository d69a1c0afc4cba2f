"""Atomic file writes: a reader sees either the old file or the complete new one, never a part."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path


@functools.lru_cache(maxsize=1)
def _file_mode() -> int:
    """0666 less the process's umask: the mode ``open()`` would give a new file. Read from
    /proc/self/status where it is there (os.umask can only be read by setting it, which races with
    other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    If anything fails (or the process is interrupted) before the rename, ``path`` keeps its previous
    content and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file private (0600); give it the mode any new file gets (the umask's).
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(path: str | Path, obj) -> None:
    """``torch.save(obj)`` to ``path`` atomically (a crash mid-write leaves the previous file intact)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())
