"""Accuracy against a peer, trained side by side in one run: the comparison that holds on a noisy
machine (train_bench.py's fixed 15 minutes gives fewer steps on a busy day than on a quiet one).

The peer trains with its own tool and settings from ``<shared>/bench/train`` (MACE on 3BPA,
DeePMD-kit's se_e2_a water example), its fixed number of updates, on one thread; mlpot trains
on the other core at the same time, on the same data and split, one thread too, so both see the
same machine. Two comparisons:

  equal steps   (default) mlpot runs as many optimizer steps as the peer does (3BPA: 26 epochs
                of 95 batches of 5 = 2,470; water: 2,600 steps of one frame), its learning-rate
                schedule spread over those steps (``training.max_steps``), beside the peer.
  equal time    (``--equal-time``) mlpot gets the peer's measured wall time of the equal-steps
                run as its budget for the whole ``mlpot train`` command (its schedule follows
                that clock; ``train_bench.py``'s margin for start-up and evaluation). Run it
                beside another single-thread job (two tasks' ``--equal-time`` runs together,
                say), so that it shares the machine as the peer did.

Every accuracy figure is recorded with its epochs, steps, wall time and seconds per step. Test
sets and hyperparameters are train_bench.py's (``MODELS``; none tuned on a test set): 3BPA
``test_300K.xyz``, water data_2 frames 64-79.

The peer's scripts are run as they are, from a copy of ``<shared>/bench/train`` in the work
folder (they write their results beside themselves; the shared folder may be read-only), with
the peer venv made by ``<shared>/bench/setup_venv.sh`` (``--peer-python``).

    python benchmarks/peer_train_bench.py 3bpa                  # MACE | mlpot nequip, same steps
    python benchmarks/peer_train_bench.py water                 # DeePMD-kit | mlpot dp_se_e2_a
    python benchmarks/peer_train_bench.py 3bpa --equal-time & \\
        python benchmarks/peer_train_bench.py water --equal-time; wait

Results: benchmarks/results/peer_train_<task>.json (both comparisons, merged).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import (add_peer_python_option, add_shared_option, fail, machine_info, peer_python,
                     portable, shared_path, write_json)
import train_bench

HERE = Path(__file__).resolve().parent

# task: (peer script, its summary file, its test key, mlpot model, the peer's updates, what they
# are; optimizer steps of the peer's run (MACE: 26 epochs x 475 frames / batch 5)
TASKS = {
    "3bpa": {"script": "run_mace_3bpa.sh", "arg": "26", "summary": "mace_3bpa_summary.txt",
             "key": "test_300K", "model": "nequip", "steps": 26 * 95, "epochs": 26},
    "water": {"script": "run_water_dp.sh", "arg": "2600", "summary": "water_dp_summary.txt",
              "key": "devtest", "model": "dp_se_e2_a", "steps": 2600, "epochs": None},
}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "DP_INTRA_OP_PARALLELISM_THREADS": "1", "DP_INTER_OP_PARALLELISM_THREADS": "1"}


def peer_copy(shared: Path, work: Path) -> Path:
    """A writable copy of <shared>/bench/train whose ../../data is the shared data."""
    root = work / "peer_shared"
    train = root / "bench" / "train"
    if train.exists():
        shutil.rmtree(train)
    shutil.copytree(shared_path(shared, "bench", "train", what="the peers' training scripts"),
                    train, ignore=shutil.ignore_patterns("runs", "results"))
    (train / "results").mkdir()
    data = root / "data"
    if not data.exists():
        data.symlink_to(Path(shared).resolve() / "data", target_is_directory=True)
    return train


def start_peer(task: str, args, work: Path) -> tuple:
    spec = TASKS[task]
    train = peer_copy(args.shared, work)
    env = dict(os.environ, PY=peer_python(args.peer_python, args.shared),
               RUN=str(work / f"peer_{task}"), **ONE_THREAD)
    log = open(work / f"peer_{task}.log", "w")
    proc = subprocess.Popen(["bash", str(train / spec["script"]), spec["arg"]], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, train / "results" / spec["summary"], log


def mlpot_config(task: str, args, work: Path, out: Path, budget_min: float, steps):
    data, test = train_bench.prepare(task, work, args.shared)
    model = TASKS[task]["model"]
    cfg = train_bench.make_config(task, model, data, budget_min, 1, out)
    if steps is not None:
        cfg["training"]["max_steps"] = steps
    return cfg, test


def run_mlpot(cfg: dict, work: Path, name: str) -> subprocess.Popen:
    import yaml

    out = Path(cfg["training"]["out_dir"])
    if out.exists():
        shutil.rmtree(out)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log = open(work / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "mlpot.cli", "train", str(path)],
                            env=dict(os.environ, **ONE_THREAD), stdout=log,
                            stderr=subprocess.STDOUT)


def mlpot_result(out: Path, test: str, wall: float) -> dict:
    """The test RMSE (and MAE) of a finished run's best checkpoint, with its work done."""
    res = subprocess.run([sys.executable, "-m", "mlpot.cli", "test", str(out / "best.pt"),
                          "--data", test, "--json", "--out", str(out / "test")],
                         check=True, env=dict(os.environ, **ONE_THREAD), capture_output=True,
                         text=True)
    metrics = json.loads(res.stdout[res.stdout.index("{"):res.stdout.rindex("}") + 1])
    train = json.loads((out / "metrics.json").read_text())
    return {"epochs": train["epochs"], "steps": train["steps"], "wall_s": round(wall, 1),
            "train_time_s": round(train["train_time_s"], 1),
            "s_per_step": round(train["train_time_s"] / max(train["steps"], 1), 4),
            "E_rmse_meV_per_atom": metrics["energy_rmse_meV_per_atom"],
            "E_mae_meV_per_atom": metrics.get("energy_mae_meV_per_atom"),
            "F_rmse_meV_per_A": metrics["forces_rmse_meV_per_A"],
            "F_mae_meV_per_A": metrics.get("forces_mae_meV_per_A")}


def peer_result(task: str, summary: Path, wall: float) -> dict:
    spec = TASKS[task]
    if not summary.is_file():
        fail(f"the peer's run wrote no summary ({summary}); see its log beside it")
    s = json.loads(summary.read_text())
    test = s["tests"][spec["key"]]
    return {"epochs": spec["epochs"], "steps": spec["steps"], "wall_s": round(wall, 1),
            "train_wall_s": s["train_wall_s"],
            "s_per_step": round(s["train_wall_s"] / spec["steps"], 4),
            "E_rmse_meV_per_atom": test["E_rmse_meV_per_atom"],
            # MACE's summary has the MAE per structure; its RMSE both ways gives the atoms
            "E_mae_meV_per_atom": (test["E_mae_meV"] * test["E_rmse_meV_per_atom"]
                                   / test["E_rmse_meV"] if "E_mae_meV" in test else None),
            "F_rmse_meV_per_A": test["F_rmse_meV_per_A"],
            "F_mae_meV_per_A": test.get("F_mae_meV_per_A")}


def ratios(mlpot: dict, peer: dict) -> dict:
    return {k: round(mlpot[k] / peer[k], 3) for k in
            ("E_rmse_meV_per_atom", "F_rmse_meV_per_A", "s_per_step") if peer.get(k)}


def equal_steps(task: str, args, work: Path) -> dict:
    spec = TASKS[task]
    out = work / f"mlpot_{task}_steps"
    cfg, test = mlpot_config(task, args, work, out, args.cap_min, spec["steps"])
    t0 = time.time()
    peer, summary, log = start_peer(task, args, work)
    mine = run_mlpot(cfg, work, f"mlpot_{task}_steps")
    walls = {}
    while len(walls) < 2:
        for name, p in (("peer", peer), ("mlpot", mine)):
            if name not in walls and p.poll() is not None:
                walls[name] = time.time() - t0
        time.sleep(2)
    log.close()
    if mine.returncode != 0:
        fail(f"mlpot train failed (rc {mine.returncode}); see {work}/mlpot_{task}_steps.log")
    if peer.returncode != 0 and not summary.is_file():
        fail(f"the peer's run failed (rc {peer.returncode}); see {work}/peer_{task}.log")
    m = mlpot_result(out, test, walls["mlpot"])
    p = peer_result(task, summary, walls["peer"])
    return {"mlpot": m, "peer": p, "ratio_mlpot_over_peer": ratios(m, p),
            "config": portable(cfg, shared=args.shared, work=args.work)}


def equal_time(task: str, args, work: Path, previous: dict) -> dict:
    if "equal_steps" not in previous:
        fail(f"--equal-time takes its budget from the peer's wall time in the equal-steps run: "
             f"run `python benchmarks/peer_train_bench.py {task}` first")
    peer = previous["equal_steps"]["peer"]
    budget = peer["train_wall_s"] / 60.0
    out = work / f"mlpot_{task}_time"
    cfg, test = mlpot_config(task, args, work, out, budget - args.margin_min, None)
    t0 = time.time()
    proc = run_mlpot(cfg, work, f"mlpot_{task}_time")
    if proc.wait() != 0:
        fail(f"mlpot train failed; see {work}/mlpot_{task}_time.log")
    m = mlpot_result(out, test, time.time() - t0)
    return {"budget_s": round(budget * 60, 1), "mlpot": m, "peer": peer,
            "ratio_mlpot_over_peer": ratios(m, peer),
            "config": portable(cfg, shared=args.shared, work=args.work)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("--equal-time", action="store_true",
                   help="mlpot alone for the peer's wall time of the equal-steps run")
    p.add_argument("--cap-min", type=float, default=120.0,
                   help="wall-time cap of the equal-steps mlpot run (minutes; default 120)")
    p.add_argument("--margin-min", type=float, default=1.0,
                   help="equal time: budget left for start-up, validation and evaluation")
    p.add_argument("--work", default=str(HERE / "runs" / "peer_train"),
                   help="folder for the runs (default benchmarks/runs/peer_train, git-ignored)")
    p.add_argument("--json", default=None,
                   help="results file (default benchmarks/results/peer_train_<task>.json)")
    add_shared_option(p)
    add_peer_python_option(p)
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = Path(args.json or HERE / "results" / f"peer_train_{args.task}.json")
    result = json.loads(path.read_text()) if path.is_file() else {}
    part = "equal_time" if args.equal_time else "equal_steps"
    row = equal_time(args.task, args, work, result) if args.equal_time \
        else equal_steps(args.task, args, work)
    row["date"] = datetime.date.today().isoformat()
    row["machine"] = machine_info()
    result.update(task=args.task, peer=train_bench.PEER[args.task][0],
                  mlpot_model=TASKS[args.task]["model"], threads_each=1)
    result[part] = row
    write_json(path, result)
    print(json.dumps({part: {k: row[k] for k in ("mlpot", "peer", "ratio_mlpot_over_peer")}},
                     indent=1))


if __name__ == "__main__":
    main()
