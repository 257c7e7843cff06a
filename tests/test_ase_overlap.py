"""MLPotCalculator warns once when atoms overlap (closer than min_distance, 0.5 A by default, the
readers' limit for training data), periodic images included."""
import warnings

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from mlpot.ase import MLPotCalculator
from mlpot.data.validate import closest_pair
from mlpot.models import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("egnn", ["H", "O"], cutoff=3.0, dtype="float64", hidden=8, edge_hidden=8,
                       num_layers=1, readout_hidden=8).eval()


def test_overlapping_atoms_warn_once(model):
    atoms = molecule("H2O")
    atoms.calc = MLPotCalculator(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a normal molecule: no warning
        atoms.get_potential_energy()
    atoms.positions[1] = atoms.positions[0] + [0.3, 0.0, 0.0]
    with pytest.warns(RuntimeWarning) as record:
        atoms.get_forces()
    overlap = [w for w in record if "apart" in str(w.message)]
    assert len(overlap) == 1
    msg = str(overlap[0].message)
    assert "atoms 0 and 1 are 0.300 A apart, closer than 0.5 A" in msg and "\n" not in msg
    atoms.positions[2] = atoms.positions[0] + [0.0, 0.2, 0.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per calculator
        atoms.get_potential_energy()


def test_periodic_images_count_and_the_check_can_be_off(model):
    atoms = Atoms("OH", positions=[[0.1, 2.0, 2.0], [4.8, 2.0, 2.0]], cell=[5.0, 5.0, 5.0],
                  pbc=True)  # 4.7 A apart in the cell, 0.3 A across the boundary
    atoms.calc = MLPotCalculator(model)
    with pytest.warns(RuntimeWarning, match=r"atoms [01] and [01] are 0\.300 A apart"):
        atoms.get_potential_energy()
    atoms.calc = MLPotCalculator(model, min_distance=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atoms.get_potential_energy()
    atoms.pbc = False  # no images: 4.7 A apart
    atoms.calc = MLPotCalculator(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atoms.get_potential_energy()


def test_closest_pair():
    pos = torch.tensor([[0.0, 0, 0], [0.45, 0, 0], [3.0, 0, 0], [3.2, 0, 0]], dtype=torch.float64)
    i, j, d = closest_pair(pos, torch.zeros(3, 3), torch.zeros(3, dtype=torch.bool), 0.5)
    assert {i, j} == {2, 3} and d == pytest.approx(0.2)
    assert closest_pair(pos, torch.zeros(3, 3), torch.zeros(3, dtype=torch.bool), 0.1) is None
    single = torch.tensor([[0.1, 0.1, 0.1]], dtype=torch.float64)
    i, j, d = closest_pair(single, torch.eye(3) * 0.4, torch.ones(3, dtype=torch.bool), 0.5)
    assert (i, j) == (0, 0) and d == pytest.approx(0.4)  # an atom and its own image
    np.testing.assert_equal(
        closest_pair(single, torch.zeros(3, 3), torch.zeros(3, dtype=torch.bool), 0.5), None)
