"""Time per atom of the peers' raw model calls from 192 to 12,288 atoms of water (context for the
scaling rows of model_bench.py). Run with the peer venv's Python:

    /tmp/peers/bin/python benchmarks/peer_scaling.py            # MACE small, float32, 2 threads

Each size runs in its own process (peak RSS is its own); timing as ../shared/bench/model_worker.py
(raw call on a prebuilt graph, energy + forces; neighbor list excluded). Writes
benchmarks/results/peer_scaling.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE.parents[1] / "shared" / "bench"
SIZES = {"water192": 4, "water1536": 8, "water12288": 16}


def worker(system: str, threads: int) -> dict:
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    sys.path.insert(0, str(BENCH))
    import torch
    from common import peak_rss_mb, reset_peak_rss, timeit, water_box  # type: ignore
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
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]))), flush=True)
        return
    sys.path.insert(0, str(BENCH))
    from common import wait_quiet  # type: ignore
    rows = []
    for system in SIZES:
        wait_quiet(limit=0.3, max_wait=300)
        out = subprocess.run([sys.executable, __file__, "--worker", system, "2"],
                             capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode or not lines:
            print("FAILED", system, out.stderr[-1500:])
            continue
        rows.append(json.loads(lines[-1]))
        print(json.dumps(rows[-1]), flush=True)
    (HERE / "results" / "peer_scaling.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
