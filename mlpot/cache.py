"""mlpot's cache of compiled libraries, and the check that a cached library is the user's own.

A compiled library in a cache folder is code this process will run (``torch.ops.load_library``).
Until proven ours it is data from others: a library, or any folder between it and the cache
root, that is owned by another user or writable by group or others may have been placed or
swapped by someone else, so :func:`check_private` refuses it (the caller then builds elsewhere or
falls back). mlpot creates its cache folders with mode 0o700 (:func:`make_private_dir`).

Where the cache lives (:func:`cache_root`):

    $MLPOT_CACHE_DIR/                       when set (holds every kind of cached library)
    $XDG_CACHE_HOME/mlpot/<kind>/           else, when XDG_CACHE_HOME is set
    ~/.cache/mlpot/<kind>/                  else

``kind`` is ``"ops"`` for the neighbor-list op; the LAMMPS plugin will use the same functions.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import List, Optional, Union

from .errors import UserError

__all__ = ["cache_root", "trust_root", "check_private", "make_private_dir", "UnsafeCacheError"]

PathLike = Union[str, "os.PathLike[str]"]


class UnsafeCacheError(UserError, PermissionError):
    """A cached library or one of its folders is not the user's own (another owner, or writable by
    group/others): it is not loaded. The message says why and what to do."""


def _base() -> Path:
    """The folder holding ``mlpot/`` when MLPOT_CACHE_DIR is not set."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg).expanduser() if xdg else Path.home() / ".cache"


def cache_root(kind: str = "ops") -> Path:
    """The cache folder for one kind of library (see the module docstring)."""
    env = os.environ.get("MLPOT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return _base() / "mlpot" / kind


def trust_root() -> Path:
    """The outermost folder mlpot itself creates (what :func:`check_private` checks up to by
    default): MLPOT_CACHE_DIR itself, else the ``mlpot`` folder in the user's cache folder."""
    env = os.environ.get("MLPOT_CACHE_DIR")
    return Path(env).expanduser() if env else _base() / "mlpot"


def _chain(path: Path, root: Path) -> List[Path]:
    """`path` and each folder above it up to `root` included (just `path` if not below `root`)."""
    path, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    chain = [path]
    if path == root or root not in path.parents:
        return chain
    for parent in path.parents:
        chain.append(parent)
        if parent == root:
            break
    return chain


def _problem(path: Path) -> Optional[str]:
    """Why `path` cannot be trusted (None when it can, or when it does not exist yet)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    getuid = getattr(os, "getuid", None)
    if getuid is None:  # pragma: no cover - not POSIX: no owner and mode bits to check
        return None
    uid = getuid()
    if st.st_uid != uid:
        return (f"{path} is owned by user id {st.st_uid}, not by you (user id {uid}), so someone "
                "else may have placed it; set MLPOT_CACHE_DIR to a folder of your own")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if mode & bit)
        return (f"{path} is writable by {who} (mode {mode:o}), so someone else may have changed "
                f"it; run `chmod go-w {path}` if it is yours, or set MLPOT_CACHE_DIR to a folder "
                "of your own")
    return None


def check_private(path: PathLike, root: Optional[PathLike] = None) -> None:
    """Raise :class:`UnsafeCacheError` unless `path` and every existing folder above it up to
    `root` (default: :func:`trust_root`) are owned by the current user and not
    writable by group or others. Missing paths pass (they will be created private)."""
    path = Path(path)
    root = Path(root) if root is not None else trust_root()
    for p in _chain(path, root):
        why = _problem(p)
        if why is not None:
            raise UnsafeCacheError(f"mlpot: refusing the cached library {path}: {why}")


def make_private_dir(path: PathLike, root: Optional[PathLike] = None) -> Path:
    """Create `path` and its missing parents with mode 0o700, then :func:`check_private` it."""
    path = Path(path)
    missing = []
    p = Path(os.path.abspath(path))
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:  # created meanwhile by another process: checked below
            pass
    check_private(path, root)
    return path
