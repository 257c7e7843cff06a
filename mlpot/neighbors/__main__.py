"""``python -m mlpot.neighbors``: diagnose the compiled neighbor-list op.

Prints the torch version, where the sources and the cached library are, whether the op was built
and loaded (with the build error if not), whether a CUDA kernel was compiled and why (not), and
checks the op on a small structure against the pure-PyTorch neighbor list.
Exit status 0 when the compiled op works, 1 otherwise.
"""
from __future__ import annotations

import os
import platform
import sys
import time


def _line(key: str, value) -> None:
    print(f"  {key:<22} {value}")


def main() -> int:
    import torch

    from . import _extension

    print("mlpot neighbor-list op diagnosis")
    _line("python", f"{platform.python_version()} ({sys.executable})")
    _line("torch", f"{torch.__version__} (CUDA {torch.version.cuda}, "
                   f"cuda available: {torch.cuda.is_available()}, threads: {torch.get_num_threads()})")
    try:
        from torch.utils import cpp_extension

        _line("CUDA_HOME", cpp_extension.CUDA_HOME)
    except Exception as err:  # noqa: BLE001
        _line("CUDA_HOME", f"? ({err})")
    try:
        import ninja  # noqa: F401

        _line("ninja", "available")
    except ImportError:
        _line("ninja", "MISSING (pip install ninja): the op cannot be built")
    if os.environ.get("MLPOT_NO_EXTENSION", "") not in ("", "0"):
        _line("MLPOT_NO_EXTENSION", "set: mlpot uses the pure-PyTorch neighbor list")
    try:
        _line("sources", _extension.source_dir())
    except FileNotFoundError as err:
        _line("sources", f"NOT FOUND: {err}")

    with_cuda, reason = _extension.cuda_decision()
    _line("CUDA kernel", f"{'will be built' if with_cuda else 'not built'}: {reason}")
    try:
        _line("cache folder", _extension.cache_dir(with_cuda))
    except Exception as err:  # noqa: BLE001
        _line("cache folder", f"? ({err})")

    t0 = time.perf_counter()
    try:
        path = _extension.load_library(retry_failed=True)
    except _extension.UnsafeCacheError as err:
        print("\nRESULT: the cached op is NOT loaded (it may not be yours); mlpot falls back to "
              "the pure-PyTorch neighbor list (same results, slower).")
        _line("why", str(err))
        return 1
    except Exception as err:  # noqa: BLE001
        info = _extension.INFO
        print("\nRESULT: the op could NOT be built or loaded; mlpot falls back to the pure-PyTorch "
              "neighbor list (same results, slower).")
        _line("error", f"{type(err).__name__}: {str(err)[:500]}")
        log = str(err)
        if info.get("build_log"):
            _line("build log", info["build_log"])
            try:
                with open(info["build_log"]) as f:
                    log = f.read()
            except OSError:
                pass
        print("\n--- build output ---")
        print(log[-8000:])
        print("--- end ---")
        print("Hints: a C++17 compiler (g++/clang++, or set CXX) and ninja (pip install ninja) are "
              "needed; set MLPOT_CACHE_DIR to a writable folder if the cache is not writable. "
              "Run this command again after fixing it: it retries the build.")
        return 1
    info = _extension.INFO
    _line("library", path)
    _line("how", f"{info.get('action')} in {time.perf_counter() - t0:.1f} s")
    if info.get("cuda_error"):
        print("\n--- CUDA build error (the op was built for CPU only) ---")
        print(str(info["cuda_error"])[-4000:])
        print("--- end ---")
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("mlpot::neighbor_list", "CUDA")
    _line("CUDA kernel in lib", f"{has_cuda} ({info.get('cuda_reason')})")

    # Smoke test against the pure-PyTorch implementation.
    try:
        from ._torch import neighbor_list_torch
    except ImportError:
        neighbor_list_torch = None
    gen = torch.Generator().manual_seed(0)
    cell = torch.tensor([[6.0, 0.0, 0.0], [1.5, 5.5, 0.0], [0.7, -1.1, 4.8]], dtype=torch.float64)
    pos = torch.rand(40, 3, generator=gen, dtype=torch.float64) @ cell
    pbc = torch.tensor([[True, True, True]])
    ptr = torch.tensor([0, 40])
    i, j, s = torch.ops.mlpot.neighbor_list(pos, cell[None], pbc, ptr, 4.0)
    ok = True
    msg = f"{len(i)} pairs"
    if neighbor_list_torch is not None:
        ri, rj, rs = neighbor_list_torch(pos, cell[None], pbc, ptr, 4.0)
        a = {tuple(r) for r in torch.cat([i[:, None], j[:, None], s], 1).tolist()}
        b = {tuple(r) for r in torch.cat([ri[:, None], rj[:, None], rs], 1).tolist()}
        ok = a == b
        msg += ", same as the pure-PyTorch list" if ok else ", DIFFERENT from the pure-PyTorch list"
    _line("check (CPU)", msg)
    if has_cuda and torch.cuda.is_available():
        gi, gj, gs = torch.ops.mlpot.neighbor_list(pos.cuda(), cell[None].cuda(), pbc.cuda(),
                                                   ptr.cuda(), 4.0)
        same = torch.equal(gi.cpu(), i) and {
            tuple(r) for r in torch.cat([gi[:, None], gj[:, None], gs], 1).cpu().tolist()
        } == {tuple(r) for r in torch.cat([i[:, None], j[:, None], s], 1).tolist()}
        ok &= same
        _line("check (CUDA)", "same pairs as CPU" if same else "DIFFERENT from CPU")
    print("\nRESULT: " + ("the compiled op works." if ok else "the compiled op gives WRONG results."))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
