"""Files written atomically: a kill at any moment leaves the previous file (or none) readable.

Every checkpoint and exported model of mlpot and of ``integrators`` goes through here: the
content is written to a temporary file in the target's folder, flushed to disk (fsync), then
renamed over the target with ``os.replace`` (atomic on POSIX and Windows).
"""
from __future__ import annotations

import glob
import os
import tempfile
from typing import Any, Callable, List

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


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)``, atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


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
