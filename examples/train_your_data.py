"""Train a potential on your own data (extxyz, any ASE format, or DeePMD npy folders).

    python examples/train_your_data.py [DATA] [--model dp_se_e2_a|egnn|nequip] [--minutes 2]

Without DATA it trains on mlpot's embedded silicon data. The same run from the command line:
write the dict below as YAML (see examples/train_config.yaml) and call `mlpot train CONFIG.yaml`.
"""
import argparse
import tempfile

import mlpot
from mlpot.demo import demo_data_path
from mlpot.train import config_from_dict, train
from mlpot.train.evaluate import format_table


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="?", default=demo_data_path())
    p.add_argument("--model", default="dp_se_e2_a")
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--out", default=tempfile.mkdtemp(prefix="mlpot-train-"))
    args = p.parse_args()
    cfg = config_from_dict({
        "data": {"train": args.data, "validation_fraction": 0.1, "max_frames": args.max_frames},
        "model": {"name": args.model, "cutoff": 5.0},
        "loss": {"energy": 1.0, "forces": 1.0, "energy_start": 0.02, "forces_start": 100.0},
        "training": {"batch_size": 2, "max_epochs": 1000, "max_time_min": args.minutes,
                     "out_dir": args.out},
    })
    results = train(cfg)
    print(format_table(results["validation"]))
    path = mlpot.export(f"{args.out}/best.pt", f"{args.out}/model.pt")
    print(f"exported {path}; metrics, log.csv and plots in {args.out}")


if __name__ == "__main__":
    main()
