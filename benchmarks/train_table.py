"""Print the accuracy table of README.md from benchmarks/results/train_*.json (train_bench.py).

    python benchmarks/train_table.py
"""
import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main():
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    rows = [json.loads(p.read_text()) for p in sorted((HERE / "results").glob("train_*_*.json"))
            if "force_cost" not in p.name]
    print("| data (test set) | model | threads | train command | epochs | E RMSE meV/atom | "
          "F RMSE meV/A | peer: E / F (wall) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["task"], r["test"]["forces_rmse_meV_per_A"])):
        t, p = r["test"], r["peer"]
        test = {"water": "water (data_2 frames 64-79)", "3bpa": "3BPA (test_300K)",
                "3bpa_mixedT": "3BPA (test_300K), trained on train_mixedT"}[r["task"]]
        peer = "no peer run" if p is None else (
            f"{p['name']}: {p['E_rmse_meV_per_atom']:.2f} / {p['F_rmse_meV_per_A']:.1f} "
            f"({p['wall_s'] / 60:.1f} min, 2 threads)")
        print(f"| {test} | {r['model']} | {r['threads']} | {r['train_command_wall_s'] / 60:.1f} min "
              f"| {r['epochs']} | {t['energy_rmse_meV_per_atom']:.2f} | "
              f"{t['forces_rmse_meV_per_A']:.1f} | {peer} |")
    cost = HERE / "results" / "train_force_cost.json"
    if cost.exists():
        print("\n| data / model | frames/s energy only | frames/s with forces | ratio |")
        print("|---|---|---|---|")
        for k, v in json.loads(cost.read_text()).items():
            print(f"| {k} | {v['energy_only']:.1f} | {v['with_forces']:.1f} | {v['ratio']:.2f} |")


if __name__ == "__main__":
    main()
