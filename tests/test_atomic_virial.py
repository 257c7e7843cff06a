"""The per-atom virial (``mlpot.keys.ATOMIC_VIRIAL``, LAMMPS's compute stress/atom, ASE's
``stresses``): it sums to the virial of the strain derivative for the three families, a
committee and the chunked inference path, is the same in the exported file, and each atom's
value is the split of the pair-vector gradients (checked against a pair potential written out by
hand)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mlpot
from mlpot import keys as K
from mlpot.models import build_model, network_class

FAMILIES = ["dp_se_e2_a", "egnn", "nequip"]


def _inputs(seed: int = 1):
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.1, seed=seed)
    return atoms, {K.POSITIONS: torch.tensor(atoms.positions),
                   K.CELL: torch.tensor(np.asarray(atoms.cell))[None],
                   K.PBC: torch.tensor([[True, True, True]]),
                   K.ATOM_TYPES: torch.zeros(len(atoms), dtype=torch.long),
                   K.COMPUTE_ATOMIC_VIRIAL: torch.tensor(True)}


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(name, ["Si"], 4.0, "float64", **network_class(name).TEST_HPARAMS).eval()
    model.energy_scale.fill_(3.0)
    return model


@pytest.mark.parametrize("name", FAMILIES)
def test_atomic_virial_sums_to_the_virial(name, tmp_path):
    model = _model(name)
    _, data = _inputs()
    out = model(data, True, True)
    virial = out[K.VIRIAL][0]
    w = out[K.ATOMIC_VIRIAL]
    assert w.shape == (8, 3, 3) and w.dtype == torch.float64
    assert float(virial.abs().max()) > 1e-4
    torch.testing.assert_close(w.sum(0), virial, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w, w.transpose(1, 2), rtol=0, atol=0)
    assert K.ATOMIC_VIRIAL not in model({k: v for k, v in data.items()
                                         if k != K.COMPUTE_ATOMIC_VIRIAL}, True, True)
    path = str(tmp_path / "m.pt")
    mlpot.export(model, path)
    exported = torch.jit.load(path)
    torch.testing.assert_close(exported(data, True, False)[K.ATOMIC_VIRIAL], w, rtol=1e-12,
                               atol=1e-14)


def test_chunked_local_network_gives_the_same_atomic_virial():
    model = _model("dp_se_e2_a")
    _, data = _inputs()
    whole = model(data, True, True)[K.ATOMIC_VIRIAL]
    model.chunk_atoms = 3  # 8 atoms in 3 chunks
    torch.testing.assert_close(model(data, True, True)[K.ATOMIC_VIRIAL], whole, rtol=1e-12,
                               atol=1e-14)


def test_committee_gives_the_members_mean():
    from mlpot.models.committee import Committee

    members = [_model("nequip", seed) for seed in (0, 1)]
    committee = Committee(members).eval()
    _, data = _inputs()
    mean = sum(m(data, True, False)[K.ATOMIC_VIRIAL] for m in members) / 2
    torch.testing.assert_close(committee(data, True, False)[K.ATOMIC_VIRIAL], mean)


def test_ase_stresses_sum_to_the_stress(tmp_path):
    from mlpot.ase import MLPotCalculator

    path = str(tmp_path / "m.pt")
    mlpot.export(_model("egnn"), path)
    atoms, _ = _inputs()
    atoms.calc = MLPotCalculator(path)
    stresses = atoms.get_stresses()
    assert stresses.shape == (8, 6)
    np.testing.assert_allclose(stresses.sum(0), atoms.get_stress(), rtol=1e-9, atol=1e-12)


class _Pair(torch.nn.Module):
    """E = sum over directed edges of 0.5 * (|v| - 2)^2 (each pair counted from both sides)."""

    def forward(self, atom_types, edge_index, vectors):
        e = 0.5 * (vectors.norm(dim=1) - 2.0).pow(2)
        return torch.zeros(atom_types.shape[0], dtype=e.dtype).index_add(0, edge_index[0], 0.5 * e)


def test_each_atom_gets_half_of_its_pairs():
    """For a pair potential, W_i = -1/2 sum_j v_ij (x) dE/dv_ij over both directions of each pair
    of i, i.e. -1/2 sum_j r_ij (x) f_ij with the pair force: the textbook per-atom virial."""
    from mlpot.models.potential import Potential

    model = Potential(_Pair(), ["Si"], 3.0, {"model": "pair"}, torch.float64).eval()
    atoms, data = _inputs(seed=3)
    w = model(data, True, False)[K.ATOMIC_VIRIAL].numpy()
    from ase.neighborlist import neighbor_list

    i, j, d, v = neighbor_list("ijdD", atoms, 3.0)
    # dE/dv for the ordered pair (i, j): both directions contribute 0.5 (|v| - 2) v/|v| each
    g = ((d - 2.0) / d)[:, None] * v * 0.5
    ref = np.zeros((len(atoms), 3, 3))
    for a, b, vv, gg in zip(i, j, v, g):
        ref[a] -= 0.5 * np.outer(vv, gg)
        ref[b] -= 0.5 * np.outer(vv, gg)
    assert np.abs(ref - ref.transpose(0, 2, 1)).max() < 1e-12  # pair forces lie along v
    np.testing.assert_allclose(w, ref, rtol=1e-10, atol=1e-12)
