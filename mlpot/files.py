"""Files written atomically: a kill at any moment leaves the previous file (or none) readable.

Every checkpoint and exported model of mlpot and of ``integrators`` goes through here: the
content is written to a temporary file in the target's folder, flushed to disk (fsync), then
renamed over the target with ``os.replace`` (atomic on POSIX and Windows).
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import tempfile
from typing import Any, Callable, List, Optional

import torch


def atomic_write(path: str, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)``, fsync the file, then rename it onto ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_archive(path: str, save: Callable[[io.BytesIO], Any]) -> None:
    """A torch zip archive written by ``save(buffer)`` (``torch.save`` or ``torch.jit.save``),
    then written to ``path`` atomically. Saved to a named file, torch names the archive's inner
    folder after the file, here the random temporary name, so two saves of the same content
    differed in their bytes; saved to a buffer, the folder is always ``archive``."""
    buffer = io.BytesIO()
    save(buffer)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())

    atomic_write(path, write)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)``, atomically."""
    atomic_write_archive(path, lambda buffer: torch.save(obj, buffer))


def temporary_pattern(path: str) -> str:
    """The glob pattern of the temporary files ``atomic_write`` makes for ``path``."""
    path = os.path.abspath(os.fspath(path))
    base = glob.escape(os.path.basename(path))
    return os.path.join(glob.escape(os.path.dirname(path)), "." + base + ".*.tmp")


def remove_stale_temporaries(path: str) -> List[str]:
    """Delete the temporary files that a killed ``atomic_write(path, ...)`` left behind (the
    target itself is never touched); returns what was removed. Call it when a run that owns
    ``path`` starts, not while another process may be writing it."""
    removed = []
    for tmp in glob.glob(temporary_pattern(path)):
        try:
            os.remove(tmp)
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def sha256(path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_path(path: Optional[str], base_dir: str) -> Optional[str]:
    """``path`` relative to ``base_dir`` (a config file's folder) unless absolute or None."""
    if path is None or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(base_dir, path))
