"""Does the neighbor list's time grow linearly with N? mlpot beside vesin from 3k to 375k atoms.

Water-density boxes (``water_box(n)``, the peer benchmarks' structures, 3 n^3 atoms) at cutoffs
5 and 6 A. For each size the two tools are called alternately (round-robin, after one untimed
warm-up each), like repeated calls in MD; the table gives the median time, microseconds per atom,
nanoseconds per pair, the mlpot/vesin ratio, and mlpot's first call (cold: fresh output memory).
Linear scaling means the time per atom stays constant as N grows.

    /tmp/peers/bin/python benchmarks/nl_scaling.py [--sizes 10 15 20 26 32 40 50] [--rounds 7]

(the peer venv's python, where vesin is: ``bash ../shared/bench/setup_venv.sh`` makes it).

Writes benchmarks/results/nl_scaling.json. Run it on a quiet machine (it waits for quiet before
each size, up to --max-wait seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from _common import (command_line, machine_info, require_module, use_interpreter_bin, wait_quiet,
                     water_box, write_json)

HERE = os.path.dirname(os.path.abspath(__file__))
use_interpreter_bin()  # mlpot builds its C++ op with ninja on first use


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[10, 15, 20, 26, 32, 40, 50])
    p.add_argument("--cutoffs", type=float, nargs="*", default=[5.0, 6.0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--max-wait", type=float, default=120.0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "nl_scaling.json"))
    args = p.parse_args()
    torch.set_num_threads(2)
    vesin = require_module("vesin", "it is the reference this script times mlpot against")

    import mlpot
    print("mlpot backend:", mlpot.neighbors.backend(), flush=True)
    rows = []
    for n in args.sizes:
        atoms = water_box(n)
        pos_np, cell_np = atoms.positions, atoms.cell.array
        pos, cell = torch.tensor(pos_np), torch.tensor(cell_np)
        pbc = torch.ones(3, dtype=torch.bool)
        for rc in args.cutoffs:
            mlpot.neighbors.empty_cache()
            wait_quiet(limit=0.3, max_wait=args.max_wait)
            t0 = time.perf_counter()
            out = mlpot.neighbor_list(pos, cell, pbc, rc)
            first = time.perf_counter() - t0
            pairs = int(out[0].numel())
            del out
            nl = vesin.NeighborList(cutoff=rc, full_list=True)
            nl.compute(points=pos_np, box=cell_np, periodic=True, quantities="ijS")
            times = {"mlpot": [], "vesin": []}
            calls = {"mlpot": lambda: mlpot.neighbor_list(pos, cell, pbc, rc),
                     "vesin": lambda: nl.compute(points=pos_np, box=cell_np, periodic=True,
                                                 quantities="ijS")}
            for r in range(args.rounds):
                order = ["mlpot", "vesin"] if r % 2 == 0 else ["vesin", "mlpot"]
                for name in order:
                    t0 = time.perf_counter()
                    res = calls[name]()
                    times[name].append(time.perf_counter() - t0)
                    del res
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"n_atoms": len(atoms), "cutoff": rc, "pairs": pairs,
                   "mlpot_ms": round(1e3 * med["mlpot"], 2),
                   "vesin_ms": round(1e3 * med["vesin"], 2),
                   "mlpot_first_call_ms": round(1e3 * first, 2),
                   "ratio": round(med["mlpot"] / med["vesin"], 3),
                   "mlpot_us_per_atom": round(1e6 * med["mlpot"] / len(atoms), 3),
                   "vesin_us_per_atom": round(1e6 * med["vesin"] / len(atoms), 3),
                   "mlpot_ns_per_pair": round(1e9 * med["mlpot"] / pairs, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_json(args.out, {"machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M"),
                          "command": command_line(), "rows": rows})
    print("\n| atoms | cutoff | pairs | mlpot ms | vesin ms | mlpot/vesin | mlpot us/atom | "
          "vesin us/atom | mlpot first call ms |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n_atoms']:,} | {r['cutoff']:g} | {r['pairs']:,} | {r['mlpot_ms']} | "
              f"{r['vesin_ms']} | {r['ratio']:.2f} | {r['mlpot_us_per_atom']} | "
              f"{r['vesin_us_per_atom']} | {r['mlpot_first_call_ms']} |")
    for rc in args.cutoffs:
        rs = [r for r in rows if r["cutoff"] == rc]
        if len(rs) > 1:
            base = [r for r in rs if r["n_atoms"] >= 10000][:1] or rs[:1]
            b = base[0]
            print(f"cutoff {rc:g}: time per atom relative to {b['n_atoms']:,} atoms: " + ", ".join(
                f"{r['n_atoms']:,}: mlpot {r['mlpot_us_per_atom'] / b['mlpot_us_per_atom']:.2f}x "
                f"vesin {r['vesin_us_per_atom'] / b['vesin_us_per_atom']:.2f}x" for r in rs))


if __name__ == "__main__":
    main()
