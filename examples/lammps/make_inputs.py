"""Write what in.water needs: a water box (water.data) and, without --model, a small model.

    python make_inputs.py [--molecules 4] [--family egnn|dp_se_e2_a|nequip] [--model my.pt]

Without --model, a small untrained model of --family (default EGNN: 2 interaction layers, cutoff
4 A, float64) is exported as model.pt: its physics is meaningless, it only shows the workflow. With --model, that exported
model is checked (an mlpot export knowing O and H) and copied to model.pt. water.data is
molecules^3 water molecules (3 * molecules^3 atoms) at about liquid density, atom type 1 = O,
2 = H (in.water's `pair_coeff * * O H`).
"""
import argparse
import os
import shutil

import torch
from ase.io import write

import mlpot
from mlpot.check import water_box
from mlpot.export import read_metadata
from mlpot.models import build_model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--molecules", type=int, default=4, help="molecules per box edge (default 4)")
    p.add_argument("--model", help="an exported mlpot model for O and H (default: a small "
                                   "untrained EGNN)")
    p.add_argument("--family", default="egnn", choices=["egnn", "dp_se_e2_a", "nequip"],
                   help="family of the untrained model written without --model (default egnn)")
    p.add_argument("--out", default=".", help="folder to write into (default: here)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    target = os.path.join(args.out, "model.pt")
    if args.model:
        info = read_metadata(args.model)  # a clear error for a file that is not an mlpot model
        missing = {"O", "H"} - set(info["type_map"])
        if missing:
            raise SystemExit(f"{args.model} does not know {sorted(missing)}: in.water needs O and H")
        if os.path.abspath(args.model) != os.path.abspath(target):
            shutil.copyfile(args.model, target)
    else:
        torch.manual_seed(0)
        small = {"egnn": dict(hidden=32, edge_hidden=32, num_layers=2, readout_hidden=16),
                 "dp_se_e2_a": dict(embedding=[16, 32], axis_neuron=8, fitting=[64, 64]),
                 "nequip": dict(num_features=16, l_max=1, num_layers=2)}[args.family]
        model = build_model(args.family, ["O", "H"], cutoff=4.0, dtype="float64", **small)
        mlpot.export(model, target)
    info = read_metadata(target)
    atoms = water_box(args.molecules)
    atoms.wrap()
    write(os.path.join(args.out, "water.data"), atoms, format="lammps-data",
          specorder=["O", "H"], masses=True, units="metal")
    print(f"wrote {target} ({info['config']['model']}, cutoff {info['cutoff']} A, receptive "
          f"field {info['receptive_field']} A) and water.data ({len(atoms)} atoms, "
          f"{atoms.cell.lengths()[0]:.2f} A box)")


if __name__ == "__main__":
    main()
