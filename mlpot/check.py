"""``mlpot check``: an end-to-end check of the installation on data made on the spot.

It builds (or loads) the neighbor-list op, writes a periodic water box and a molecule to extxyz
and DeePMD npy, reads them back through mlpot's readers, and compares mlpot's neighbor list with
ASE's. It prints what it did and exits non-zero when anything disagrees.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np


def water_box(n: int, seed: int = 0):
    """n^3 water molecules on a jittered cubic lattice at about liquid density (periodic)."""
    from ase import Atoms
    from ase.build import molecule
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    local = molecule("H2O").positions
    local = local - local[0]
    spacing = 3.1  # Angstrom between molecule centres: ~1.0 g/cm^3
    g = np.arange(n) * spacing
    centres = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    centres = centres + rng.uniform(-0.1, 0.1, centres.shape)
    rots = Rotation.random(len(centres), random_state=rng).as_matrix()
    pos = (centres[:, None, :] + np.einsum("mij,aj->mai", rots, local)).reshape(-1, 3)
    atoms = Atoms(["O", "H", "H"] * len(centres), positions=pos, cell=np.eye(3) * n * spacing,
                  pbc=True)
    atoms.wrap()
    return atoms


def _same_pairs(a, b) -> bool:
    def key(i, j, s):
        return set(zip(np.asarray(i).tolist(), np.asarray(j).tolist(),
                       map(tuple, np.asarray(s).tolist())))
    return key(*a) == key(*b)


def run_check(cutoff: float = 6.0, size: int = 8) -> int:
    import torch
    from ase.build import molecule
    from ase.io import write
    from ase.neighborlist import neighbor_list as ase_neighbor_list

    import mlpot
    from mlpot.data import AtomicData, read

    print(f"mlpot {mlpot.__version__}, torch {torch.__version__}")
    t0 = time.perf_counter()
    backend = mlpot.neighbors.backend()
    print(f"neighbor list backend: {backend} ({time.perf_counter() - t0:.1f} s to build/load)"
          + (f", library {mlpot.neighbors.library_path()}" if backend == "cpp" else ""))
    ok = True
    box = water_box(size)
    mol = molecule("CH3CH2OH")
    rng = np.random.default_rng(1)
    for atoms in (box, mol):
        atoms.info["REF_energy"] = float(rng.normal())
        atoms.arrays["REF_forces"] = rng.normal(size=(len(atoms), 3))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "check.xyz")
        write(path, [box, mol], format="extxyz")
        data = read(path, type_map=["H", "C", "O"], require=("energy", "forces"))
        print(f"read {len(data)} structures from extxyz "
              f"({', '.join(str(int(d.num_atoms[0])) + ' atoms' for d in data)})")
        batch = AtomicData.collate(data)
        t0 = time.perf_counter()
        batch = batch.with_neighbors(cutoff)
        t_batch = time.perf_counter() - t0
        for k, atoms in enumerate((box, mol)):
            s = batch[k]
            t0 = time.perf_counter()
            ref = ase_neighbor_list("ijS", atoms, cutoff)
            t_ase = time.perf_counter() - t0
            same = _same_pairs(ref, (s.edge_index[0], s.edge_index[1], s.edge_cell_shift))
            ok &= same
            print(f"  structure {k}: {s.edge_index.shape[1]} pairs at {cutoff} A, "
                  f"{'equal to' if same else 'DIFFERENT FROM'} ASE's ({len(ref[0])} pairs); "
                  f"ASE took {1e3 * t_ase:.1f} ms")
        print(f"batched neighbor list of both: {1e3 * t_batch:.1f} ms")
        vec = batch.edge_vectors()
        ok &= bool(vec.norm(dim=1).max() < cutoff)
    print("check passed" if ok else "check FAILED")
    return 0 if ok else 1
