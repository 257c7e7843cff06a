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
processes starting at once build it only once.

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

__all__ = ["load_library", "source_dir", "cache_dir", "cuda_decision", "INFO", "OP_NAME"]

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
    env = os.environ.get("MLPOT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mlpot" / "ops"


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


def _build(target: Path, name: str, sources: List[Path], with_cuda: bool, folder: Path) -> None:
    """Compile into a private temporary folder, then rename the library to `target` atomically."""
    from torch.utils import cpp_extension

    tmp = Path(tempfile.mkdtemp(prefix=f"build-{os.getpid()}-", dir=folder))
    try:
        openmp = _openmp_flags()
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
    folder.mkdir(parents=True, exist_ok=True)
    with _Lock(folder / ".lock"):
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
