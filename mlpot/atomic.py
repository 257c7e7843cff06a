"""Files written atomically: a kill at any moment leaves the previous file (or none) readable.

Every checkpoint and exported model of mlpot and of ``integrators`` goes through here: the
content is written to a temporary file in the target's folder, flushed to disk (fsync), then
renamed over the target with ``os.replace`` (atomic on POSIX and Windows).
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

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
