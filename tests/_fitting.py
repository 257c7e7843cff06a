"""A learning check shared by the model tests: can a small model fit EMT forces of a Cu/Au cell?"""
import numpy as np
import torch

from mlpot import keys as K
from mlpot.data import AtomicData
from mlpot.models import fit_reference_energies, force_rms


def emt_cells(n_frames=20, seed=0):
    """Rattled 8-atom Cu cells with two Au atoms (``ase.Atoms``), ASE's EMT attached."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n_frames):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
        atoms.symbols[[1, 6]] = "Au"
        atoms.positions += rng.normal(0, 0.12, atoms.positions.shape)
        atoms.calc = EMT()
        cells.append(atoms)
    return cells


def emt_frames(n_frames=20, seed=0):
    """emt_cells() labelled by EMT, as AtomicData."""
    frames = [AtomicData.from_ase(atoms, energy=atoms.get_potential_energy(),
                                  forces=atoms.get_forces())
              for atoms in emt_cells(n_frames, seed)]
    for f in frames:
        f.atom_types = (f.atomic_numbers == 79).long()
    return frames


def fit_emt_forces(model, steps, lr=1e-2, cutoff=4.0):
    """Adam on the force and per-atom energy RMSE of emt_frames(); returns the force RMSE
    (eV/A) before and after, both in eval mode."""
    frames = emt_frames()
    model.set_reference_energies(fit_reference_energies(frames, 2))
    model.energy_scale.fill_(force_rms(frames))
    model.fit_statistics(frames)
    batch = AtomicData.collate(frames).with_neighbors(cutoff).to(dtype=torch.float32)
    data = batch.as_dict()
    n_atoms = batch.num_atoms.double()

    def losses():
        out = model(data)
        f_rmse = ((out[K.FORCES] - batch.forces) ** 2).mean().sqrt()
        e_rmse = (((out[K.ENERGY] - batch.energy) / n_atoms) ** 2).mean().sqrt()
        return f_rmse, e_rmse

    model.eval()
    start = float(losses()[0].detach())
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared machine
    try:
        for _ in range(steps):
            f_rmse, e_rmse = losses()
            loss = f_rmse ** 2 + e_rmse.float() ** 2
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    end = float(losses()[0].detach())
    print(f"force RMSE {start:.3f} -> {end:.3f} eV/A")
    return start, end


def labelled_cu_cells(n, seed=0, stress=True):
    """Rattled 2x2x1 fcc Cu cells labelled by ASE's EMT under the REF_ keys the readers know
    (REF_energy, REF_forces and, with ``stress``, REF_stress): training data for tests."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    frames = []
    for k in range(n):
        a = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 1))
        a.rattle(0.08, seed=seed + k)
        a.calc = EMT()
        a.info["REF_energy"] = a.get_potential_energy()
        a.arrays["REF_forces"] = a.get_forces()
        if stress:
            a.info["REF_stress"] = a.get_stress()
        a.calc = None
        frames.append(a)
    return frames


def periodic_water_and_ethanol(box_molecules_per_side):
    """A rattled periodic water box and an ethanol molecule: the structures on which every
    engine must give the same numbers."""
    from mlpot import testing as T
    from mlpot.check import water_box

    box = water_box(box_molecules_per_side)
    box.rattle(0.02, seed=1)
    return {"periodic water": box, "ethanol": T.small_molecule("CH3CH2OH")}


def write_frames(tmp_path_factory, frames, name="cu.xyz"):
    """``frames`` written as extxyz into a fresh temporary folder; the file's path."""
    from ase.io import write

    path = tmp_path_factory.mktemp("data") / name
    write(path, frames, format="extxyz")
    return str(path)
