"""Training cost of a committee per member against a single model (issue 16, README
"Committees").

Builds rattled Cu EMT frames, then for K = 1 and K = K_COMMITTEE (interleaved, several times,
as a shared machine's load changes) makes a ``Trainer`` (data read and neighbor lists built
once per trainer), runs one warm-up epoch and times ``--epochs`` epochs of ``train_epoch``; a
committee's members step in lockstep, so its throughput is counted in member-frames per second.
Prints each run and the ratio of the medians.

    OMP_NUM_THREADS=1 python benchmarks/committee_cost.py [--device cuda] [--repeats 4]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--members", type=int, default=4, help="committee size K (default 4)")
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--epochs", type=int, default=4, help="timed epochs per run")
    p.add_argument("--repeats", type=int, default=4, help="runs of each K, interleaved")
    p.add_argument("--model", default="egnn")
    args = p.parse_args(argv)

    import torch
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.io import write

    from mlpot.train import Trainer, config_from_dict

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        frames = []
        for k in range(args.frames):
            a = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))
            a.rattle(0.08, seed=k)
            a.calc = EMT()
            a.info["REF_energy"] = a.get_potential_energy()
            a.arrays["REF_forces"] = a.get_forces()
            a.calc = None
            frames.append(a)
        data = os.path.join(tmp, "cu.xyz")
        write(data, frames, format="extxyz")
        rates = {1: [], args.members: []}
        for run, k in enumerate([1, args.members] * args.repeats):
            cfg = config_from_dict({
                "data": {"train": data, "validation_fraction": 0.25},
                "model": {"name": args.model, "cutoff": 4.0},
                "training": {"batch_size": 4, "max_epochs": args.epochs + 1,
                             "out_dir": os.path.join(tmp, f"run{run}"), "progress": False,
                             "ensemble": k, "device": args.device}})
            trainer = Trainer(cfg)
            trainer.train_epoch()  # warm-up
            sync()
            t0 = time.perf_counter()
            for _ in range(args.epochs):
                trainer.train_epoch()
            sync()
            dt = time.perf_counter() - t0
            rate = args.epochs * len(trainer.train_set) * k / dt
            rates[k].append(rate)
            print(f"K={k}: {rate:.1f} member-frames/s ({dt:.2f} s for {args.epochs} epochs)",
                  flush=True)
    one, many = statistics.median(rates[1]), statistics.median(rates[args.members])
    print(f"median: K=1 {one:.1f} frames/s, K={args.members} {many:.1f} member-frames/s; "
          f"cost per member {one / many:.2f}x a single model")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
