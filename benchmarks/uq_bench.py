"""UQ quality: does a model's uncertainty rank and size its real force errors?

Two methods, each trained in one ``mlpot train`` run with train_bench's model and
hyperparameters for molecules (``nequip``, MACE-like, as on 3BPA: cutoff 5 A, batch 5;
``train_bench.make_config``) and train_bench's wall-clock budget for the whole training command
(``--budget-min``, default 15; 5 % of the training file held out for validation, which picks the
best checkpoint and fits the calibration factor):

  --method committee   a K = 4 committee (``training.ensemble: 4``): max_force_dev is the
                       members' disagreement (DeePMD-kit's definitions)
  --method mve         one model with a variance network (``model.uncertainty: mve``,
                       mlpot.models.mve): max_force_dev is its predicted force error

on one of two data sets (``--task``):

  acac   acetylacetone, train ``train_300K.xyz``; in distribution ``test_MD_300K.xyz`` (650
         frames, MD at 300 K), out of distribution ``train_600K.xyz`` (all 500 frames, 600 K)
  3bpa   3BPA, train ``train_300K.xyz``; in distribution ``test_300K.xyz`` (no set out of
         distribution is evaluated here)

and writes benchmarks/results/uq_<task>.json (committee) or uq_<task>_mve.json
(``uq<minutes>_...`` for another budget).

Measures (all from the model's own outputs):

* Spearman rank correlation, per frame, between ``max_force_dev`` (the largest over atoms of
  ``forces_dev``) and the frame's true largest force error, computed two ways: the largest
  per-atom error norm |F_pred - F_ref| (``spearman_frame_norm``: like for like with
  max_force_dev) and the largest absolute Cartesian component error
  (``spearman_frame_component``: the issue's "largest force-component error").
* The same per atom: ``forces_dev`` against |F_pred - F_ref| of the atom
  (``spearman_atom_norm``) and against its largest component error
  (``spearman_atom_component``).
* A random ranking beside them: the Spearman correlation of the true errors with a random
  permutation of the frames (atoms), mean and standard deviation over ``--random-seeds`` seeds;
  it should be ~0 and says how far from chance the model's ranking is.
* Miscalibration area (Kuleshov, Fenner and Ermon, ICML 2018, "Accurate uncertainties for deep
  learning using calibrated regression"; Tran et al., Mach. Learn.: Sci. Technol. 1, 025006
  (2020), "Methods for comparing uncertainty quantifications for material property
  predictions"): each force component error e is taken as Gaussian with zero mean and
  sigma = forces_dev_calibrated / sqrt(3) of its atom (forces_dev is the norm over the three
  components, and the calibration factor fitted on the validation split makes
  mean |e|^2 = mean forces_dev_calibrated^2, so this sigma is the per-component RMS
  scale). For each expected fraction p in (0, 1) (a grid of 999 levels) the central interval
  +- z_p sigma, z_p = Phi^-1((1 + p) / 2), should hold a fraction p of the errors; the observed
  fraction is obs(p) = mean(|e| <= z_p sigma). The miscalibration area is the area between the
  curve obs(p) and the diagonal, integral over p of |obs(p) - p| (trapezoid rule): 0 is perfect
  calibration, 0.5 the worst. Also given: the same with the raw (uncalibrated) deviation, the
  RMS ratio sqrt(mean |e|^2 / mean dev^2) and ENCE (``mlpot.train.metrics.ence``).
* The model's (committee mean's) energy and force errors (MAE and RMSE).

    python benchmarks/uq_bench.py                   # committee on acac: train 15 min, evaluate
    python benchmarks/uq_bench.py --method mve --task 3bpa
    python benchmarks/uq_bench.py --evaluate-only   # evaluate the finished run in --work again
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import add_shared_option, command_line, portable, shared_path, write_json

HERE = Path(__file__).resolve().parent
# per data set: the training file, and the sets evaluated (in and, where the data has one, out of
# distribution)
TASKS = {
    "acac": {"what": "acetylacetone", "type_map": ["C", "H", "O"],
             "files": {"train": "train_300K.xyz", "in_distribution": "test_MD_300K.xyz",
                       "out_of_distribution": "train_600K.xyz"}},
    "3bpa": {"what": "3BPA", "type_map": ["C", "H", "N", "O"],
             "files": {"train": "train_300K.xyz", "in_distribution": "test_300K.xyz"}},
}
MODEL = "nequip"        # train_bench's model for molecules (its 3BPA task)
MODEL_TASK = "3bpa"     # whose cutoff and batch size train_bench.make_config gives it
K_MEMBERS = 4


def run_name(args) -> str:
    """The run's folder (and config) name under --work."""
    if args.method == "mve":
        steps = f"_steps{args.max_steps}" if args.max_steps else ""
        return f"uq_{args.task}_{MODEL}_mve{steps}"
    return f"uq_{args.task}_{MODEL}_k{K_MEMBERS}"


def train(args, data: Path) -> tuple[dict, float]:
    """One `mlpot train` run of the method in the whole budget; (config, wall seconds)."""
    import shutil

    import yaml

    from train_bench import make_config

    work = Path(args.work)
    out = work / run_name(args)
    if out.exists():
        shutil.rmtree(out)
    work.mkdir(parents=True, exist_ok=True)
    # as train_bench: the trainer's clock counts training steps, so they get the budget less a
    # margin for start-up, validation, the final evaluation and the calibration
    cfg = make_config(MODEL_TASK, MODEL, {"train": str(data / TASKS[args.task]["files"]["train"]),
                                          "type_map": TASKS[args.task]["type_map"]},
                      args.budget_min - args.margin_min, args.threads, out)
    if args.max_steps:
        cfg["training"]["max_steps"] = args.max_steps
    if args.method == "mve":
        cfg["model"]["uncertainty"] = "mve"
    else:
        cfg["training"]["ensemble"] = K_MEMBERS
    cfg_path = work / f"{run_name(args)}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "mlpot.cli", "train", str(cfg_path)], check=True,
                   env=env)
    wall = time.time() - t0
    (out / "train_command_wall_s.txt").write_text(f"{wall:.1f}\n")
    (out / "bench_command.txt").write_text(command_line(shared=args.shared, work=args.work) + "\n")
    return cfg, wall


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y)[0])


def random_ranking(err, seeds: int) -> dict:
    """Spearman of the errors with random scores (a random permutation), over `seeds` seeds."""
    import numpy as np

    rho = [spearman(np.random.default_rng(s).permutation(len(err)), err) for s in range(seeds)]
    return {"mean": float(np.mean(rho)), "std": float(np.std(rho)), "seeds": seeds}


def miscalibration_area(err_components, sigma, levels: int = 999) -> float:
    """Area between the observed fraction of component errors inside the central Gaussian
    interval +- z_p sigma and the expected fraction p (module docstring), p in [0, 1]."""
    import numpy as np
    from scipy.stats import norm

    p = np.concatenate([[0.0], np.arange(1, levels + 1) / (levels + 1), [1.0]])
    ratio = np.sort(np.abs(err_components) / np.maximum(sigma, 1e-300))
    z = norm.ppf((1.0 + p[1:-1]) / 2.0)
    observed = np.concatenate([[0.0], np.searchsorted(ratio, z, side="right") / len(ratio),
                               [1.0]])
    gap = np.abs(observed - p)
    return float(np.sum((gap[1:] + gap[:-1]) / 2.0 * np.diff(p)))


def evaluate_set(model, type_map, cutoff, path: Path, seeds: int) -> dict:
    """The model on one labelled file: errors of its (mean) prediction and the UQ measures."""
    import numpy as np
    import torch

    from mlpot.data import AtomicDataset, read
    from mlpot.train.metrics import MetricAccumulator, ence

    frames = read(str(path), type_map=type_map)
    dataset = AtomicDataset(frames, type_map, cutoff, name=path.name)
    acc = MetricAccumulator()
    for batch in dataset.loader(10):  # forces come from autograd: no torch.no_grad here
        acc.add(model(batch.as_dict(), compute_forces=True), batch)
    metrics = acc.result()
    err_vec = (torch.cat(acc.f_pred) - torch.cat(acc.f_ref)).numpy()      # [N, 3] eV/A
    dev_raw = torch.cat(acc.f_dev).numpy()                                # [N] forces_dev
    dev_cal = torch.cat(acc.f_dev_cal).numpy()                            # calibrated
    atom_frame = torch.cat(acc.f_frame).numpy()
    n_frames = acc._frames_seen
    frame_dev = np.zeros(n_frames)
    frame_dev[torch.cat(acc.frame_ids).numpy()] = torch.cat(acc.frame_dev).numpy()
    err_norm = np.linalg.norm(err_vec, axis=1)
    err_comp = np.abs(err_vec).max(axis=1)
    frame_norm = np.zeros(n_frames)
    frame_comp = np.zeros(n_frames)
    np.maximum.at(frame_norm, atom_frame, err_norm)
    np.maximum.at(frame_comp, atom_frame, err_comp)
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))  # noqa: E731
    return {
        "file": path.name, "frames": n_frames, "atoms": int(len(err_norm)),
        "errors": {k: round(metrics[k], 3) for k in (
            "energy_mae_meV_per_atom", "energy_rmse_meV_per_atom", "energy_rmse_meV",
            "forces_mae_meV_per_A", "forces_rmse_meV_per_A")},
        "spearman_frame_norm": spearman(frame_dev, frame_norm),
        "spearman_frame_component": spearman(frame_dev, frame_comp),
        "spearman_atom_norm": spearman(dev_raw, err_norm),
        "spearman_atom_component": spearman(dev_raw, err_comp),
        "random_frame": random_ranking(frame_norm, seeds),
        "random_atom": random_ranking(err_norm, seeds),
        "miscalibration_area": miscalibration_area(err_vec.ravel(),
                                                   np.repeat(dev_cal / np.sqrt(3.0), 3)),
        "miscalibration_area_raw": miscalibration_area(err_vec.ravel(),
                                                       np.repeat(dev_raw / np.sqrt(3.0), 3)),
        "rms_ratio_calibrated": rms(err_norm) / rms(dev_cal),
        "rms_ratio_raw": rms(err_norm) / rms(dev_raw),
        "ence_calibrated": ence(err_norm, dev_cal),
        "mean_max_force_dev_eV_per_A": float(frame_dev.mean()),
        "mean_largest_force_error_norm_eV_per_A": float(frame_norm.mean()),
    }


def evaluate(args, cfg: dict, data: Path, wall: float) -> dict:
    import json

    import torch

    from _common import machine_info
    from mlpot.train.evaluate import load_model_for_eval

    torch.set_num_threads(args.threads)
    out = Path(args.work) / run_name(args)
    files = TASKS[args.task]["files"]
    model, type_map, cutoff = load_model_for_eval(str(out / "best.pt"))
    t0 = time.time()
    sets = {name: evaluate_set(model, type_map, cutoff, data / files[name], args.random_seeds)
            for name in ("in_distribution", "out_of_distribution") if name in files}
    train_metrics = json.loads((out / "metrics.json").read_text())
    ood = sets.get("out_of_distribution")
    result = {
        "task": args.task, "model": MODEL, "method": args.method,
        "members": K_MEMBERS if args.method == "committee" else None, "threads": args.threads,
        "budget_min": args.budget_min, "max_steps": args.max_steps,
        "train_command_wall_s": round(wall, 1),
        "epochs": train_metrics.get("epochs"),
        "calibration_factor": float(model.calibration),
        "evaluation_wall_s": round(time.time() - t0, 1),
        "train_file": files["train"],
        "sets": sets,
        "target": {"what": "Spearman >= 0.6 per frame at 600 K (out_of_distribution)",
                   "met_norm": ood["spearman_frame_norm"] >= 0.6,
                   "met_component": ood["spearman_frame_component"] >= 0.6} if ood else None,
        "steps": train_metrics.get("steps"),
        "config": portable(cfg, shared=args.shared, work=args.work),
        # the command that trained (with --evaluate-only: the earlier run's) and this one
        "train_command": (out / "bench_command.txt").read_text().strip()
        if (out / "bench_command.txt").exists() else None,
        "command": command_line(shared=args.shared, work=args.work),
        "machine": machine_info(),
    }
    budget = "" if args.budget_min == 15.0 else f"{args.budget_min:g}"
    method = "" if args.method == "committee" else f"_{args.method}"
    if args.max_steps:
        method += f"_steps{args.max_steps}"
    path = HERE / "results" / f"uq{budget}_{args.task}{method}.json"
    write_json(path, result)
    for name, s in sets.items():
        print(f"{name:20s} {s['file']:18s} Spearman frame norm/comp "
              f"{s['spearman_frame_norm']:.3f}/{s['spearman_frame_component']:.3f}  atom "
              f"{s['spearman_atom_norm']:.3f}/{s['spearman_atom_component']:.3f}  random "
              f"{s['random_frame']['mean']:+.3f}/{s['random_atom']['mean']:+.3f}  "
              f"miscal. area {s['miscalibration_area']:.3f} (raw "
              f"{s['miscalibration_area_raw']:.3f})  F RMSE {s['errors']['forces_rmse_meV_per_A']}"
              f" meV/A  E RMSE {s['errors']['energy_rmse_meV_per_atom']} meV/atom")
    print(f"wrote {portable(path)}")
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", choices=["committee", "mve"], default="committee",
                   help="committee (K = 4, default) or mve (one model, a variance network)")
    p.add_argument("--task", choices=sorted(TASKS), default="acac",
                   help="data set (default acac; 3bpa has no out-of-distribution set here)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="a fixed number of optimizer steps instead of the wall-clock budget "
                        "(which then only caps the run; e.g. the steps each committee member "
                        "got, for an equal-steps comparison on a busy machine)")
    p.add_argument("--budget-min", type=float, default=15.0,
                   help="whole train command (minutes; train_bench's budget by default)")
    p.add_argument("--margin-min", type=float, default=1.0,
                   help="budget left for start-up, validation and final evaluation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--random-seeds", type=int, default=100,
                   help="random rankings averaged for the baseline (default 100)")
    p.add_argument("--work", default=str(HERE / "runs"), help="folder for the run (default: "
                   "benchmarks/runs, which git ignores)")
    add_shared_option(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--train-only", action="store_true", help="train; evaluate later")
    mode.add_argument("--evaluate-only", action="store_true",
                      help="evaluate the finished run in --work again (wall time from its record)")
    args = p.parse_args()
    what = TASKS[args.task]["what"]
    data = shared_path(args.shared, "data", args.task, what=f"the {what} data")
    for name in TASKS[args.task]["files"].values():
        shared_path(args.shared, "data", args.task, name, what=f"a {what} file")
    if args.evaluate_only:
        import yaml
        work = Path(args.work)
        cfg = yaml.safe_load((work / f"{run_name(args)}.yaml").read_text())
        wall = float((work / run_name(args) / "train_command_wall_s.txt")
                     .read_text())
    else:
        cfg, wall = train(args, data)
        if args.train_only:
            return
    evaluate(args, cfg, data, wall)


if __name__ == "__main__":
    main()
