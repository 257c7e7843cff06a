"""mlpot's neighbor list beside vesin, vesin.torch, matscipy and ASE, in one process.

Full periodic neighbor lists ('ijS': both (i, j, S) and (j, i, -S)) on water-density boxes of
~1k, ~10k and ~100k atoms (``water_box(7|15|32)``, the peer benchmarks' structures), cutoffs 5 and
6 A. The tools are interleaved case by case (every tool runs on a structure before the next
structure is built), and the machine is given time to go quiet before each timing
(``wait_quiet``): the machines here have 2 cores and are shared, so only ratios taken in
one run mean anything.

Tools (names as in the table):
  mlpot        ``mlpot.neighbor_list`` (public API; the C++ op when it builds, else the fallback;
               the backend in use is printed and stored in the JSON)
  mlpot-torch  ``mlpot.neighbors.neighbor_list_torch``, the pure-PyTorch fallback (N <= ~10k)
  vesin        ``vesin.NeighborList(...).compute`` (numpy API, default threads)
  vesin.torch  ``vesin.torch.NeighborList(...).compute`` on float64 tensors
  matscipy     ``matscipy.neighbours.neighbour_list('ijS')``
  ase          ``ase.neighborlist.neighbor_list('ijS')`` (N <= ~10k, it is slow)

Set-up and run (from the repository root; the peer venv holds the peer tools):
  bash ../shared/bench/setup_venv.sh                     # makes the peer venv, /tmp/peers (~3 min)
  /tmp/peers/bin/pip install --no-deps -e . ninja        # mlpot into the peer venv
  /tmp/peers/bin/python benchmarks/nl_bench.py [--quick] [--rounds R] [--max-wait S] [--tools ...]

--quick: ~1k and ~10k atoms only (JSON goes to results/nl_bench_quick.json).
Timing: the machine is shared, so the fast tools (mlpot, vesin, vesin.torch, matscipy) are
timed call by call, round-robin (forward and reverse order alternating), after one untimed
warm-up call each: every tool sees the same conditions, and mlpot/vesin is the median of the
per-round ratios. The slow tools (mlpot-torch, ase) are timed afterwards, 5 calls or ~10 s.
--rounds R: at least R rounds per case (default 7; more, up to 61, for fast cases, see --target-s)
--max-wait S: wait at most S seconds for a quiet machine before each block of timings (default
            120; then time anyway; each row records `other_load`, flagged '*' above 0.3 cores).
Writes benchmarks/results/nl_bench.json and prints a markdown table, the mlpot/vesin ratio per
case, a linear-scaling check (microseconds per atom at each size) and whether all tools found the
same pairs.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
import traceback

import numpy as np
import torch

from _common import (TICK, command_line, cpu_jiffies, machine_info, portable, timeit,
                     use_interpreter_bin, wait_quiet, water_box, write_json)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
use_interpreter_bin()  # mlpot builds its C++ op with ninja on first use

SIZES = [7, 15, 32]  # water_box(n): 3 n^3 atoms -> 1029, 10125, 98304
CUTOFFS = [5.0, 6.0]
SLOW_TOOLS_MAX_N = 11000  # ase and the pure-PyTorch fallback only up to ~10k atoms
MAX_S = 10.0  # stop repeating a case after ~10 s of timed calls (never fewer than 3)
SINGLE_S = 15.0  # a first call slower than this is reported as that single timing
TOOL_ORDER = ["mlpot", "vesin", "vesin.torch", "matscipy", "mlpot-torch", "ase"]
SLOW_TOOLS = {"ase", "mlpot-torch"}
CONTENDED = 0.3  # cores used by other processes during a timing above which it is re-taken


def _sha256(path):
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError:
        return None


def _mtime(path):
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(path)))
    except OSError:
        return None


def load_tools():
    """Import every tool; a tool that fails to import is left out (and said so)."""
    mods, missing = {}, {}
    try:
        import mlpot
        import mlpot.neighbors as mnl
    except Exception as err:  # noqa: BLE001 - keep benchmarking the peers
        missing["mlpot"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    else:
        mods["mlpot.neighbors"] = mnl  # the fallback can run even when the op cannot
        cpp = os.path.join(REPO, "cpp", "neighbor_list.cpp")
        info = {"backend": None, "mlpot_file": portable(mlpot.__file__),
                "cpp_source_sha256_16": _sha256(cpp), "cpp_source_mtime": _mtime(cpp)}
        t0 = time.perf_counter()
        try:
            info["backend"] = mnl.backend()  # builds/loads the C++ op on first use
            mods["mlpot"] = mlpot
        except Exception as err:  # noqa: BLE001
            missing["mlpot"] = f"backend selection failed: {type(err).__name__}: {err}"
            traceback.print_exc()
        info["backend_select_s"] = round(time.perf_counter() - t0, 2)
        state = getattr(mnl, "_STATE", {})
        info["reason"] = state.get("reason", "")
        info["library"] = portable(state.get("library"))
        ext = sys.modules.get("mlpot.neighbors._extension")
        if ext is not None and isinstance(getattr(ext, "INFO", None), dict):
            info["extension"] = {k: portable(ext.INFO.get(k)) for k in
                                 ("action", "build_seconds", "library", "cuda_included")}
        mods["mlpot_info"] = info
    for name in ("vesin", "matscipy.neighbours", "ase.neighborlist"):
        try:
            mods[name] = __import__(name, fromlist=["_"])
        except Exception as err:  # noqa: BLE001
            missing[name] = f"{type(err).__name__}: {err}"
    try:  # vesin-torch: `vesin_torch` (0.6+); `vesin.torch` is its deprecated alias
        import vesin_torch as vt
    except ImportError:
        try:
            import vesin.torch as vt
        except Exception as err:  # noqa: BLE001
            vt, missing["vesin.torch"] = None, f"{type(err).__name__}: {err}"
    if vt is not None:
        mods["vesin.torch"] = vt
    return mods, missing


def make_tools(mods, atoms, rc):
    """name -> zero-argument callable returning (i, j, S) for this structure and cutoff."""
    pos = atoms.positions.copy()
    cell = np.asarray(atoms.cell[:]).copy()
    n = len(atoms)
    tpos = torch.tensor(pos, dtype=torch.float64)
    tcell = torch.tensor(cell, dtype=torch.float64)
    tools = {}
    if "mlpot" in mods:
        mlpot = mods["mlpot"]
        tools["mlpot"] = lambda: mlpot.neighbor_list(tpos, tcell, True, rc)
    if "mlpot.neighbors" in mods:
        mnl = mods["mlpot.neighbors"]
        if n <= SLOW_TOOLS_MAX_N and hasattr(mnl, "neighbor_list_torch"):
            cells_b = tcell[None]
            pbc_b = torch.ones(1, 3, dtype=torch.bool)
            ptr = torch.tensor([0, n], dtype=torch.long)
            tools["mlpot-torch"] = lambda: mnl.neighbor_list_torch(tpos, cells_b, pbc_b, ptr, rc)
    if "vesin" in mods:
        vesin = mods["vesin"]
        tools["vesin"] = lambda: vesin.NeighborList(cutoff=rc, full_list=True).compute(
            points=pos, box=cell, periodic=True, quantities="ijS")
    if "vesin.torch" in mods:
        vt = mods["vesin.torch"]
        tools["vesin.torch"] = lambda: vt.NeighborList(cutoff=rc, full_list=True).compute(
            points=tpos, box=tcell, periodic=True, quantities="ijS")
    if "matscipy.neighbours" in mods:
        mat_nl = mods["matscipy.neighbours"].neighbour_list
        tools["matscipy"] = lambda: mat_nl("ijS", positions=pos, cell=cell, pbc=[True] * 3,
                                           cutoff=rc)
    if "ase.neighborlist" in mods and n <= SLOW_TOOLS_MAX_N:
        ase_nl = mods["ase.neighborlist"].neighbor_list
        tools["ase"] = lambda: ase_nl("ijS", atoms, rc)
    return tools


def _as_np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def canonical(ijs):
    """(i, j, S) as one [P, 5] int64 array in lexicographic order (for set comparison)."""
    i, j, s = (_as_np(x).astype(np.int64) for x in ijs)
    a = np.concatenate([i[:, None], j[:, None], s.reshape(-1, 3)], axis=1)
    order = np.lexsort(a.T[::-1])
    return a[order]


def time_tool(fn):
    """Slow tools: first call (warm-up, also gives the pairs), then repeated timings."""
    out = []
    first = timeit(lambda: out.append(fn()), warmup=0, repeat=1)
    result = out[0]
    if first["median_s"] > SINGLE_S:
        return first, result
    warm = 1 if first["median_s"] < 0.5 else 0
    return timeit(fn, warmup=warm, repeat=5, max_seconds=MAX_S), result


def time_interleaved(tools, min_rounds, max_rounds, target_s):
    """Time the fast tools call by call, round-robin, so that they all see the same conditions.

    One untimed warm-up call per tool (its result is kept for the pair check), then rounds of one
    timed call per tool, alternating forward and reverse order. Each call is timed with
    ``timeit`` (repeat=1); ``other_load`` (cores used by other processes) is that of the whole
    block, the same for every tool in it. Returns (per-tool timing summaries, per-tool list of call times,
    results).
    """
    names = list(tools)
    results, first = {}, {}
    for name in names:
        t0 = time.perf_counter()
        results[name] = tools[name]()
        first[name] = time.perf_counter() - t0
    rounds = int(np.clip(np.ceil(target_s / max(max(first.values()), 1e-6)), min_rounds, max_rounds))
    calls = {name: [] for name in names}
    # Contention is measured over the whole block: per call it would be swamped by the 10 ms
    # granularity of /proc/stat for the millisecond-scale calls.
    b0, s0 = cpu_jiffies()
    c0, w0 = time.process_time(), time.perf_counter()
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            calls[name].append(timeit(tools[name], warmup=0, repeat=1))
    b1, s1 = cpu_jiffies()
    cpu, wall_block = time.process_time() - c0, time.perf_counter() - w0
    other = round(max(0.0, (b1 - b0) / TICK - cpu) / wall_block, 2)
    steal = round((s1 - s0) / TICK / wall_block, 2)
    summary = {}
    for name, cs in calls.items():
        ts = [c["median_s"] for c in cs]
        wall = sum(ts)
        summary[name] = {
            "median_s": statistics.median(ts), "min_s": min(ts), "n": len(ts),
            "cpu_ratio": sum(c["cpu_ratio"] * t for c, t in zip(cs, ts)) / wall,
            "other_load": other, "steal": steal,  # of the whole interleaved block
        }
    return summary, {n: [c["median_s"] for c in cs] for n, cs in calls.items()}, results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="~1k and ~10k atoms only")
    ap.add_argument("--rounds", type=int, default=7,
                    help="least number of interleaved rounds of the fast tools per case")
    ap.add_argument("--target-s", type=float, default=0.5,
                    help="more rounds (up to 61) for fast cases: about this many seconds of the "
                         "slowest fast tool")
    ap.add_argument("--tools", default="", help="comma-separated subset of " + ",".join(TOOL_ORDER))
    ap.add_argument("--max-wait", type=float, default=120.0,
                    help="seconds to wait for a quiet machine before each block of timings "
                         "(then time anyway; the timing records how contended it was)")
    ap.add_argument("--out", default="", help="JSON path (default results/nl_bench[_quick].json)")
    args = ap.parse_args()
    only = [t for t in args.tools.split(",") if t] or None

    torch.set_num_threads(2)
    mods, missing = load_tools()
    torch.set_num_threads(2)
    info = machine_info()
    mlpot_info = mods.get("mlpot_info", {"backend": None, "reason": missing.get("mlpot")})
    print(f"mlpot backend: {mlpot_info.get('backend')}"
          + (f"  ({mlpot_info.get('reason')})" if mlpot_info.get("reason") else ""), flush=True)
    for name, why in missing.items():
        print(f"left out: {name}: {why}", flush=True)
    if set(missing) - {"mlpot"}:
        print("the peer tools live in the peer venv: make it with `bash ../shared/bench/"
              "setup_venv.sh` and run this script with its python (see benchmarks/README.md)",
              flush=True)
    versions = {}
    for name in ("vesin", "matscipy", "ase", "mlpot"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            versions[name] = None

    sizes = SIZES[:2] if args.quick else SIZES
    rows, checks, ratios = [], [], []
    t_start = time.time()
    for n in sizes:
        atoms = water_box(n)
        N = len(atoms)
        for rc in CUTOFFS:
            tools = make_tools(mods, atoms, rc)
            names = [t for t in TOOL_ORDER if t in tools and (only is None or t in only)]
            fast = {t: tools[t] for t in names if t not in SLOW_TOOLS}
            slow = [t for t in names if t in SLOW_TOOLS]
            summary, results, errors, calls = {}, {}, {}, {}
            if fast:
                waited = wait_quiet(max_wait=args.max_wait)
                torch.set_num_threads(2)
                try:
                    summ, calls, res = time_interleaved(fast, args.rounds, 61, args.target_s)
                    for t in summ:
                        summ[t]["waited_s"] = round(waited, 1)
                    summary.update(summ)
                    results.update(res)
                except Exception as err:  # noqa: BLE001 - fall back to one tool at a time
                    print(f"N={N} rc={rc}: interleaved timing failed ({type(err).__name__}: "
                          f"{err}); timing the tools one by one", flush=True)
                    slow = list(fast) + slow
            for name in slow:
                waited = wait_quiet(max_wait=args.max_wait)
                torch.set_num_threads(2)
                try:
                    t, res = time_tool(tools[name])
                except Exception as err:  # noqa: BLE001 - report, keep going
                    errors[name] = f"{type(err).__name__}: {err}"
                    print(f"N={N} rc={rc} {name}: FAILED {errors[name]}", flush=True)
                    continue
                t["waited_s"] = round(waited, 1)
                summary[name], results[name] = t, res
            for name in names:
                if name not in summary:
                    continue
                t = summary[name]
                flag = "  CONTENDED" if t["other_load"] > CONTENDED else ""
                print(f"N={N:6d} rc={rc} {name:12s} pairs={len(results[name][0]):9d} "
                      f"{1e3 * t['median_s']:10.2f} ms (min {1e3 * t['min_s']:.2f}, n={t['n']}, "
                      f"cpu/wall {t['cpu_ratio']:.2f}, other procs {t['other_load']} cores){flag}",
                      flush=True)
            # pair check: counts for all, exact (i, j, S) sets of everything against vesin
            counts = {name: int(len(r[0])) for name, r in results.items()}
            ref_name = "vesin" if "vesin" in results else next(iter(results), None)
            same_sets = {}
            if ref_name is not None:
                ref = canonical(results[ref_name])
                for name, r in results.items():
                    if name != ref_name:
                        c = canonical(r)
                        same_sets[name] = bool(c.shape == ref.shape and np.array_equal(c, ref))
                del ref
            del results
            agree = bool(counts) and len(set(counts.values())) == 1 and all(same_sets.values())
            checks.append(dict(N=N, cutoff=rc, counts=counts, same_pairs_as=ref_name,
                               same_pairs=same_sets, agree=agree, errors=errors))
            if not agree:
                print(f"PAIR MISMATCH N={N} rc={rc}: counts {counts}, same sets as "
                      f"{ref_name}: {same_sets}", flush=True)
            for name in names:
                if name not in summary:
                    continue
                t = summary[name]
                rows.append(dict(
                    system="water", N=N, cutoff=rc, tool=name, pairs=counts.get(name),
                    ms=1e3 * t["median_s"], ms_min=1e3 * t["min_s"], repeats=t["n"],
                    interleaved=name in calls, cpu_ratio=round(t["cpu_ratio"], 2),
                    other_load=t["other_load"], steal=t["steal"], waited_s=t["waited_s"]))
            if "mlpot" in calls and "vesin" in calls:
                # the two are timed alternately, so each round's ratio sees the same conditions
                per_round = np.array(calls["mlpot"]) / np.array(calls["vesin"])
                ratios.append(dict(
                    N=N, cutoff=rc,
                    mlpot_over_vesin=float(np.median(per_round)),
                    ratio_of_medians=summary["mlpot"]["median_s"] / summary["vesin"]["median_s"],
                    q25=float(np.quantile(per_round, 0.25)), q75=float(np.quantile(per_round, 0.75)),
                    rounds=len(per_round)))
                r = ratios[-1]
                print(f"N={N:6d} rc={rc} mlpot/vesin = {r['mlpot_over_vesin']:.3f} (median of "
                      f"{r['rounds']} paired rounds; quartiles {r['q25']:.3f}-{r['q75']:.3f})",
                      flush=True)

    # ---- summaries ----
    def get(N, rc, tool):
        for r in rows:
            if r["N"] == N and r["cutoff"] == rc and r["tool"] == tool:
                return r
        return None

    cases = list(dict.fromkeys((r["N"], r["cutoff"]) for r in rows))
    Ns = sorted({r["N"] for r in rows})
    scaling = []
    for rc in CUTOFFS:
        for tool in TOOL_ORDER:
            us = {N: 1e3 * get(N, rc, tool)["ms"] / N for N in Ns if get(N, rc, tool)}
            if len(us) < 2:
                continue
            base = us[min(us)]
            scaling.append(dict(tool=tool, cutoff=rc, us_per_atom={str(k): v for k, v in us.items()},
                                rel_to_smallest={str(k): v / base for k, v in us.items()}))

    all_agree = bool(checks) and all(c["agree"] for c in checks)
    out = args.out or os.path.join(HERE, "results",
                                   "nl_bench_quick.json" if args.quick else "nl_bench.json")
    payload = {
        "benchmark": "neighbor lists ('ijS', full, periodic, float64), water boxes",
        "command": command_line(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_s": round(time.time() - t_start, 1),
        "machine": info, "versions": versions, "mlpot": mlpot_info, "left_out": missing,
        "rows": rows, "ratios_mlpot_over_vesin": ratios, "scaling_us_per_atom": scaling,
        "pair_checks": checks, "pair_counts_agree": all_agree,
    }
    write_json(out, payload)

    # ---- markdown ----
    tools = [t for t in TOOL_ORDER if any(r["tool"] == t for r in rows)]
    be = mlpot_info.get("backend")
    print(f"\nmlpot backend: {be}; torch {info['torch']}, {info['torch_threads']} threads, "
          f"{info['cpu']}, {info['nproc']} cores")
    print("\nMedian ms per call (full 'ijS' list, float64):\n")
    heads = [f"mlpot [{be}]" if t == "mlpot" else t for t in tools]
    print("| N atoms | cutoff (A) | pairs | " + " | ".join(heads) + " | mlpot/vesin |")
    print("|" + "---|" * (4 + len(tools)))
    for N, rc in cases:
        cells = []
        for t in tools:
            r = get(N, rc, t)
            cells.append("-" if r is None else
                         f"{r['ms']:.1f}" + ("*" if r["other_load"] > CONTENDED else ""))
        pairs = next(r["pairs"] for r in rows if r["N"] == N and r["cutoff"] == rc)
        rat = next((f"{x['mlpot_over_vesin']:.2f} ({x['q25']:.2f}-{x['q75']:.2f})"
                    for x in ratios if x["N"] == N and x["cutoff"] == rc), "-")
        print(f"| {N} | {rc:g} | {pairs} | " + " | ".join(cells) + f" | {rat} |")
    print(f"\nmlpot/vesin: median of the per-round ratios (the two are timed alternately), in "
          f"brackets the quartiles. * = other processes kept more than {CONTENDED} cores busy "
          "during that timing.")
    if len(Ns) > 1:
        print("\nTime per atom (microseconds); in brackets relative to the smallest box "
              "(1.0 = linear scaling):\n")
        print("| tool | cutoff (A) | " + " | ".join(f"N={N}" for N in Ns) + " |")
        print("|" + "---|" * (2 + len(Ns)))
        for s_ in scaling:
            cells = [f"{s_['us_per_atom'][str(N)]:.3f} ({s_['rel_to_smallest'][str(N)]:.2f})"
                     if str(N) in s_["us_per_atom"] else "-" for N in Ns]
            print(f"| {s_['tool']} | {s_['cutoff']:g} | " + " | ".join(cells) + " |")
    print(f"\nall tools found the same pairs: {all_agree}")
    print(f"JSON: {os.path.abspath(out)}")


if __name__ == "__main__":
    main()
