"""Time per atom of the peers' raw model calls from 192 to 12,288 atoms of water (context for the
scaling rows of model_bench.py). Run with the peer venv's Python:

    /tmp/peers/bin/python benchmarks/peer_scaling.py [--shared DIR]  # MACE small, float32, 2 threads

Each size runs in its own process (peak RSS is its own); the model is built by
<shared>/bench/model_worker.py (``--shared``, default ``shared`` beside the repository) and timed as
there (raw call on a prebuilt graph, energy + forces; neighbor list excluded). Writes
benchmarks/results/peer_scaling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import (add_shared_option, command_line, peak_rss_mb, require_module, reset_peak_rss,
                     shared_path, timeit, wait_quiet, water_box, write_json)

HERE = Path(__file__).resolve().parent
SIZES = {"water192": 4, "water1536": 8, "water12288": 16}


def worker(system: str, threads: int, bench: Path) -> dict:
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    sys.path.insert(0, str(bench))
    import torch

    require_module("mace", "MACE is the peer timed here")
    from mace import data as mdata
    from mace.tools import torch_geometric, utils
    from model_worker import build_mace  # type: ignore

    torch.set_num_threads(threads)
    atoms = water_box(SIZES[system])
    model = build_mace("small", "float32")
    for p in model.parameters():
        p.requires_grad = False
    z_table = utils.AtomicNumberTable([1, 8, 13])
    data = mdata.AtomicData.from_config(mdata.config_from_atoms(atoms), z_table=z_table,
                                        cutoff=5.0)
    batch = torch_geometric.batch.Batch.from_data_list([data]).to_dict()

    def call():
        out = model(dict(batch), compute_force=True, compute_stress=False)
        out["forces"].sum().item()

    reset_peak_rss()
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    t = timeit(call, warmup=1, repeat=5 if first < 2 else 3)  # steady state, as model_bench.py
    return {"tool": "mace-small", "N": len(atoms), "edges": int(data.edge_index.shape[1]),
            "threads": threads, "ms": 1e3 * t["median_s"], "n": t["n"],
            "us_per_atom": round(1e6 * t["median_s"] / len(atoms), 2),
            "peak_rss_mb": round(peak_rss_mb())}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", nargs=2, metavar=("SYSTEM", "THREADS"), help=argparse.SUPPRESS)
    add_shared_option(p)
    args = p.parse_args()
    bench = shared_path(args.shared, "bench", "model_worker.py", what="the peers' model worker"
                        ).parent
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), bench)), flush=True)
        return
    require_module("mace", "MACE is the peer timed here")
    rows = []
    for system in SIZES:
        wait_quiet(limit=0.3, max_wait=300)
        out = subprocess.run([sys.executable, __file__, "--worker", system, "2",
                              "--shared", str(args.shared)], capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode or not lines:
            print("FAILED", system, out.stderr[-1500:])
            continue
        rows.append(json.loads(lines[-1]))
        print(json.dumps(rows[-1]), flush=True)
    write_json(HERE / "results" / "peer_scaling.json",
               {"date": time.strftime("%Y-%m-%d %H:%M"), "command": command_line(), "rows": rows})


if __name__ == "__main__":
    main()
