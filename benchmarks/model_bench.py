"""Energy+forces time per call of mlpot's models beside DeePMD-kit se_e2_a and MACE, in one run.

Each case runs in its own process (so its peak RSS is its own), mlpot and peer cases interleaved,
after waiting for the machine to go quiet. The peers are timed by <shared>/bench/model_worker.py
(``--shared DIR``, default ``shared`` beside the repository) in the peer venv (``--peer-python``,
made by <shared>/bench/setup_venv.sh), mlpot by this file's worker mode, on the same structures
(``water_box``: 192 and 1,536 atoms of liquid water, atom for atom the peers' boxes) with the same
timing rules (``timeit``: warm-ups, then the median of 5 calls, fewer for slow calls).

Pairs compared (untrained models, equal hyperparameters):
  dp_se_e2_a (DeePMD-kit's water example: rcut 6, embedding [25, 50, 100], axis 16, fitting
      [240, 240, 240])                      vs DeePMD-kit se_e2_a raw model call (its own NL)
  nequip at MACE "small" settings (64 channels of l=0 features, spherical harmonics to l=3,
      correlation 3, 2 layers, r_max 5, radial MLP [64, 64, 64])   vs MACE small raw call
mlpot's time includes its neighbor list (MACE's raw call does not: a handicap for mlpot).
EGNN and nequip at its defaults have no peer here; they are timed for the scaling table. The
scaling cases time mlpot alone from 192 to 12,288 atoms (time per atom should stay constant).

    python benchmarks/model_bench.py                 # all cases (about 15 minutes)
    python benchmarks/model_bench.py --quick         # 192 atoms only
    python benchmarks/model_bench.py --only dp_se_e2_a   # one model, merged into the results file
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import (add_peer_python_option, add_shared_option, machine_info, peak_rss_mb,
                     peer_python, reset_peak_rss, shared_path, timeit, wait_quiet, water_box,
                     write_json)

HERE = Path(__file__).resolve().parent
SIZES = {"water192": 4, "water1536": 8, "water12288": 16}

MLPOT = {
    "dp_se_e2_a": {"cutoff": 6.0, "hparams": {}},
    "nequip-mace-small": {"cutoff": 5.0, "hparams": {
        "num_features": 64, "l_max": 3, "feature_l_max": 0, "correlation": 3, "num_layers": 2,
        "radial_mlp": [64, 64, 64], "avg_num_neighbors": 40.0, "cutoff_p": 5.0}},
    "egnn": {"cutoff": 5.0, "hparams": {}},
    "nequip": {"cutoff": 5.0, "hparams": {}},  # defaults: l <= 2 features of both parities
}
PEER_OF = {"dp_se_e2_a": "dp-se_e2_a", "nequip-mace-small": "mace-small"}


# ------------------------------------------------------------------ worker (one case, own process)
def worker(model: str, dtype: str, system: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from mlpot.data import AtomicData, TypeMap
    from mlpot.models import build_model

    atoms = water_box(SIZES[system])
    spec = MLPOT[model]
    name = "nequip" if model.startswith("nequip") else model
    torch.manual_seed(0)
    m = build_model(name, ["O", "H"], cutoff=spec["cutoff"], dtype=dtype, **spec["hparams"])
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    d = AtomicData.from_ase(atoms, dtype=getattr(torch, dtype))
    d.atom_types = TypeMap(["O", "H"]).types(d.atomic_numbers.numpy())
    inp = d.as_dict()

    def call():
        out = m(dict(inp), compute_forces=True)
        out["forces"].sum().item()

    reset_peak_rss()
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    # steady state (an MD run makes thousands of calls): one more untimed call, then 5 (3 for
    # slow calls); the first calls at 10k atoms run 2-3x slower while the allocator's heap grows
    t = timeit(call, warmup=1, repeat=5 if first < 2 else 3)
    return {"tool": "mlpot", "model": model, "dtype": dtype, "system": system, "N": len(atoms),
            "threads": threads, "ms": 1e3 * t["median_s"], "ms_min": 1e3 * t["min_s"],
            "n": t["n"], "peak_rss_mb": round(peak_rss_mb()), "other_load": t["other_load"],
            "params": sum(p.numel() for p in m.parameters())}


# ------------------------------------------------------------------ driver
def run_case(cmd, cwd=None, env=None):
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd,
                         env=dict(os.environ, **(env or {})))
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        print("FAILED", " ".join(cmd), out.stderr[-1500:], flush=True)
        return None
    return json.loads(lines[-1])


def mlpot_case(model, dtype, system, threads):
    return run_case([sys.executable, str(Path(__file__)), "--worker", model, dtype, system,
                     str(threads)], cwd=str(HERE.parent))


def peer_case(model, dtype, system, threads, python, bench):
    # e3nn 0.4.4 (MACE's pin) unpickles its constants with torch.load: the peer venv needs this;
    # mlpot's own worker runs without it
    r = run_case([python, "model_worker.py", PEER_OF[model], dtype, system, str(threads), "raw"],
                 cwd=str(bench), env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    if r is None:
        return None
    raw = r["raw"]
    return {"tool": "peer", "model": PEER_OF[model], "dtype": dtype, "system": system,
            "N": r["N"], "threads": threads, "ms": raw["ms"], "ms_min": raw["ms_min"],
            "n": raw["n"], "peak_rss_mb": raw["peak_rss_mb"], "other_load": raw["other_load"],
            "params": r.get("params")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", nargs=4, metavar=("MODEL", "DTYPE", "SYSTEM", "THREADS"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=str(HERE / "results" / "model_bench.json"))
    p.add_argument("--only", choices=sorted(MLPOT),
                   help="time this model alone; its rows replace its old ones in --json")
    add_shared_option(p)
    add_peer_python_option(p)
    args = p.parse_args()
    if args.worker:
        m, d, s, t = args.worker
        print(json.dumps(worker(m, d, s, int(t))), flush=True)
        return
    systems = ["water192"] if args.quick else ["water192", "water1536"]
    pairs = []
    for model in PEER_OF:
        if args.only and model != args.only:
            continue
        for dtype in ("float32", "float64"):
            for system in systems:
                for threads in (2, 1):
                    if threads == 1 and system != "water192":
                        continue
                    pairs.append((model, dtype, system, threads))
    if pairs:  # the peers' side: their worker in the shared folder, run by the peer venv
        bench = shared_path(args.shared, "bench", "model_worker.py",
                            what="the peers' model worker").parent
        python = peer_python(args.peer_python, args.shared)
    rows, compare = [], []
    for case in pairs:
        res = {}
        for tool, fn in (("mlpot", mlpot_case),
                         ("peer", lambda *c: peer_case(*c, python=python, bench=bench))):
            wait_quiet(limit=0.3, max_wait=300)
            res[tool] = fn(*case)
        rows += [r for r in res.values() if r]
        if res["mlpot"] and res["peer"]:
            c = {"model": case[0], "peer": PEER_OF[case[0]], "dtype": case[1],
                 "system": case[2], "threads": case[3], "mlpot_ms": round(res["mlpot"]["ms"], 1),
                 "peer_ms": round(res["peer"]["ms"], 1),
                 "ratio": round(res["mlpot"]["ms"] / res["peer"]["ms"], 3),
                 "mlpot_peak_mb": res["mlpot"]["peak_rss_mb"],
                 "peer_peak_mb": res["peer"]["peak_rss_mb"]}
            compare.append(c)
            print(json.dumps(c), flush=True)
    scaling = []
    if not args.quick:
        for model in MLPOT:
            if args.only and model != args.only:
                continue
            for system in SIZES:
                wait_quiet(limit=0.3, max_wait=300)
                r = mlpot_case(model, "float32", system, 2)
                if r:
                    r["us_per_atom"] = round(1e3 * r["ms"] / r["N"], 2)
                    scaling.append(r)
                    print(json.dumps({k: r[k] for k in ("model", "N", "ms", "us_per_atom",
                                                        "peak_rss_mb")}), flush=True)
    out = {"machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M"),
           "compare": compare, "scaling": scaling, "rows": rows}
    if args.only and Path(args.json).exists():  # keep the other models' rows, with their date
        old = json.loads(Path(args.json).read_text())
        keep = {k: [r for r in old.get(k, []) if r["model"] not in (args.only, PEER_OF.get(
            args.only))] for k in ("compare", "scaling", "rows")}
        out = {"machine": out["machine"], "date": old.get("date"),
               "dates": {**old.get("dates", {}), args.only: out["date"]},
               **{k: keep[k] + out[k] for k in keep}}
    write_json(args.json, out)
    print(table(out))


def table(out) -> str:
    lines = ["| mlpot model | peer | dtype | atoms | threads | mlpot ms | peer ms | ratio | "
             "peak MB mlpot / peer |", "|---|---|---|---|---|---|---|---|---|"]
    for c in out["compare"]:
        lines.append(f"| {c['model']} | {c['peer']} | {c['dtype']} | {c['system'][5:]} | "
                     f"{c['threads']} | {c['mlpot_ms']} | {c['peer_ms']} | {c['ratio']:.2f} | "
                     f"{c['mlpot_peak_mb']} / {c['peer_peak_mb']} |")
    if out["scaling"]:
        lines += ["", "| model (float32, 2 threads) | atoms | ms | us/atom | peak MB |",
                  "|---|---|---|---|---|"]
        for r in out["scaling"]:
            lines.append(f"| {r['model']} | {r['N']} | {r['ms']:.0f} | {r['us_per_atom']} | "
                         f"{r['peak_rss_mb']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
