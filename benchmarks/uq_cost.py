"""MD cost of an uncertainty: one energy+forces call of a single model, the same model with a
variance network (``model.uncertainty: mve``, mlpot.models.mve) and a K = 4 committee, for the
three families with train_bench's hyperparameters (untrained weights: the cost does not depend
on them), exported to TorchScript and called as every engine calls them.

Systems: a 192-atom periodic water box (``_common.water_box(4)``, cutoff 6 A for the Deep
Potential and 5 A for the message-passing models, as train_bench uses them) and 16 replicas of
3BPA batched in one call (27 atoms each, the molecule of ``<shared>/data/3bpa``; a batch of
replicas is how ``integrators`` and ``mlpot learn`` explore). Each round times every model once
(``_common.timeit``: median of ``--repeat`` calls after warm-up), rounds interleaved
(``--rounds``), so a change of the machine's load hits all of them alike; reported are the
median over rounds of each model's time per call and the ratios to the single model (median and
range over rounds). Target of the trust issue: the cheap method at most 1.3x a single model.

    OMP_NUM_THREADS=2 python benchmarks/uq_cost.py [--threads 2] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from _common import (add_shared_option, command_line, machine_info, portable, shared_path,
                     timeit, water_box, write_json)

HERE = Path(__file__).resolve().parent
FAMILIES = ("dp_se_e2_a", "egnn", "nequip")
CUTOFF = {"dp_se_e2_a": 6.0, "egnn": 5.0, "nequip": 5.0}
K_MEMBERS = 4


def models_of(family: str, type_map):
    """(single, mve, committee) modules with train_bench's hyperparameters."""
    import torch

    from mlpot.models import build_model
    from mlpot.models.committee import Committee
    from mlpot.models.mve import build_mve
    from train_bench import MODELS

    hp = MODELS[family]["model"]["hparams"]

    def one(seed):
        torch.manual_seed(seed)
        return build_model(family, type_map, CUTOFF[family], "float32", **hp)

    return {"single": one(0), "mve": build_mve(one(0)),
            "committee": Committee([one(s) for s in range(K_MEMBERS)])}


def systems(shared: Path):
    from ase.io import read

    water = water_box(4)
    path = shared_path(shared, "data", "3bpa", "test_300K.xyz", what="the 3BPA test file")
    bpa = read(str(path), index=0)
    return {"water_192": (water, 1), "3bpa_x16": (bpa, 16)}


def call_of(model, atoms, replicas: int):
    """A closure that evaluates energy and forces of ``replicas`` copies of ``atoms``."""
    import torch

    from mlpot.inputs import replica_index, replica_inputs

    n = len(atoms)
    types = model.atom_types(atoms.numbers).repeat(replicas)
    pos = torch.tensor(atoms.positions, dtype=torch.float32).expand(replicas, n, 3).clone()
    periodic = bool(atoms.pbc.all())
    cell = torch.tensor(atoms.cell.array if periodic else [[0.0] * 3] * 3,
                        dtype=torch.float32).expand(replicas, 3, 3).clone()
    pbc = torch.tensor([periodic] * 3).expand(replicas, 3).clone()
    static = replica_index(replicas, n, pos.device)
    data = replica_inputs(pos, types, cell, pbc, static)
    return lambda: model(data, True, False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per model and round")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--out", default=str(HERE / "results" / "uq_cost.json"))
    add_shared_option(p)
    args = p.parse_args(argv)

    import torch

    from mlpot.export import as_exported

    torch.set_num_threads(args.threads)
    cases = {}
    for name, (atoms, replicas) in systems(args.shared).items():
        type_map = sorted(set(atoms.get_chemical_symbols()))
        for family in args.families:
            for kind, module in models_of(family, type_map).items():
                model = as_exported(module)
                cases[(name, family, kind)] = call_of(model, atoms, replicas)
    times = {key: [] for key in cases}
    for r in range(args.rounds):
        for key, fn in cases.items():
            t = timeit(fn, warmup=1 if r else 2, repeat=args.repeat)
            times[key].append(t["median_s"])
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    results = {}
    for (name, family, kind), ts in times.items():
        single = times[(name, family, "single")]
        ratios = [a / b for a, b in zip(ts, single)]
        results.setdefault(name, {}).setdefault(family, {})[kind] = {
            "ms_per_call": round(1e3 * statistics.median(ts), 2),
            "ratio_to_single": round(statistics.median(ratios), 3),
            "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)]}
    for name, fams in results.items():
        for family, kinds in fams.items():
            print(f"{name:10s} {family:11s} " + "  ".join(
                f"{k} {v['ms_per_call']:8.2f} ms ({v['ratio_to_single']:.2f}x)"
                for k, v in kinds.items()))
    out = {"what": "energy+forces call of exported models: single, mve, committee K=4",
           "threads": args.threads, "rounds": args.rounds, "repeat": args.repeat,
           "members": K_MEMBERS, "results": results,
           "target": "mve at most 1.3x single",
           "met": {f"{n}/{f}": v["mve"]["ratio_to_single"] <= 1.3
                   for n, fams in results.items() for f, v in fams.items()},
           "command": command_line(shared=args.shared), "machine": machine_info()}
    write_json(args.out, out)
    print(f"wrote {portable(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
