"""The .pt2 (AOTInductor) package against the TorchScript file: time per energy+forces call, the
memory of one call, and the export time, for the three model families.

For each family (untrained, default hyperparameters, as ``deploy_bench.py``), exported both ways
from the same weights: the bare ``mlpot.load(...)`` call (``model(data, True, False)``, the call
every interface makes) on water boxes of size^3 molecules (default 4 and 8: 192 and 1,536 atoms)
at each thread count. The two formats alternate within each round (taking turns at going first,
after an untimed call), each timed over ``--calls`` calls; the result is the median over rounds
with the spread (max - min) / median. The forces of the two are compared on every box.

Memory (``--memory-sizes``, default 8 and 16: 1,536 and 12,288 atoms): the peak RSS of one call
above the RSS after loading, each (family, format, size) in its own process; a case whose
estimate from the smaller box (memory grows with the pair count) exceeds ``--memory-limit-gb``
is not run and its estimate is reported instead.

Usage: python benchmarks/pt2_bench.py [--models egnn dp_se_e2_a nequip] [--dtype float32]
           [--sizes 4 8] [--threads 1 2] [--rounds 7] [--calls 3] [--memory-sizes 8 16]
           [--json benchmarks/results/pt2_bench.json]
       python benchmarks/pt2_bench.py --profile --sizes 4 --threads 1 --calls 5
           [--json benchmarks/results/pt2_profile.json]   (where the time goes)
       python benchmarks/pt2_bench.py --blocking --sizes 8 --threads 1 --rounds 5
           [--json benchmarks/results/pt2_blocking.json]  (TorchScript blocked vs one block)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _common import (machine_info, peak_rss_mb, portable, reset_peak_rss,  # noqa: E402
                     water_box, write_json)


def box_inputs(model, n: int):
    import torch

    from mlpot import keys as K

    atoms = water_box(n)
    return {K.POSITIONS: torch.tensor(atoms.positions, dtype=model.dtype),
            K.ATOM_TYPES: model.atom_types(atoms.numbers),
            K.CELL: torch.tensor(atoms.cell.array, dtype=model.dtype)[None],
            K.PBC: torch.ones(1, 3, dtype=torch.bool)}


def call(model, data):
    from mlpot import keys as K

    out = model(dict(data), True, False)
    out[K.FORCES].sum().item()
    return out


def export_both(name: str, dtype: str, folder: str) -> dict:
    """Export one untrained model both ways; the paths and wall times of each export."""
    import torch

    from mlpot.export import export
    from mlpot.models import build_model

    torch.manual_seed(0)
    model = build_model(name, ["H", "O"], dtype=dtype).eval()
    row = {}
    for fmt, suffix in (("torchscript", ".pt"), ("aoti", ".pt2")):
        path = os.path.join(folder, name + suffix)
        t0 = time.perf_counter()
        export(model, path)
        row[fmt] = {"path": path, "export_s": round(time.perf_counter() - t0, 1),
                    "MB": round(os.path.getsize(path) / 1e6, 2)}
    return row


def interleaved_times(models: dict, data, rounds: int, calls: int) -> dict:
    """Seconds per call of each model over ``rounds`` rounds (lists), the models taking turns at
    going first, each round's first model after an untimed call (the first call after a switch
    runs cold), ``calls`` calls timed together."""
    for m in models.values():
        call(m, data)
    times = {k: [] for k in models}
    names = list(models)
    for r in range(rounds):
        order = names[r % 2:] + names[:r % 2]
        call(models[order[0]], data)
        for k in order:
            t0 = time.perf_counter()
            for _ in range(calls):
                call(models[k], data)
            times[k].append((time.perf_counter() - t0) / calls)
    return times


def time_calls(paths: dict, n: int, rounds: int, calls: int) -> dict:
    """Median seconds per call of each format on the n^3 water box, interleaved rounds."""
    import torch

    from mlpot import keys as K
    from mlpot.export import load

    models = {fmt: load(p) for fmt, p in paths.items()}
    data = box_inputs(models["torchscript"], n)
    outs = {fmt: call(m, data) for fmt, m in models.items()}  # warm-up, and the comparison
    f_ts, f_aoti = outs["torchscript"][K.FORCES], outs["aoti"][K.FORCES]
    times = interleaved_times(models, data, rounds, calls)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"n_atoms": int(data[K.POSITIONS].shape[0]), "threads": torch.get_num_threads(),
            "ms_per_call": {k: round(1e3 * v, 2) for k, v in med.items()},
            "spread": {k: round((max(v) - min(v)) / med[k], 3) for k, v in times.items()},
            "speedup_pt2": round(med["torchscript"] / med["aoti"], 3),
            "max_force_diff": float((f_ts - f_aoti).abs().max()),
            "max_force": float(f_ts.abs().max())}


def categorize(name: str) -> str:
    """The kind of work a profiled kernel or op does, from its name."""
    low = name.lower()
    if "neighbor_list" in low:
        return "neighbor list"
    if any(k in low for k in ("mm", "linear", "matmul", "baddbmm")) and "cpp_fused" not in low:
        return "matmul (BLAS)"
    if any(k in low for k in ("index_add", "scatter", "index_put")):
        return "sums over edges (scatter)"
    if any(k in low for k in ("index_select", "gather", "index", "embedding")):
        return "gathers"
    if "cpp_fused" in low:
        return "other fused elementwise"
    if low.startswith("aten::"):
        return "elementwise and other ATen ops"
    return "interpreter and other"


def profile_case(name: str, dtype: str, n: int, threads: int, calls: int) -> dict:
    """Self CPU time per call by kind of work: TorchScript (ATen ops), TorchScript of the paths
    the .pt2 is traced from, and the .pt2 compiled with kernel profiling (each generated kernel
    recorded by name)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mlpot.aoti import export_aoti, traceable_copy
    from mlpot.checkpoint import model_metadata
    from mlpot.export import FORMAT_VERSION, ExportedModel, _script, export, load
    from mlpot.models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(name, ["H", "O"], dtype=dtype).eval()
    folder = tempfile.mkdtemp(prefix="mlpot-pt2-profile-")
    paths = {"torchscript": os.path.join(folder, "m.pt"), "aoti": os.path.join(folder, "m.pt2")}
    export(model, paths["torchscript"])
    export_aoti(model, paths["aoti"], model_metadata(model, FORMAT_VERSION),
                inductor_options={"cpp.enable_kernel_profile": True,
                                  "cpp.descriptive_names": "original_aten"})
    # the TorchScript of the copy the .pt2 is traced from (one block, the traceable paths):
    # separates the cost of those paths from that of the compiler
    single = ExportedModel(_script(traceable_copy(model)), model_metadata(model, FORMAT_VERSION))
    result = {}
    for fmt, path in list(paths.items()) + [("torchscript_traced_paths", None)]:
        m = load(path) if path else single
        data = box_inputs(m, n)
        for _ in range(2):
            call(m, data)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(calls):
                call(m, data)
            wall = (time.perf_counter() - t0) / calls
        kinds, top = {}, []
        for ev in prof.key_averages():
            ms = ev.self_cpu_time_total / 1e3 / calls
            kinds[categorize(ev.key)] = kinds.get(categorize(ev.key), 0.0) + ms
            top.append((ms, ev.key))
        top.sort(reverse=True)
        result[fmt] = {"ms_per_call": round(1e3 * wall, 2),
                       "self_ms_by_kind": {k: round(v, 2) for k, v in
                                           sorted(kinds.items(), key=lambda kv: -kv[1])},
                       "top": [{"name": k[:120], "self_ms": round(v, 2)} for v, k in top[:8]]}
    return {"model": name, "n_atoms": 3 * n ** 3, "threads": threads, **result}


BLOCKING = ("chunk_atoms", "block_bytes", "radial_block_bytes")  # 0: one block, as in the .pt2


def blocking_case(name: str, dtype: str, n: int, rounds: int, calls: int) -> dict:
    """The TorchScript file as exported (blocked: the Deep Potential's chunks of centres,
    ``egnn``'s and ``nequip``'s edge blocks) against the same file with every block size 0, the
    one block that the .pt2 runs: how much of the .pt2's time at a size is the lost blocking."""
    import torch

    from mlpot.export import export, load
    from mlpot.models import build_model

    torch.manual_seed(0)
    model = build_model(name, ["H", "O"], dtype=dtype).eval()
    path = os.path.join(tempfile.mkdtemp(prefix="mlpot-pt2-blocking-"), "m.pt")
    export(model, path)
    blocked, one = load(path), load(path)
    for module in one.module.modules():
        for attr in BLOCKING:
            if hasattr(module, attr):
                setattr(module, attr, 0)
    data = box_inputs(blocked, n)
    models = {"blocked": blocked, "one block": one}
    call(blocked, data)
    times = interleaved_times(models, data, rounds, calls)
    return {"model": name, "n_atoms": int(data["positions"].shape[0]),
            "threads": torch.get_num_threads(),
            "ms_per_call": {k: round(1e3 * statistics.median(v), 1) for k, v in times.items()}}


def memory_child(path: str, n: int) -> None:
    """(child process) Peak RSS of one call above the RSS after loading and a small call."""
    import torch

    from mlpot.export import load

    torch.set_num_threads(1)
    model = load(path)
    call(model, box_inputs(model, 2))  # first-call set-up (24 atoms) before the count
    data = box_inputs(model, n)
    reset_peak_rss()
    base = peak_rss_mb()
    call(model, data)
    print(json.dumps({"peak_mb": round(peak_rss_mb() - base, 1)}))


def measure_memory(path: str, n: int) -> float:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", path,
                          str(n)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=["dp_se_e2_a", "egnn", "nequip"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--sizes", nargs="*", type=int, default=[4, 8],
                   help="water boxes of size^3 molecules to time")
    p.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=3, help="calls per format and round")
    p.add_argument("--memory-sizes", nargs="*", type=int, default=[8, 16])
    p.add_argument("--memory-limit-gb", type=float, default=6.0)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true",
                   help="instead: where the time goes, by kind of work, for each model at the "
                        "first size and thread count (the .pt2 compiled with kernel profiling)")
    p.add_argument("--blocking", action="store_true",
                   help="instead: TorchScript blocked against the one block of the .pt2, for "
                        "each model at each size (first thread count)")
    args = p.parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child[0], int(args.memory_child[1]))
    import torch

    if args.profile:
        rows = []
        for name in args.models:
            row = profile_case(name, args.dtype, args.sizes[0], args.threads[0], args.calls)
            rows.append(row)
            for fmt in ("torchscript", "torchscript_traced_paths", "aoti"):
                kinds = ", ".join(f"{k} {v:.1f}" for k, v in row[fmt]["self_ms_by_kind"].items())
                print(f"{name} {row['n_atoms']} atoms {fmt}: {row[fmt]['ms_per_call']:.1f} ms "
                      f"per call; self ms by kind: {kinds}")
        if args.json:
            write_json(args.json, {"profile": rows, "machine": machine_info(),
                                   "load": os.getloadavg(),
                                   "argv": portable(sys.argv[1:] if argv is None
                                                    else list(argv))})
        return rows

    if args.blocking:
        torch.set_num_threads(args.threads[0])
        rows = []
        for name in args.models:
            for n in args.sizes:
                row = blocking_case(name, args.dtype, n, args.rounds, args.calls)
                rows.append(row)
                print(f"{name} {row['n_atoms']} atoms, {row['threads']} thr, TorchScript: "
                      f"blocked {row['ms_per_call']['blocked']} ms, one block "
                      f"{row['ms_per_call']['one block']} ms", flush=True)
        if args.json:
            write_json(args.json, {"blocking": rows, "machine": machine_info(),
                                   "load": os.getloadavg(),
                                   "argv": portable(sys.argv[1:] if argv is None
                                                    else list(argv))})
        return rows

    load_before = os.getloadavg()
    folder = tempfile.mkdtemp(prefix="mlpot-pt2-bench-")
    print(f"torch {torch.__version__}, {args.dtype}, load average {load_before[0]:.2f}")
    results = {"machine": machine_info(), "dtype": args.dtype, "load_before": load_before,
               "models": {}}
    for name in args.models:
        torch.set_num_threads(max(args.threads))
        exported = export_both(name, args.dtype, folder)
        paths = {fmt: row.pop("path") for fmt, row in exported.items()}
        print(f"{name}: export TorchScript {exported['torchscript']['export_s']} s, .pt2 "
              f"{exported['aoti']['export_s']} s ({exported['aoti']['MB']} MB)")
        entry = {"export": exported, "calls": [], "memory": []}
        for threads in args.threads:
            torch.set_num_threads(threads)
            for n in args.sizes:
                row = time_calls(paths, n, args.rounds, args.calls)
                row["load_avg_1min"] = round(os.getloadavg()[0], 2)
                entry["calls"].append(row)
                ms = row["ms_per_call"]
                print(f"  {row['n_atoms']:6d} atoms, {threads} thr: TorchScript "
                      f"{ms['torchscript']:8.2f} ms, .pt2 {ms['aoti']:8.2f} ms, "
                      f"speed-up {row['speedup_pt2']:.2f}x (spread "
                      f"{row['spread']['torchscript']:.0%} / {row['spread']['aoti']:.0%}; "
                      f"load {row['load_avg_1min']})")
        for fmt, path in paths.items():
            last = None
            for n in sorted(args.memory_sizes):
                atoms = 3 * n ** 3
                if last is not None:
                    estimate = last[1] * atoms / last[0]
                    if estimate > 1024 * args.memory_limit_gb:
                        entry["memory"].append({"format": fmt, "n_atoms": atoms,
                                                "estimated_peak_mb": round(estimate)})
                        print(f"  memory {fmt} {atoms} atoms: ~{estimate / 1024:.1f} GB "
                              "(estimated from the smaller box, not run)")
                        continue
                mb = measure_memory(path, n)
                last = (atoms, mb)
                entry["memory"].append({"format": fmt, "n_atoms": atoms, "peak_mb": mb})
                print(f"  memory {fmt} {atoms} atoms: {mb:.0f} MB")
        results["models"][name] = entry
        if args.json:
            write_json(args.json, dict(results, argv=portable(sys.argv[1:] if argv is None
                                                              else list(argv))))
    results["load_after"] = os.getloadavg()
    if args.json:
        write_json(args.json, dict(results, argv=portable(sys.argv[1:] if argv is None
                                                          else list(argv))))
    return results


if __name__ == "__main__":
    main()
