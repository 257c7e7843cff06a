"""Label efficiency of ``mlpot learn`` in pool mode: query by committee against random picks.

For each rMD17 molecule (``--molecules``, default ethanol and aspirin) the 1,000 frames of
``<shared>/data/rmd17/<molecule>_train_01.xyz`` are split by ``_common.rmd17_split`` into a
pool of 800 and a test part of 200 (used for nothing but the test errors). For each seed
(``--seeds``, default 0 1 2) the seed draws ``--initial`` (20) frames of the pool as the initial
labelled data; the other 780 are the unlabelled pool of ``labeller: {kind: pool}``. Two loops
then run with everything identical but the selection (``selection.strategy``):

  committee  query by committee: the K = 4 committee scores every unchosen pool frame (its raw
             ``max_force_dev``) and ``--per-iter`` (10) frames are picked by farthest-point
             sampling on ``structure_descriptor``, starting from the most doubted frame
             (``selection.pool_all_candidates: true``, mlpot's pool default: the whole unchosen
             pool is the candidate set, so every iteration adds exactly 10 labels)
  random     10 frames drawn uniformly at random from the unchosen pool (``selection.seed``;
             the pool is not scored, which makes these loops faster, not more accurate)

The committees and the final fits are one model (``--model``: the small EGNN by default, or
train_bench's one-layer MACE-style nequip, MODELS). Each iteration trains the committee
(``training.ensemble: 4``) for a fixed number of optimizer
steps (``--steps``, default 500, ``training.max_steps``: the learning-rate schedule runs from
``lr`` to ``lr_final`` within them), warm-started from the previous iteration's weights
(``warm_start``), on all labels so far (10 % of them for validation, which picks the best
checkpoint and fits the calibration), until the committee trained on ``--max-labels`` (200, 25 %
of the pool) labels. The trainer evaluates every iteration's committee mean on the 200 test
frames (``training.data.test``; ``iter_*/train/metrics.json``): the learning curves.

The loops only choose frames; one training judges every choice alike (the **final fit**): a
single model of the same architecture and hyperparameters, trained from scratch for
``--final-steps`` steps (default 40,000: the whole pool's test error stops improving within
them; measured 2026-12-04, ethanol: 161 meV/A after 4,000 steps, 56 after 40,000, where 200
random frames give 157 and 65) with the loop's seed, on the 200 labels of the loop's last
committee, and the same on the whole pool (800 frames) for each seed: **the reference**. The
issue's target: query by committee's 200 labels reach the reference's test force MAE (mean over
the seeds). A final fit's own spread over initial weights is about 2.5 meV/A on ethanol (the
reference, the same 800 frames: 56.4, 61.8, 56.8), as large as the differences to be judged:
``--judges J`` trains J fits per seed and selection (training seeds seed + 1000 j) and takes
their mean as the seed's error. A warm-started chain of short trainings is not the same
training as one long one, so the loops' own committees are not compared with the reference.

Query by committee selects with ``selection.candidates_per_label: --candidates-per-label``
(default 10): FPS over the 10 x 10 most doubted unchosen frames (with ``--candidates-per-label
0``: over the whole unchosen pool), with ``selection.diversity: --diversity``: ``labelled``
(the default: distances to the labelled data too, each pick the candidate least like
everything trained on), ``batch`` (distances to the batch's own picks only, from the most
doubted frame) or ``kmeans`` (no FPS: the candidate nearest each centre of a k-means clustering of
the candidates weighted by their deviations, ``mlpot.learn.weighted_kmeans_pick``); ``--rank
relative`` orders the candidates by DeePMD-kit's relative force deviation instead of the raw
one (``selection.rank``). Trial of 2026-12-04 (ethanol, seed 0, final-fit test force MAE in meV/A; the
whole pool 56.4, 200 random frames 72.4): c = 3 batch 70.1, c = 3 labelled 68.6, c = 10
labelled 62.3, the whole pool as candidates (labelled: k-centre on the descriptor alone,
the committee unused) 63.6.

Results: ``benchmarks/results/label_efficiency.json`` (per molecule, strategy, seed and
iteration: labels, test force MAE/RMSE, energy MAE/RMSE; means and spreads over seeds; the
reference; the smallest label count at which the mean over seeds reaches the reference force
MAE, or null; the final fits and the reference) and ``label_efficiency.png``. Run folders go to
``--work`` (default benchmarks/runs/label, which git ignores). The same command again skips
finished runs and resumes a half-finished loop (``mlpot learn`` resumes from its state.json; a
killed final fit or reference resumes from its last.pt).

    OMP_NUM_THREADS=1 python benchmarks/label_bench.py                  # the whole benchmark
    python benchmarks/label_bench.py --molecules ethanol --seeds 0 --steps 20 --max-labels 40 \\
        --work /tmp/label-trial --out /tmp/label-trial/result.json      # a quick trial
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import (add_shared_option, command_line, machine_info, portable, rmd17_split,
                     shared_path, write_json)

HERE = Path(__file__).resolve().parent
MOLECULES = ("ethanol", "aspirin")
STRATEGIES = ("committee", "random")
K_MEMBERS = 4
POOL = 800
TYPE_MAP = ["C", "H", "O"]
# The model of the committees and the final fits (--model), each with its loss weights,
# optimizer and batch. egnn (the default): a small EGNN (mlpot's own message-passing model) sized
# for one CPU core, 2 layers of width 32, train_bench's EGNN weights; mace_1layer: train_bench's
# one-layer MACE-style nequip (MODELS), which fits forces far better per step (3BPA, README's
# Distillation section), so that the model's capacity limits the final fits less.
MODELS = {
    "egnn": {"model": {"name": "egnn", "cutoff": 5.0, "dtype": "float32",
                       "hparams": {"hidden": 32, "edge_hidden": 32, "num_layers": 2,
                                   "readout_hidden": 16}},
             "loss": {"energy": 1.0, "forces": 100.0},
             "optim": {"lr": 5.0e-3, "lr_final": 5.0e-5, "scheduler": "exponential",
                       "ema_decay": 0.99},
             "batch_size": 4},
}
JUDGE_SEED_STEP = 1000  # judge j of loop seed s trains with seed s + 1000 j
VALIDATION_FRACTION = 0.1


def model_settings(name: str) -> dict:
    """--model's model, loss, optim and batch_size (MODELS; mace_1layer from train_bench)."""
    if name in MODELS:
        return MODELS[name]
    import train_bench

    spec = train_bench.MODELS[name]
    return {"model": {**spec["model"], "cutoff": 5.0}, "loss": spec["loss"],
            "optim": spec["optim"], "batch_size": spec["batch_size"]}


def training_section(args, seed: int, steps: int) -> dict:
    """The `mlpot train` config shared by the loops and the reference (without data.train)."""
    m = model_settings(args.model)
    return {"model": m["model"], "loss": m["loss"], "optim": m["optim"],
            "data": {"validation_fraction": VALIDATION_FRACTION, "type_map": TYPE_MAP},
            "training": {"ensemble": K_MEMBERS, "batch_size": m["batch_size"],
                         "max_steps": steps,
                         "max_epochs": 1000000, "seed": seed, "threads": args.threads,
                         "progress": False}}


def write_frames(path: Path, frames) -> None:
    """Write an extxyz file through a temporary one (a kill leaves no half file; the process id
    in its name lets two runs of the benchmark, for different seeds, prepare at once)."""
    import ase.io

    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    ase.io.write(str(tmp), frames, format="extxyz")
    os.replace(tmp, path)


def prepare(args, molecule: str) -> dict:
    """The molecule's files under --work: test.xyz, pool.xyz (800) and per seed init_s<seed>.xyz
    (the seed's initial frames) and pool_s<seed>.xyz (the other pool frames, unlabelled for the
    loop). Written once; the split is ``rmd17_split``'s."""
    import ase.io
    import numpy as np

    path, pool_idx, test_idx = rmd17_split(args.shared, molecule, pool=POOL)
    d = Path(args.work) / molecule
    d.mkdir(parents=True, exist_ok=True)
    files = {"test": d / "test.xyz", "pool": d / "pool.xyz"}
    for s in args.seeds:
        files[f"init_{s}"] = d / f"init_s{s}.xyz"
        files[f"pool_{s}"] = d / f"pool_s{s}.xyz"
    if all(p.exists() for p in files.values()):
        return files
    frames = ase.io.read(str(path), index=":")
    for a in frames:  # only the labels and positions: no per-frame keys the trainer could trip on
        a.info = {"REF_energy": a.info["REF_energy"]}
    write_frames(files["test"], [frames[i] for i in test_idx])
    write_frames(files["pool"], [frames[i] for i in pool_idx])
    for s in args.seeds:
        # the seed's initial frames: positions in the pool drawn without replacement
        pick = set(int(k) for k in np.random.default_rng(1000 + s).choice(
            len(pool_idx), size=args.initial, replace=False))
        write_frames(files[f"init_{s}"], [frames[pool_idx[k]] for k in sorted(pick)])
        write_frames(files[f"pool_{s}"], [frames[pool_idx[k]] for k in range(len(pool_idx))
                                           if k not in pick])
    return files


def iterations(args) -> int:
    """Trainings per loop: the committees on initial, initial + per_iter, ..., max_labels."""
    return (args.max_labels - args.initial) // args.per_iter + 1


def run_env(args) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")


def learn_run(args, molecule: str, strategy: str, seed: int, files: dict) -> Path:
    """One `mlpot learn` loop (resumed if half done, skipped if finished); its learn_dir."""
    import yaml

    run = Path(args.work) / molecule / f"{strategy}_s{seed}"
    state = run / "state.json"
    if state.exists() and json.loads(state.read_text()).get("stopped"):
        return run
    training = training_section(args, seed, args.steps)
    training["data"]["test"] = str(files["test"])
    cfg = {"learn_dir": str(run), "data": str(files[f"init_{seed}"]), "training": training,
           "warm_start": True,
           "explore": {"structures": [], "device": "cpu"},
           # pool_all_candidates: the whole unchosen pool is the candidate set (the trust levels
           # play no part in the choice; they only classify the frames in the table)
           "selection": {"strategy": strategy, "seed": seed, "max_labels": args.per_iter,
                         "pool_all_candidates": True,
                         "candidates_per_label": args.candidates_per_label or None,
                         "diversity": args.diversity, "rank": args.rank,
                         "relative_level": args.relative_level},
           "labeller": {"kind": "pool", "pool": str(files[f"pool_{seed}"])},
           "stop": {"max_iterations": iterations(args), "accurate_fraction": None}}
    path = Path(args.work) / molecule / f"{strategy}_s{seed}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"== {molecule} {strategy} seed {seed}: mlpot learn {portable(path, work=args.work)}",
          flush=True)
    with open(Path(args.work) / molecule / f"{strategy}_s{seed}.log", "a") as log:
        subprocess.run([sys.executable, "-m", "mlpot.cli", "learn", str(path)], check=True,
                       env=run_env(args), stdout=log, stderr=subprocess.STDOUT)
    return run


def loop_labels(args, run: Path, files: dict, seed: int) -> list:
    """The data files of a finished loop's last committee: the initial frames and the labels
    of every iteration before the last (``mlpot.learn``'s train_files)."""
    n = iterations(args)
    return [str(files[f"init_{seed}"])] + [str(run / f"iter_{k:03d}" / "labelled.xyz")
                                           for k in range(n - 1)]


def fit_name(name: str, seed: int, judge: int) -> str:
    """The folder of a final fit: judge 0 is ``<name>_s<seed>``, judge j > 0 ``..._j<j>``."""
    return f"{name}_s{seed}" + (f"_j{judge}" if judge else "")


def judge_seed(seed: int, judge: int) -> int:
    """The training seed of judge ``judge`` of loop seed ``seed`` (judge 0: the loop's seed)."""
    return seed + JUDGE_SEED_STEP * judge


def final_fit(args, molecule: str, name: str, train: list, seed: int, files: dict,
              judge: int = 0) -> Path:
    """One model (``training.ensemble: 1``) trained from scratch for --final-steps on ``train``
    with ``judge_seed(seed, judge)`` (resumed from its last.pt if killed; skipped when done)."""
    import yaml

    out = Path(args.work) / molecule / "final" / fit_name(name, seed, judge)
    if (out / "metrics.json").exists():
        return out
    cfg = training_section(args, judge_seed(seed, judge), args.final_steps)
    cfg["training"]["ensemble"] = 1
    cfg["data"].update(train=train, test=str(files["test"]))
    cfg["training"]["out_dir"] = str(out)
    path = out.with_suffix(".yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    resume = ["--resume"] if (out / "last.pt").exists() else []
    print(f"== {molecule} final fit {name} seed {seed} judge {judge}: mlpot train "
          f"{portable(path, work=args.work)}", flush=True)
    with open(out.with_suffix(".log"), "a") as log:
        subprocess.run([sys.executable, "-m", "mlpot.cli", "train", str(path)] + resume,
                       check=True, env=run_env(args), stdout=log, stderr=subprocess.STDOUT)
    return out


def errors(metrics: dict, n_atoms: int) -> dict:
    t = metrics["test"]
    return {"forces_mae_meV_per_A": round(t["forces_mae_meV_per_A"], 2),
            "forces_rmse_meV_per_A": round(t["forces_rmse_meV_per_A"], 2),
            "energy_mae_meV": round(t["energy_mae_meV_per_atom"] * n_atoms, 2),
            "energy_mae_meV_per_atom": round(t["energy_mae_meV_per_atom"], 3),
            "energy_rmse_meV": round(t["energy_rmse_meV"], 2)}


def collect_run(run: Path, n_atoms: int) -> dict | None:
    """The test errors of each trained iteration of a loop (finished or not)."""
    state_path = run / "state.json"
    if not state_path.exists():
        return None
    state = json.loads(state_path.read_text())
    its = []
    for i, row in enumerate(state["rows"]):
        m = run / f"iter_{i:03d}" / "train" / "metrics.json"
        if row.get("labels") is None or not m.exists():
            continue
        metrics = json.loads(m.read_text())
        its.append({"iteration": i, "labels": int(row["labels"]), **errors(metrics, n_atoms),
                    "train_time_s": round(metrics["train_time_s"], 1),
                    "pool_accurate_fraction": row.get("accurate")})
    return {"finished": bool(state.get("stopped")), "wall_s": round(state["elapsed_s"], 1),
            "iterations": its}


def summarise(runs: dict, seeds) -> list:
    """Mean and spread (population std) over the seeds at each label count, over the seeds
    whose runs have reached it (``seeds``: how many; all of them once the runs are done)."""
    import numpy as np

    by_labels: dict = {}
    for s in seeds:
        r = runs.get(str(s))
        for it in (r or {}).get("iterations", []):
            by_labels.setdefault(it["labels"], {})[s] = it
    rows = []
    for labels in sorted(by_labels):
        got = by_labels[labels]
        row = {"labels": labels, "seeds": len(got)}
        for key in ("forces_mae_meV_per_A", "forces_rmse_meV_per_A", "energy_mae_meV"):
            v = np.array([got[s][key] for s in got])
            row[key] = round(float(v.mean()), 2)
            row[key.replace("_meV", "_std_meV", 1)] = round(float(v.std()), 2)
        rows.append(row)
    return rows


ERROR_KEYS = ("forces_mae_meV_per_A", "forces_rmse_meV_per_A", "energy_mae_meV")


def judged(judges: list) -> dict:
    """One loop seed's final-fit errors: the mean over its judges (fits of the same labels from
    different initial weights and shuffles), with every judge's own errors beside it."""
    import numpy as np

    out = {k: v for k, v in judges[0].items() if k not in ERROR_KEYS + ("judge", "seed")}
    for key in ERROR_KEYS:
        out[key] = round(float(np.mean([j[key] for j in judges])), 2)
    if len(judges) > 1:
        out["judges"] = judges
    return out


def mean_over(fits: dict) -> dict:
    """Mean and population std over seeds of the final fits' errors (empty when none); a seed
    judged by several fits counts with the mean of its judges."""
    import numpy as np

    if not fits:
        return {}
    out = {"seeds": len(fits)}
    for key in ERROR_KEYS:
        v = np.array([f[key] for f in fits.values()])
        out[key] = round(float(v.mean()), 2)
        out[key.replace("_meV", "_std_meV", 1)] = round(float(v.std()), 2)
    return out


def results(args, t_total: float) -> dict:
    import ase.io

    out = {"what": "label efficiency of mlpot learn, pool mode: query by committee against "
                   "random selection at equal label counts (rMD17)",
           "protocol": {
               "pool": POOL, "test": 1000 - POOL, "split": "benchmarks/_common.rmd17_split",
               "initial_labels": args.initial, "labels_per_iteration": args.per_iter,
               "max_labels": args.max_labels, "trainings_per_loop": iterations(args),
               "steps_per_iteration": args.steps, "warm_start": True,
               "final_fit": {"steps": args.final_steps, "members": 1, "judges": args.judges,
                             "what": "one model trained from scratch with the loop's seed on "
                                     "the labels of the loop's last committee; the reference: "
                                     "the same on the whole pool, per seed; with judges J > 1, "
                                     "J such models per seed (training seeds seed + "
                                     f"{JUDGE_SEED_STEP} j, j < J), the seed's error their mean"},
               "committee": K_MEMBERS, "model_choice": args.model,
               **model_settings(args.model), "validation_fraction": VALIDATION_FRACTION,
               "committee_selection": "selection.strategy: committee, pool_all_candidates: "
                                      "true, candidates_per_label: "
                                      f"{args.candidates_per_label or None}, diversity: "
                                      f"{args.diversity}, rank: {args.rank}"
                                      + (f" (level {args.relative_level:g} eV/A)"
                                         if args.rank == "relative" else "") + " ("
                                      + ("deviation-weighted k-means" if args.diversity ==
                                         "kmeans" else "FPS")
                                      + " on structure_descriptor over the most doubted "
                                        "unchosen frames)",
               "random_selection": "selection.strategy: random (uniform over the unchosen pool, "
                                   "numpy default_rng([seed, iteration]))",
               "errors": "committee mean on the 200 test frames (trainer's test evaluation of "
                         "each iteration's best checkpoint); energy MAE per molecule in meV",
               "threads": args.threads, "seeds": args.seeds},
           "molecules": {}}
    for mol in args.molecules:
        d = Path(args.work) / mol
        if not (d / "test.xyz").exists():
            continue
        n_atoms = len(ase.io.read(str(d / "test.xyz"), index=0))
        entry = {"atoms": n_atoms, "strategies": {}, "reference": None}
        for strategy in args.strategies:
            runs = {}
            for s in args.seeds:
                r = collect_run(d / f"{strategy}_s{s}", n_atoms)
                if r is not None:
                    runs[str(s)] = r
            entry["strategies"][strategy] = {"runs": runs, "mean": summarise(runs, args.seeds)}
        final = {}
        for name in ("reference",) + tuple(args.strategies):
            fits = {}
            for seed in args.seeds:
                judges = []
                for j in range(args.judges):
                    m = d / "final" / fit_name(name, seed, j) / "metrics.json"
                    if m.exists():
                        metrics = json.loads(m.read_text())
                        judges.append({"labels": POOL if name == "reference" else
                                       args.max_labels, **errors(metrics, n_atoms),
                                       "judge": j, "seed": judge_seed(seed, j),
                                       "epochs": metrics["epochs"],
                                       "train_time_s": round(metrics["train_time_s"], 1)})
                if len(judges) == args.judges:  # a seed counts once all its judges are done
                    fits[str(seed)] = judged(judges)
            final[name] = {"fits": fits, **mean_over(fits)}
        entry["final_fit"] = final
        entry["reference"] = final["reference"] if final["reference"]["fits"] else None
        entry["wall_s"] = round(sum(r["wall_s"] for v in entry["strategies"].values()
                                    for r in v["runs"].values()), 1)
        ref, qbc = final["reference"], final.get("committee", {})
        complete = {k: len(v.get("fits", {})) == len(args.seeds) for k, v in final.items()}
        entry["target"] = {
            "what": f"the final fit on query by committee's {args.max_labels} labels reaches the "
                    f"final fit on the whole pool ({POOL}) in test force MAE, mean over seeds "
                    f"({args.max_labels} labels = {100 * args.max_labels / POOL:g} % of the pool)",
            "met": qbc["forces_mae_meV_per_A"] <= ref["forces_mae_meV_per_A"]
            if complete.get("committee") and complete["reference"] else None}
        rnd = final.get("random", {})
        if complete.get("random") and complete["reference"]:
            gap = rnd["forces_mae_meV_per_A"] - ref["forces_mae_meV_per_A"]
            entry["target"]["random_gap_closed_by_committee"] = round(
                (rnd["forces_mae_meV_per_A"] - qbc["forces_mae_meV_per_A"]) / gap, 3) \
                if gap > 0 and complete.get("committee") else None
        out["molecules"][mol] = entry
    out["wall_s_this_command"] = round(t_total, 1)
    out["command"] = command_line(shared=args.shared, work=args.work)
    out["machine"] = machine_info()
    return portable(out, shared=args.shared, work=args.work)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    mols = [m for m in res["molecules"]]
    if not mols:
        return
    fig, axes = plt.subplots(1, len(mols), figsize=(5 * len(mols), 3.8), squeeze=False)
    for ax, mol in zip(axes[0], mols):
        e = res["molecules"][mol]
        for strategy, colour in (("committee", "C0"), ("random", "C1")):
            rows = e["strategies"].get(strategy, {}).get("mean", [])
            if not rows:
                continue
            x = np.array([r["labels"] for r in rows])
            y = np.array([r["forces_mae_meV_per_A"] for r in rows])
            sd = np.array([r["forces_mae_std_meV_per_A"] for r in rows])
            label = "query by committee" if strategy == "committee" else "random"
            ax.plot(x, y, "o-", ms=3, color=colour,
                    label=f"{label}: loop committees (mean of {rows[0]['seeds']})")
            ax.fill_between(x, y - sd, y + sd, color=colour, alpha=0.2)
            fit = e.get("final_fit", {}).get(strategy, {})
            if fit.get("fits"):
                ax.errorbar([x[-1]], [fit["forces_mae_meV_per_A"]],
                            yerr=[fit["forces_mae_std_meV_per_A"]], fmt="s", ms=6, color=colour,
                            mec="k", capsize=3, label=f"{label}: final fit")
        if e["reference"]:
            ax.axhline(e["reference"]["forces_mae_meV_per_A"], color="k", ls="--",
                       label=f"final fit on the whole pool ({POOL})")
        ax.axvline(POOL // 4, color="grey", ls=":", lw=1)
        ax.set_xlabel("labelled frames (train + validation)")
        ax.set_ylabel("test force MAE (meV/A)")
        ax.set_yscale("log")
        ax.set_title(f"rMD17 {mol}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--molecules", nargs="+", choices=MOLECULES, default=list(MOLECULES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--initial", type=int, default=20, help="initial labels (default 20)")
    p.add_argument("--per-iter", type=int, default=10, help="labels per iteration (default 10)")
    p.add_argument("--max-labels", type=int, default=200,
                   help="labels of the last committee trained (default 200: 25 %% of the pool)")
    p.add_argument("--steps", type=int, default=500,
                   help="optimizer steps per iteration (training.max_steps; default 500)")
    p.add_argument("--final-steps", type=int, default=40000,
                   help="steps of every final fit and of the reference (default 40000)")
    p.add_argument("--candidates-per-label", type=int, default=10,
                   help="query by committee: FPS over this many most doubted frames per label "
                        "(default 10; 0: over the whole unchosen pool)")
    p.add_argument("--diversity", choices=["batch", "labelled", "kmeans"], default="labelled",
                   help="query by committee's FPS: from the most doubted frame among the "
                        "batch's picks (batch), or away from the labelled data too (labelled); "
                        "kmeans: the frame nearest each centre of a k-means clustering "
                        "weighted by the deviations (no FPS)")
    p.add_argument("--rank", choices=["absolute", "relative"], default="absolute",
                   help="query by committee: order the candidates by the raw max_force_dev "
                        "(absolute) or by DeePMD-kit's relative force deviation, "
                        "forces_dev / (|F| + --relative-level) (relative)")
    p.add_argument("--relative-level", type=float, default=1.0,
                   help="eV/A, the level of the relative deviation (default 1.0)")
    p.add_argument("--judges", type=int, default=1,
                   help="final fits per loop seed and selection from different initial weights "
                        f"(training seeds seed + {JUDGE_SEED_STEP} j); a seed's error is their "
                        "mean (default 1; one judge's own spread is ~2.5 meV/A on ethanol)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the reference (whole-pool) final fits")
    p.add_argument("--model", choices=["egnn", "mace_1layer"], default="egnn",
                   help="the committees' and final fits' model (MODELS; default egnn, the "
                        "small EGNN; mace_1layer: train_bench's one-layer MACE-style nequip); "
                        "another than egnn names the default --work and --out by it")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", help="folder for the runs (default: benchmarks/runs/label, "
                   "label_<model> for another --model; git ignores them)")
    p.add_argument("--out", help="the results JSON, the plot beside it as .png (default: "
                   "benchmarks/results/label_efficiency.json, label_efficiency_<model>.json "
                   "for another --model)")
    p.add_argument("--report-only", action="store_true",
                   help="only collect what --work holds into --out (no training)")
    add_shared_option(p)
    args = p.parse_args()
    tag = "" if args.model == "egnn" else f"_{args.model}"
    args.work = args.work or str(HERE / "runs" / f"label{tag}")
    args.out = args.out or str(HERE / "results" / f"label_efficiency{tag}.json")
    if args.initial < 2 or args.per_iter < 1 or args.max_labels <= args.initial \
            or (args.max_labels - args.initial) % args.per_iter:
        p.error("need --initial >= 2, --per-iter >= 1 and --max-labels = --initial + a "
                "multiple of --per-iter (e.g. 20, 10, 200)")
    if args.judges < 1:
        p.error("--judges must be at least 1")
    if not args.relative_level > 0:
        p.error("--relative-level must be > 0 (eV/A), e.g. 1.0")
    if args.max_labels > POOL:
        p.error(f"--max-labels {args.max_labels}: the pool has {POOL} frames")
    shared_path(args.shared, "data", "rmd17", what="the rMD17 data")
    # a finished fit is reused by its folder name alone: one --work holds one model's runs
    marker = Path(args.work) / "model.txt"
    if marker.is_file() and marker.read_text().strip() != args.model:
        p.error(f"--work {args.work} holds runs of --model {marker.read_text().strip()}; give "
                f"that --model or another --work")
    if not args.report_only:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(args.model + "\n")
    t0 = time.time()
    out = Path(args.out)
    if not args.report_only:
        for mol in args.molecules:
            files = prepare(args, mol)
            for j in range(args.judges):  # every seed's first judge before any second one
                for s in args.seeds:
                    if not args.no_reference:  # first: the target line of every result written
                        final_fit(args, mol, "reference", str(files["pool"]), s, files, j)
                    for strategy in args.strategies:
                        run = learn_run(args, mol, strategy, s, files)
                        final_fit(args, mol, strategy, loop_labels(args, run, files, s), s,
                                  files, j)
                        write_json(out, results(args, time.time() - t0))
    res = results(args, time.time() - t0)
    write_json(out, res)
    plot(res, out.with_suffix(".png"))
    for mol, e in res["molecules"].items():
        print(f"{mol}: final fits ({args.final_steps} steps), test force MAE meV/A, mean over "
              f"seeds: " + ", ".join(f"{k} {v.get('forces_mae_meV_per_A', '-')}"
                                     f"{' +- ' + str(v['forces_mae_std_meV_per_A']) if v.get('seeds') else ''}"
                                     for k, v in e["final_fit"].items())
              + f"; target met: {e['target']['met']}")
        for s, v in e["strategies"].items():
            last = v["mean"][-1] if v["mean"] else None
            if last:
                print(f"  loop {s:9s} {last['labels']} labels: committee force MAE "
                      f"{last['forces_mae_meV_per_A']} +- {last['forces_mae_std_meV_per_A']} "
                      f"meV/A, energy MAE {last['energy_mae_meV']} meV")
    print(f"wrote {portable(out)}")


if __name__ == "__main__":
    main()
