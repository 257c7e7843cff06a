"""Build (once per source/torch version) and load the compiled op ``torch.ops.mlpot.neighbor_list``.

The C++ (and, where it can be compiled, CUDA) sources ship inside the package as ``mlpot._csrc``
(the repository's ``cpp/`` folder). The first call compiles them with
``torch.utils.cpp_extension.load`` (ninja + the C++ compiler, about a minute) into a cache folder

    $MLPOT_CACHE_DIR/<torch-version>-<hash>/      (default: ~/.cache/mlpot/ops/...)

whose name holds the torch version and a hash of the sources, the build flags, the Python and
CUDA versions, so a torch upgrade or a source change rebuilds. Later processes only
``torch.ops.load_library`` the cached library: no compiler needed.

Safety: the build runs in a private temporary folder under an inter-process lock, and the library
reaches its final name by an atomic rename, so a half-written library is never loaded and two
processes starting at once build it only once. A cached library is code from whoever could write
it: before loading (or building into) the cache, ``mlpot.cache.check_private`` refuses a library or
folder up to the cache root owned by another user or writable by group/others (the caller then
falls back to the pure-PyTorch neighbor list, with its one warning); mlpot creates its cache
folders with mode 0o700.

After a kill -9 mid-build: the next build removes the ``build-PID-*`` folders of processes that are
gone, and ninja (started by ``torch.utils.cpp_extension``) gets SIGTERM when mlpot dies (Linux
PR_SET_PDEATHSIG) and then kills the compilers it started, so none are left running.

``INFO`` records what happened (for ``python -m mlpot.neighbors``).
"""
from __future__ import annotations

import hashlib
import importlib.resources
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..cache import UnsafeCacheError, cache_root, check_private, make_private_dir

__all__ = ["load_library", "source_dir", "cache_dir", "cuda_decision", "remove_stale_builds",
           "UnsafeCacheError", "INFO", "OP_NAME"]

OP_NAME = "mlpot::neighbor_list"
_CPP_SOURCES = ("neighbor_list.cpp",)
_CUDA_SOURCES = ("neighbor_list_cuda.cu",)
_CFLAGS = ["-O3"]  # no -march=native (the cache may be shared between machines), no -ffast-math
_CUDA_CFLAGS = ["-O3"]

# What happened in this process (read by the diagnosis in __main__).
INFO: Dict[str, object] = {
    "library": None,        # path of the loaded library
    "action": None,         # "loaded from cache" / "built" / "already registered"
    "build_seconds": None,
    "cuda_included": None,  # whether the CUDA kernel was compiled into the library
    "cuda_reason": None,    # why (not)
    "cuda_error": None,     # compiler output of a failed CUDA build (then built for CPU only)
    "error": None,          # the error that made load_library fail
    "build_log": None,      # path of the log of the last failed build
    "cache_dir": None,
    "sources": None,
}

_LOADED: Optional[str] = None


def source_dir() -> Path:
    """Folder holding the C++/CUDA sources (installed package data, else the repository's cpp/)."""
    try:
        root = importlib.resources.files("mlpot._csrc")
        path = Path(str(root))
        if (path / _CPP_SOURCES[0]).is_file():
            return path
    except (ModuleNotFoundError, TypeError, NotADirectoryError):
        pass
    repo_cpp = Path(__file__).resolve().parents[2] / "cpp"
    if (repo_cpp / _CPP_SOURCES[0]).is_file():
        return repo_cpp
    raise FileNotFoundError(
        "mlpot: the sources of the neighbor-list op (neighbor_list.cpp) were found neither in "
        "the package mlpot._csrc nor in the repository's cpp/ folder; reinstall mlpot"
    )


def _cache_root() -> Path:
    return cache_root("ops")


def _nvcc_version() -> Tuple[Optional[str], Optional[str]]:
    """(path of nvcc, its 'major.minor' release) or (None/path, None) when none is usable."""
    from torch.utils import cpp_extension

    candidates = []
    if cpp_extension.CUDA_HOME:
        candidates.append(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    which = shutil.which("nvcc")
    if which:
        candidates.append(which)
    for nvcc in candidates:
        if not os.path.isfile(nvcc):
            continue
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        match = re.search(r"release (\d+)\.(\d+)", out.stdout)
        if match:
            return nvcc, f"{match.group(1)}.{match.group(2)}"
    return None, None


def cuda_decision() -> Tuple[bool, str]:
    """Whether to compile the CUDA kernel, and why (not)."""
    if os.environ.get("MLPOT_NO_CUDA_BUILD", "") not in ("", "0"):
        return False, "MLPOT_NO_CUDA_BUILD is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False (no GPU or driver here)"
    nvcc, version = _nvcc_version()
    if nvcc is None or version is None:
        return False, "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    if version.split(".")[0] != torch.version.cuda.split(".")[0]:
        return False, (
            f"nvcc {version} ({nvcc}) does not match the CUDA {torch.version.cuda} torch was "
            "built with (major versions differ)"
        )
    return True, f"nvcc {version} ({nvcc}) matches torch's CUDA {torch.version.cuda}"


def _openmp_flags() -> List[str]:
    """at::parallel_for is inline OpenMP code with torch's OpenMP backend: compile it as such.

    The library then uses torch's own libgomp (same soname, already loaded), so it follows
    torch.set_num_threads.
    """
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        return ["-fopenmp"]
    return []


def _key(sources: List[Path], cflags: List[str], with_cuda: bool) -> str:
    h = hashlib.sha256()
    for src in sources:
        h.update(src.name.encode())
        h.update(src.read_bytes())
    for part in (
        torch.__version__,
        str(torch.version.cuda),
        f"{sys.version_info[0]}.{sys.version_info[1]}",
        platform.machine(),
        " ".join(cflags),
        " ".join(_CUDA_CFLAGS) if with_cuda else "cpu",
    ):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def _build_id(with_cuda: bool) -> Tuple[Path, str]:
    """(cache folder, library name) for the current sources, torch and build flags."""
    src = source_dir()
    sources = [src / s for s in _CPP_SOURCES + (_CUDA_SOURCES if with_cuda else ())]
    key = _key(sources, _CFLAGS + _openmp_flags(), with_cuda)
    version = re.sub(r"[^A-Za-z0-9._]", "_", torch.__version__)
    suffix = "-cuda" if with_cuda else ""
    return _cache_root() / f"{version}-{key}{suffix}", f"mlpot_neighbors_{key}"


def cache_dir(with_cuda: Optional[bool] = None) -> Path:
    """Folder of the library for the current sources, torch and build flags."""
    if with_cuda is None:
        with_cuda = cuda_decision()[0]
    return _build_id(with_cuda)[0]


def _op_registered() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, "CPU")
    except RuntimeError:
        return False


class _Lock:
    """Exclusive inter-process lock on a file (no-op where fcntl is unavailable)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


_BUILD_DIR = re.compile(r"^build-(\d+)-")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:  # pragma: no cover - unknown: keep its folder
        return True
    return True


def remove_stale_builds(folder: Path) -> List[Path]:
    """Remove the ``build-PID-*`` folders of builds whose process is gone (killed mid-build, e.g.
    by kill -9, which skips the cleanup in ``_build``); returns what was removed.

    Called under the folder's lock, so no build of this process is running; a folder named with
    this process's own PID is therefore stale too (a PID reused after a container restart).
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _BUILD_DIR.match(entry.name)
        if not match or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def _die_with_parent_preexec():
    """A ``preexec_fn`` that makes the child get SIGTERM when this process dies (Linux
    PR_SET_PDEATHSIG), or None where that is not available. ninja, on SIGTERM, kills the compiler
    process groups it started, so a kill -9 of mlpot mid-build leaves no compiler running."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        import signal

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)
    parent = os.getpid()

    def preexec():
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class _CompilerDiesWithUs:
    """While building, make ``torch.utils.cpp_extension`` start ninja with
    :func:`_die_with_parent_preexec` (it calls ``subprocess.run`` itself with no such option).

    Only the ``subprocess`` name inside cpp_extension is replaced, by a module that forwards
    everything to :mod:`subprocess` and adds the ``preexec_fn`` to ``run``; where cpp_extension
    has no such name (another torch) nothing changes and only the stale-folder cleanup remains.
    """

    def __enter__(self):
        import types

        from torch.utils import cpp_extension

        self.module = cpp_extension
        self.saved = getattr(cpp_extension, "subprocess", None)
        preexec = _die_with_parent_preexec()
        if self.saved is not subprocess or preexec is None:
            self.saved = None
            return self
        proxy = types.ModuleType("subprocess")
        proxy.__dict__.update(subprocess.__dict__)

        def run(*args, **kwargs):
            kwargs.setdefault("preexec_fn", preexec)
            return subprocess.run(*args, **kwargs)

        proxy.run = run
        cpp_extension.subprocess = proxy
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            self.module.subprocess = self.saved


def _build(target: Path, name: str, sources: List[Path], with_cuda: bool, folder: Path) -> None:
    """Compile into a private temporary folder, then rename the library to `target` atomically."""
    from torch.utils import cpp_extension

    remove_stale_builds(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f"build-{os.getpid()}-", dir=folder))
    try:
        openmp = _openmp_flags()
        with _CompilerDiesWithUs():
            cpp_extension.load(
                name=name,
                sources=[str(s) for s in sources],
                extra_cflags=_CFLAGS + openmp,
                extra_cuda_cflags=_CUDA_CFLAGS if with_cuda else None,
                extra_ldflags=openmp,
                build_directory=str(tmp),
                is_python_module=False,
                with_cuda=with_cuda,
                verbose=False,
            )  # also loads the library (registers the op) in this process
        built = tmp / f"{name}.so"
        if not built.is_file():
            found = sorted(tmp.glob(f"{name}*.so")) + sorted(tmp.glob(f"{name}*.pyd"))
            if not found:
                raise RuntimeError(f"the build produced no library in {tmp}")
            built = found[0]
        # Same filesystem: the rename is atomic, and the file keeps the inode this process has
        # loaded (so a later torch.ops.load_library(target) here is a no-op, not a second copy).
        os.replace(built, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildError(RuntimeError):
    """The op could not be compiled; the message is short, the full log is in a file."""


def _summary(log: str, max_lines: int = 6) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    key = [ln for ln in lines if re.search(r"error|not found|no such file|fatal", ln, re.I)
           and not ln.startswith(("FAILED:", "ninja: build stopped", "["))
           and "Error building extension" not in ln and " -o " not in ln]
    picked = key[:max_lines] if key else lines[-max_lines:]
    return " | ".join(ln[:300] for ln in picked)


class _QuietBuildLogs:
    """Silence torch.utils.cpp_extension's own warnings during the build (their text ends up in
    the error we raise; one of them even fails to format in torch 2.9 when no compiler is found)."""

    def __enter__(self):
        import logging

        self.logger = logging.getLogger("torch.utils.cpp_extension")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def _load_or_build(with_cuda: bool, retry_failed: bool) -> str:
    folder, name = _build_id(with_cuda)
    target = folder / f"{name}.so"
    failed = folder / "build_failed.log"
    INFO["cache_dir"] = str(folder)
    # A library in the cache is code from whoever could write there: load (or build into) it
    # only when it and its folders are this user's alone (raises UnsafeCacheError otherwise).
    check_private(target)
    load_error = None
    if target.is_file():
        try:
            torch.ops.load_library(str(target))
            INFO.update(action="loaded from cache")
            return str(target)
        except OSError as err:  # corrupt or incompatible file: rebuild below
            load_error = err
    if failed.is_file() and not retry_failed:
        raise BuildError(
            f"an earlier build of the op failed ({_summary(failed.read_text())}; full log: "
            f"{failed}); `python -m mlpot.neighbors` retries the build"
        )
    make_private_dir(folder)
    with _Lock(folder / ".lock"):
        check_private(target)
        if target.is_file() and load_error is None:  # built by another process meanwhile
            torch.ops.load_library(str(target))
            INFO.update(action="loaded from cache (built by another process)")
            return str(target)
        print(
            f"mlpot: building the neighbor-list op{' with its CUDA kernel' if with_cuda else ''} "
            "(once, ~1 min)...",
            file=sys.stderr,
            flush=True,
        )
        t0 = time.perf_counter()
        src = source_dir()
        sources = [src / s for s in _CPP_SOURCES + (_CUDA_SOURCES if with_cuda else ())]
        try:
            with _QuietBuildLogs():
                _build(target, name, sources, with_cuda, folder)
        except Exception as err:
            log = f"{type(err).__name__}: {err}"
            try:
                failed.write_text(log)
                INFO["build_log"] = str(failed)
            except OSError:
                pass
            raise BuildError(f"building the op failed: {_summary(log)}; full log: {failed}") from err
        try:
            failed.unlink()
        except OSError:
            pass
        INFO.update(action="built", build_seconds=round(time.perf_counter() - t0, 1))
        return str(target)


def load_library(retry_failed: bool = False) -> str:
    """Build (first time) and load the op library; returns its path. Raises on failure.

    A failed build is remembered (``build_failed.log`` in the cache folder) and not retried by
    later processes unless ``retry_failed`` (``python -m mlpot.neighbors`` retries).
    """
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    INFO["sources"] = str(source_dir())
    if _op_registered():
        # Loaded earlier in this process (e.g. torch.ops.load_library by the user).
        paths = [p for p in torch.ops.loaded_libraries if "mlpot_neighbors" in os.path.basename(p)]
        _LOADED = paths[0] if paths else str(_build_id(False)[0])
        INFO.update(library=_LOADED, action="already registered",
                    cuda_included=torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, "CUDA"),
                    cuda_reason="the op was loaded before mlpot looked for it")
        return _LOADED
    with_cuda, reason = cuda_decision()
    if with_cuda:
        cuda_failed = _build_id(True)[0] / "build_failed.log"
        if cuda_failed.is_file() and not retry_failed:
            with_cuda = False
            reason += (f", but an earlier build of the CUDA kernel failed (log: {cuda_failed}; "
                       "`python -m mlpot.neighbors` retries)")
            INFO["cuda_error"] = cuda_failed.read_text()
    INFO.update(cuda_included=with_cuda, cuda_reason=reason, error=None)
    try:
        try:
            path = _load_or_build(with_cuda, retry_failed)
        except BuildError as err:
            if not with_cuda:
                raise
            # The CUDA part failed to compile: keep a CPU-only op (GPU inputs use the fallback).
            INFO.update(cuda_included=False, cuda_error=str(err),
                        cuda_reason=f"{reason}, but compiling the CUDA kernel failed")
            path = _load_or_build(False, retry_failed)
    except Exception as err:
        INFO["error"] = f"{type(err).__name__}: {err}"
        raise
    _LOADED = path
    INFO["library"] = path
    return path
