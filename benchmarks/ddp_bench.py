"""Data-parallel training throughput on this CPU: training frames per second with torchrun's 2
processes x 1 thread, against 1 process x 1 thread and 1 process x 2 threads (the honest
baseline on 2 cores), on 3BPA (train_300K.xyz: 500 frames of 27 atoms).

Each setting is a whole ``mlpot train`` run with ``training.max_steps`` steps and one validation
at the end; the rate is (steps x batch_size x processes) / ``train_time_s`` from metrics.json
(the time in training steps, all-reduces included; start-up, data, statistics, validation and
plots excluded). ``training.batch_size`` is per process, as in MACE and DeePMD-kit, so 2
processes take twice the frames per step. Settings are interleaved in rounds (taking turns at
going first); each reports the median of its rounds with min and max, and its speed-up over
1 x 1 both as the ratio of the medians and as the median of the ratios within a round (the
target is judged on the latter: this machine's speed drifts by 10-20 % between rounds). Models
and their hyperparameters are those of train_bench.py (3BPA), batch size 5 per process.

    python benchmarks/ddp_bench.py [--models dp_se_e2_a nequip] [--steps N] [--rounds 3]
                                   [--shared DIR] [--json benchmarks/results/ddp_bench.json]

"2 processes x 1 thread" averages the gradients through shared memory (mlpot's default when
all processes are on one host, ``mlpot.train.distributed``); "2 processes x 1 thread, gloo
all-reduce" is the same run with gloo's TCP all-reduce (``MLPOT_DDP_ALLREDUCE=gloo``), as DDP
does by default.

Two more settings take the cost apart (diagnostics, not ways to train):
* "2 separate runs x 1 thread": two independent single-process runs at once (their frames/s
  added; each run's steps must overlap the other's, hence the longer default runs): what the
  machine gives two processes with no communication at all, the ceiling of any 2 x 1.
* "2 processes x 1 thread, no gradient all-reduce": torchrun as above with DDP's gradient
  all-reduce replaced by a hook that keeps each process's gradients (``mlpot.train.distributed``,
  environment ``MLPOT_BENCH_NO_GRADIENT_SYNC=1``; the parameters then differ between processes);
  every other synchronisation of a step stays. Its gap to 2 x 1 is the gradient all-reduce.

Target (issue: data-parallel training): 2 x 1 at least 1.7x the frames per second of 1 x 1.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import yaml

from _common import (add_shared_option, command_line, machine_info, shared_path, wait_quiet,
                     write_json)
from train_bench import CUTOFF, MODELS

from mlpot.train.distributed import ALLREDUCE, NO_GRADIENT_SYNC

HERE = Path(__file__).resolve().parent
SETTINGS = {"1 process x 1 thread": (1, 1), "1 process x 2 threads": (1, 2),
            "2 processes x 1 thread": (2, 1),
            "2 processes x 1 thread, gloo all-reduce": (2, 1),
            "2 processes x 1 thread, no gradient all-reduce": (2, 1),
            "2 separate runs x 1 thread": (1, 1)}
# steps per run (at batch 5): long enough that start-up's slow first steps do not decide the rate
# and that two separate runs' training overlaps (a Deep Potential step takes ~35 ms here)
# (Deep Potential: 600 since 2026-12-04 23:10; its runs of 300 steps drifted more between rounds)
STEPS = {"dp_se_e2_a": 600, "nequip": 60, "egnn": 100}


def config(data: Path, model: str, out: Path, steps: int, threads: int, batch: int) -> dict:
    m = MODELS[model]
    return {"data": {"train": str(data), "type_map": ["C", "H", "N", "O"],
                     "validation_fraction": 0.05},
            "model": {**m["model"], "cutoff": CUTOFF["3bpa"]},
            "loss": m["loss"], "optim": m["optim"],
            "training": {"batch_size": batch, "max_epochs": 1000, "max_steps": steps,
                         "eval_every": 1000, "out_dir": str(out), "progress": False,
                         "threads": threads, "seed": 0}}


def run_setting(name: str, data: Path, model: str, steps: int, batch: int,
                workdir: Path) -> dict:
    """One run of a setting; two at once for the separate-runs ceiling (frames/s added)."""
    nproc, threads = SETTINGS[name]
    if name.startswith("2 separate runs"):
        res: list = [None, None]

        def go(k: int) -> None:
            res[k] = one_run(data, model, nproc, threads, steps, batch, workdir)

        workers = [threading.Thread(target=go, args=(k,)) for k in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if None in res:
            raise SystemExit(f"{model} {name}: a run failed")
        return {"frames_per_s": res[0]["frames_per_s"] + res[1]["frames_per_s"],
                "runs": res, "frames": res[0]["frames"] + res[1]["frames"]}
    return one_run(data, model, nproc, threads, steps, batch, workdir,
                   no_gradient_sync="no gradient all-reduce" in name,
                   gloo="gloo all-reduce" in name)


def one_run(data: Path, model: str, nproc: int, threads: int, steps: int, batch: int,
            workdir: Path, no_gradient_sync: bool = False, gloo: bool = False) -> dict:
    out = Path(tempfile.mkdtemp(dir=workdir))
    cfg = out / "config.yaml"
    cfg.write_text(yaml.safe_dump(config(data, model, out / "run", steps, threads, batch)))
    cmd = [sys.executable, "-m", "mlpot", "train", str(cfg)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "mlpot", "train", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if no_gradient_sync:
        env[NO_GRADIENT_SYNC] = "1"
    if gloo:
        env[ALLREDUCE] = "gloo"
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{model} {nproc}x{threads} failed:\n{r.stderr[-3000:]}")
    m = json.loads((out / "run" / "metrics.json").read_text())
    assert m["world_size"] == nproc and m["steps"] == steps
    frames = steps * batch * nproc
    return {"frames_per_s": frames / m["train_time_s"], "train_time_s": m["train_time_s"],
            "frames": frames}


def add_speedups(rows: dict, names: list) -> None:
    """Speed-ups over 1 x 1: the ratio of the medians, and the median over rounds of the ratio
    within a round (the settings of a round see about the same machine; the robust figure on a
    machine whose speed drifts between rounds). The target is judged on the second."""
    base = rows["1 process x 1 thread"]
    for name in names:
        rows[name]["speedup_vs_1x1"] = rows[name]["median_frames_per_s"] / \
            base["median_frames_per_s"]
        rows[name]["speedup_vs_1x1_within_rounds"] = statistics.median(
            x["frames_per_s"] / b["frames_per_s"]
            for x, b in zip(rows[name]["rounds"], base["rounds"]))
    if "2 processes x 1 thread" in rows:
        rows["target_2x1_at_least_1.7x_1x1"] = \
            rows["2 processes x 1 thread"]["speedup_vs_1x1_within_rounds"] >= 1.7


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["dp_se_e2_a", "nequip"], choices=list(MODELS))
    p.add_argument("--steps", type=int, default=None,
                   help=f"steps per run (default per model: {STEPS})")
    p.add_argument("--batch-size", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                   metavar="SETTING", help="the settings to run (default: all; 1 x 1 is always "
                   "run, as the speed-ups' base)")
    p.add_argument("--max-wait", type=float, default=120.0,
                   help="seconds to wait for a quiet machine before each round")
    p.add_argument("--json", type=Path, default=HERE / "results" / "ddp_bench.json")
    add_shared_option(p)
    args = p.parse_args()
    data = shared_path(args.shared, "data", "3bpa", "train_300K.xyz", what="the 3BPA data")
    names = [n for n in SETTINGS if n in args.settings or n == "1 process x 1 thread"]
    results = {"date": datetime.date.today().isoformat(), "command": command_line(shared=args.shared),
               "machine": machine_info(),
               "steps": {m: args.steps or STEPS[m] for m in args.models},
               "batch_size_per_process": args.batch_size, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            runs = {n: [] for n in names}
            for r in range(args.rounds):
                waited = wait_quiet(max_wait=args.max_wait)
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    res = run_setting(name, data, model, args.steps or STEPS[model],
                                      args.batch_size, Path(tmp))
                    res["waited_s"] = round(waited, 1)
                    runs[name].append(res)
                    print(f"{model:12s} round {r + 1} {name:24s} "
                          f"{res['frames_per_s']:8.1f} frames/s", flush=True)
            rows = {}
            for name in names:
                rates = [x["frames_per_s"] for x in runs[name]]
                rows[name] = {"median_frames_per_s": statistics.median(rates),
                              "min": min(rates), "max": max(rates), "rounds": runs[name]}
            add_speedups(rows, names)
            results["models"][model] = rows
            write_json(args.json, results)
    print(f"\n3BPA training throughput ({results['date']}, batch {args.batch_size} per process, "
          f"steps {results['steps']}, median of {args.rounds} rounds)")
    for model, rows in results["models"].items():
        for name in names:
            r = rows[name]
            print(f"{model:12s} {name:24s} {r['median_frames_per_s']:8.1f} frames/s "
                  f"[{r['min']:.1f}, {r['max']:.1f}]  x{r['speedup_vs_1x1']:.2f} "
                  f"(within rounds x{r['speedup_vs_1x1_within_rounds']:.2f})")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
