"""Accuracy at equal budget: mlpot's models trained on the peers' data splits for the peers' budget.

The peers' runs are in ../shared/bench/train (DeePMD-kit se_e2_a on DeePMD water, MACE on 3BPA, each
15 minutes of wall time for the whole training command on this 2-core machine; ``--shared DIR``
names another shared folder than ``shared`` beside the repository). This script trains
one mlpot model on one of those tasks with the same data, the same split and the same wall-clock
budget for the whole ``mlpot train`` command (start-up, statistics, training, validation, final
evaluation and plots), then evaluates the best checkpoint on the task's test set with ``mlpot test``
(not counted, as for the peers) and writes benchmarks/results/train_<task>_<model>.json.

    python benchmarks/train_bench.py water dp_se_e2_a            # 15 min, 2 threads
    python benchmarks/train_bench.py 3bpa nequip --threads 1     # half the machine, 15 min

Tasks:
  water  train: data_0, data_1, data_2 frames 0-63 (304 frames; 5 % of them held out for
         validation, which picks the best checkpoint); test: data_2 frames 64-79 (the peers'
         "dev test"), split by ../shared/bench/train/water_dp/split_water.py.
  3bpa   train: train_300K.xyz (500 frames, 5 % validation as MACE's run); test: test_300K.xyz.
  3bpa_mixedT  train: train_mixedT.xyz (500 frames from MD at 300, 600 and 1200 K, the 3BPA
         paper's second training set); test: test_300K.xyz. No peer run on it: the result has
         no peer figures (used by the stability benchmark: do hotter training frames keep the
         bonds together?).

``--threads 1`` runs on half of the machine: two such runs side by side use the 2 cores that a
single peer run had to itself, so each mlpot run gets at most the peer's compute (a handicap, not an
advantage). ``--force-cost`` instead times training steps with and without the force loss.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import add_shared_option, portable, shared_path, write_json

HERE = Path(__file__).resolve().parent

# Hyperparameters per (task, model). Chosen once from the papers' and peers' settings (no search on
# the test set); the trainer's time-based schedule spends the budget.
MODELS = {
    "dp_se_e2_a": {  # DeePMD-kit's water example (the peer's exact model); float32 networks
        "model": {"name": "dp_se_e2_a", "dtype": "float32", "hparams": {}},
        "loss": {"energy": 1.0, "forces": 1.0, "energy_start": 0.02, "forces_start": 1000.0},
        "optim": {"lr": 1e-3, "lr_final": 3.5e-6, "scheduler": "exponential", "ema_decay": 0.0},
        "batch_size": 1,
    },
    "nequip": {  # MACE-like: 32 channels, features up to l=1, messages up to l=3, correlation 3
        "model": {"name": "nequip", "dtype": "float32",
                  "hparams": {"num_features": 32, "l_max": 3, "feature_l_max": 1,
                              "correlation": 3, "num_layers": 2}},
        "loss": {"energy": 1.0, "forces": 100.0},
        "optim": {"lr": 1e-2, "lr_final": 1e-4, "scheduler": "exponential", "ema_decay": 0.99},
        "batch_size": 5,
    },
    # one-layer MACE-style: MACE's product basis (body order 4) on a single layer, features of
    # l=0 only: an ACE-like model whose receptive field is the cutoff (the fast student of
    # distill_bench, --student-model); the optimizer and loss of "nequip"
    "mace_1layer": {
        "model": {"name": "nequip", "dtype": "float32",
                  "hparams": {"num_features": 32, "l_max": 3, "feature_l_max": 0,
                              "correlation": 3, "num_layers": 1, "parity": False}},
        "loss": {"energy": 1.0, "forces": 100.0},
        "optim": {"lr": 1e-2, "lr_final": 1e-4, "scheduler": "exponential", "ema_decay": 0.99},
        "batch_size": 5,
    },
    "egnn": {
        "model": {"name": "egnn", "dtype": "float32", "hparams": {}},
        "loss": {"energy": 1.0, "forces": 100.0},
        "optim": {"lr": 5e-3, "lr_final": 5e-5, "scheduler": "exponential", "ema_decay": 0.99},
        "batch_size": 5,
    },
}
# the one-layer MACE-style model on two layers of l=0 features (receptive field twice the cutoff):
# more capacity for a fast student at 1.3-1.7x its MD cost (README, Distillation)
MODELS["mace_2layer"] = copy.deepcopy(MODELS["mace_1layer"])
MODELS["mace_2layer"]["model"]["hparams"]["num_layers"] = 2
TASKS = ("water", "3bpa", "3bpa_mixedT")
CUTOFF = {"water": 6.0, "3bpa": 5.0, "3bpa_mixedT": 5.0}
# the peer's name, its summary under <shared>/bench/train/results, and its test set's key there
PEER = {"water": ("DeePMD-kit se_e2_a", "water_dp_summary.txt", "devtest"),
        "3bpa": ("MACE 32x0e+32x1o", "mace_3bpa_summary.txt", "test_300K")}


def prepare(task: str, work: Path, shared: Path):
    """(data section of the config, test set path) of a task; water is split first."""
    if task == "water":
        split = work / "water_split"
        if not (split / "data_2_test").exists():
            script = shared_path(shared, "bench", "train", "water_dp", "split_water.py",
                                 what="the peers' water split")
            subprocess.run([sys.executable, str(script), str(split)], check=True)
        train = [str(split / d) for d in ("data_0", "data_1", "data_2_train")]
        return {"train": train, "type_map": ["O", "H"]}, str(split / "data_2_test")
    data = shared_path(shared, "data", "3bpa", what="the 3BPA data")
    train = "train_mixedT.xyz" if task == "3bpa_mixedT" else "train_300K.xyz"
    return ({"train": str(data / train), "type_map": ["C", "H", "N", "O"]},
            str(data / "test_300K.xyz"))


def make_config(task: str, model: str, data: dict, budget_min: float, threads: int, out: Path,
                batch_size=None):
    spec = MODELS[model]
    # water: one 192-atom frame per step (DeePMD-kit's "auto"); 3BPA: the model's batch (MACE: 5)
    batch_size = batch_size or (1 if task == "water" else spec["batch_size"])
    return {
        "data": {**data, "validation_fraction": 0.05},
        "model": {**spec["model"], "cutoff": CUTOFF[task]},
        "loss": spec["loss"],
        "optim": spec["optim"],
        "training": {"batch_size": batch_size, "max_epochs": 100000,
                     "max_time_min": budget_min, "seed": 0, "threads": threads,
                     "out_dir": str(out), "progress": False},
    }


def run(args) -> dict:
    import yaml

    work = Path(args.work)
    out = work / f"{args.task}_{args.model}"
    if out.exists():
        import shutil
        shutil.rmtree(out)
    data, test = prepare(args.task, work, args.shared)
    # the trainer's clock counts training steps; validation, start-up and the final evaluation
    # come on top, so the steps get the budget less a margin measured in trials
    cfg = make_config(args.task, args.model, data, args.budget_min - args.margin_min, args.threads,
                      out)
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / f"{args.task}_{args.model}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "mlpot.cli", "train", str(cfg_path)], check=True, env=env)
    wall = time.time() - t0
    (out / "train_command_wall_s.txt").write_text(f"{wall:.1f}\n")
    return evaluate(args, cfg, out, test, wall)


def evaluate(args, cfg, out: Path, test: str, wall: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    res = subprocess.run([sys.executable, "-m", "mlpot.cli", "test", str(out / "best.pt"),
                          "--data", test, "--json", "--out", str(out / "test")],
                         check=True, env=env, capture_output=True, text=True)
    test_metrics = json.loads(res.stdout[res.stdout.index("{"):res.stdout.rindex("}") + 1])
    train_metrics = json.loads((out / "metrics.json").read_text())
    peer = None
    if args.task in PEER:
        name, peer_file, peer_key = PEER[args.task]
        record = json.loads(shared_path(args.shared, "bench", "train", "results", peer_file,
                                        what="the peer's result").read_text())
        peer = {"name": name, "wall_s": record["train_wall_s"], **record["tests"][peer_key]}
    result = {
        "task": args.task, "model": args.model, "threads": args.threads,
        "budget_min": args.budget_min, "train_command_wall_s": round(wall, 1),
        "epochs": train_metrics["epochs"],
        # paths in the shared folder (--shared) and the work folder (--work) by those names
        "config": portable(cfg, shared=args.shared, work=args.work),
        "test": test_metrics,
        "peer": peer,
    }
    # the peers' 15-minute budget gives train_<task>_<model>.json; others train<minutes>_...
    budget = "" if args.budget_min == 15.0 else f"{args.budget_min:g}"
    path = HERE / "results" / f"train{budget}_{args.task}_{args.model}.json"
    write_json(path, result)
    print(json.dumps({k: result[k] for k in ("task", "model", "train_command_wall_s", "epochs")}))
    print("test:", {k: round(v, 2) for k, v in test_metrics.items() if "rmse" in k})
    print("peer:", result["peer"])
    return result


def force_cost(args) -> None:
    """Frames per second of training steps with and without the force loss (same model, data)."""
    import torch
    from mlpot.train import Trainer
    from mlpot.train.config import config_from_dict

    work = Path(args.work)
    data, _ = prepare(args.task, work, args.shared)
    out = {}
    for forces in (False, True):
        cfg = config_from_dict(make_config(args.task, args.model, data, 1.0, args.threads,
                                           work / "force_cost", batch_size=1))
        cfg.data.max_frames = 40
        if not forces:
            cfg.loss.forces, cfg.loss.forces_start = 0.0, None
            cfg.loss.energy_start = None
        trainer = Trainer(cfg)
        torch.set_num_threads(args.threads)
        trainer.train_epoch()  # warm-up
        t0 = time.perf_counter()
        n = 0
        for _ in range(2):
            trainer.train_epoch()
            n += len(trainer.train_set)
        out["with_forces" if forces else "energy_only"] = n / (time.perf_counter() - t0)
    out["ratio"] = out["energy_only"] / out["with_forces"]
    print(json.dumps({"task": args.task, "model": args.model, "frames_per_s": out}))
    path = HERE / "results" / "train_force_cost.json"
    allres = json.loads(path.read_text()) if path.exists() else {}
    allres[f"{args.task}/{args.model}"] = out
    write_json(path, allres)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("task", choices=TASKS)
    p.add_argument("model", choices=sorted(MODELS))
    p.add_argument("--budget-min", type=float, default=15.0, help="whole train command (minutes)")
    p.add_argument("--margin-min", type=float, default=1.0,
                   help="budget left for start-up, validation and final evaluation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=str(HERE / "runs"), help="folder for the runs (default: "
                   "benchmarks/runs, which git ignores)")
    add_shared_option(p)
    p.add_argument("--force-cost", action="store_true")
    p.add_argument("--evaluate-only", action="store_true",
                   help="test the finished run in --work again (wall time from its record or "
                        "--wall-s)")
    p.add_argument("--wall-s", type=float, help="with --evaluate-only: the measured wall time")
    args = p.parse_args()
    if args.force_cost:
        force_cost(args)
    elif args.evaluate_only:  # a finished run: test its best.pt again
        import yaml
        work = Path(args.work)
        out = work / f"{args.task}_{args.model}"
        cfg = yaml.safe_load((work / f"{args.task}_{args.model}.yaml").read_text())
        wall_file = out / "train_command_wall_s.txt"
        wall = float(wall_file.read_text()) if wall_file.exists() else args.wall_s
        evaluate(args, cfg, out, prepare(args.task, work, args.shared)[1], wall)
    else:
        run(args)


if __name__ == "__main__":
    main()
