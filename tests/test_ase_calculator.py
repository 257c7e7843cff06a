"""MLPotCalculator: equal to the model, numerically consistent, cached, and usable by ase.md,
ase.optimize and ase.constraints."""
import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import molecule
from ase.calculators.calculator import PropertyNotImplementedError
from torch import nn

from _fitting import periodic_water_and_ethanol
from mlpot import keys as K
from mlpot import testing as T
from mlpot.ase import MLPotCalculator
from mlpot.check import water_box
from mlpot.export import export, load
from mlpot.models import Potential, build_model
from mlpot.nn import polynomial_cutoff, scatter_sum


def _thermalize(vd):
    """Maxwell-Boltzmann momenta (ASE 3.29 renamed MaxwellBoltzmannDistribution)."""
    return getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution


class MorseNet(nn.Module):
    """A smooth bonded toy: E_i = 1/2 sum_j D_tt' [(1 - exp(-a (r - r0_tt')))^2 - 1] u(r) with
    O-H bonds at 0.97 A, H-H at 1.55 A (keeps the water angle) and weak O-O at 2.9 A."""

    def __init__(self, num_types: int = 2, cutoff: float = 4.0):
        super().__init__()
        self.cutoff = cutoff
        # types: 0 = O, 1 = H
        self.register_buffer("r0", torch.tensor([[2.9, 0.97], [0.97, 1.55]]))
        self.register_buffer("depth", torch.tensor([[0.15, 2.0], [2.0, 0.3]]))
        self.alpha = 2.0

    def forward(self, atom_types, edge_index, edge_vectors):
        r = torch.linalg.norm(edge_vectors, dim=1)  # [P]
        ti, tj = atom_types[edge_index[0]], atom_types[edge_index[1]]
        r0 = self.r0.to(r.dtype)[ti, tj]
        d = self.depth.to(r.dtype)[ti, tj]
        e = d * ((1 - torch.exp(-self.alpha * (r - r0))) ** 2 - 1)
        e = 0.5 * e * polynomial_cutoff(r, self.cutoff)
        return scatter_sum(e, edge_index[0], atom_types.shape[0])


def morse_model(dtype=torch.float64):
    return Potential(MorseNet(), ["O", "H"], 4.0, {"model": "morse"}, dtype=dtype)


def egnn(dtype="float64", type_map=("H", "C", "O")):
    torch.manual_seed(0)
    return build_model("egnn", list(type_map), cutoff=4.0, dtype=dtype, hidden=16,
                       edge_hidden=16, num_layers=2, readout_hidden=16)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ase") / "egnn.pt"
    model = egnn()
    export(model, str(path))
    return model, str(path)


@pytest.fixture(scope="module")
def morse_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ase") / "morse.pt"
    export(morse_model(), str(path))
    return str(path)


def structures():
    return periodic_water_and_ethanol(2)


@pytest.mark.parametrize("name", ["periodic water", "ethanol"])
def test_equals_the_python_model(model_file, name):
    model, path = model_file
    atoms = structures()[name]
    atoms.calc = MLPotCalculator(path)
    periodic = bool(atoms.pbc.all())
    ref = model(T.to_data(atoms, model).as_dict(), True, periodic)
    assert atoms.get_potential_energy() == pytest.approx(float(ref[K.ENERGY][0]), abs=1e-9)
    assert atoms.get_potential_energy(force_consistent=True) == atoms.get_potential_energy()
    np.testing.assert_allclose(atoms.get_forces(), ref[K.FORCES].detach().numpy(), atol=1e-9)
    energies = atoms.get_potential_energies()
    np.testing.assert_allclose(energies, ref[K.ATOMIC_ENERGIES].detach().numpy(), atol=1e-9)
    assert energies.sum() == pytest.approx(atoms.get_potential_energy(), abs=1e-8)
    if periodic:
        s = ref[K.STRESS].detach()[0].numpy()
        voigt = [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]]
        np.testing.assert_allclose(atoms.get_stress(), voigt, atol=1e-10)
        np.testing.assert_allclose(atoms.get_stress(voigt=False), s, atol=1e-10)
    else:
        with pytest.raises(PropertyNotImplementedError, match="periodic"):
            atoms.get_stress()


def test_forces_and_stress_are_numerical_derivatives(model_file):
    _, path = model_file
    atoms = water_box(2)
    atoms.rattle(0.05, seed=2)
    atoms.set_cell(atoms.cell.array + np.array([[0, 0, 0], [0.4, 0, 0], [0.2, -0.3, 0]]),
                   scale_atoms=True)
    calc = MLPotCalculator(path)
    atoms.calc = calc
    num_stress = calc.calculate_numerical_stress(atoms, d=1e-5)
    np.testing.assert_allclose(atoms.get_stress(), num_stress, atol=1e-7)
    idx = [0, 5, 17]
    num_forces = calc.calculate_numerical_forces(atoms, d=1e-5)
    np.testing.assert_allclose(atoms.get_forces()[idx], num_forces[idx], atol=1e-6)


def test_only_recomputes_what_changed(model_file):
    _, path = model_file
    atoms = water_box(2)
    calc = MLPotCalculator(path)
    atoms.calc = calc
    calls = []
    inner = calc.model.module

    class Counting:
        def __call__(self, data, forces, stress):
            calls.append(stress)
            return inner(data, forces, stress)

    calc.model.module = Counting()
    atoms.get_potential_energy()
    atoms.get_forces()
    atoms.get_potential_energies()
    assert calls == [False]
    atoms.get_stress()
    atoms.get_stress()
    atoms.get_forces()
    assert calls == [False, True]
    types_before = calc._types
    atoms.positions[0, 0] += 0.01
    atoms.get_forces()
    assert calls == [False, True, False]
    assert calc._types is types_before  # same atoms: the type tensor is reused
    atoms.set_cell(atoms.cell * 1.01, scale_atoms=True)
    atoms.get_stress()
    assert calls == [False, True, False, True]


def test_unknown_element_is_a_clear_error(model_file):
    _, path = model_file
    atoms = molecule("CH3Cl")
    atoms.calc = MLPotCalculator(path)
    with pytest.raises(ValueError, match=r"\['Cl'\] not in the type map \['H', 'C', 'O'\]"):
        atoms.get_potential_energy()


def test_accepts_a_potential_or_a_loaded_model(model_file):
    model, path = model_file
    atoms = T.small_molecule("CH3CH2OH")
    energies = []
    for m in (path, load(path), model):
        atoms.calc = MLPotCalculator(m)
        energies.append(atoms.get_potential_energy())
    assert max(energies) - min(energies) < 1e-10


def test_float32_model_is_close_to_float64(tmp_path):
    m64 = egnn()
    p32 = str(tmp_path / "egnn32.pt")
    export(m64, p32, dtype="float32")
    atoms = structures()["periodic water"]
    atoms.calc = MLPotCalculator(m64)
    e64, f64 = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = MLPotCalculator(p32)
    assert atoms.get_potential_energy() == pytest.approx(e64, abs=1e-4 * len(atoms))
    np.testing.assert_allclose(atoms.get_forces(), f64, atol=1e-4)


# ---------------------------------------------------------------------------- dynamics
def crystal(strain: float = 0.0, seed: int = 0) -> Atoms:
    """32 O atoms on an fcc lattice at the Morse minimum (nearest neighbours at 2.9 A, the second
    shell beyond the 4 A cutoff), rattled: a smooth, stable solid for MD tests."""
    from ase.build import bulk

    atoms = bulk("O", "fcc", a=2.9 * 2 ** 0.5 * (1 + strain), cubic=True).repeat(2)
    atoms.rattle(0.05, seed=seed)
    return atoms


def test_nve_conserves_energy(morse_file):
    from ase.md import velocitydistribution as vd
    from ase.md.verlet import VelocityVerlet

    atoms = crystal()
    atoms.calc = MLPotCalculator(morse_file)
    _thermalize(vd)(atoms, temperature_K=300, rng=np.random.default_rng(0))
    vd.Stationary(atoms)
    dt_fs, steps, every = 2.0, 3000, 10
    dyn = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    energies = []
    dyn.attach(lambda: energies.append(atoms.get_total_energy()), interval=every)
    dyn.run(steps)
    energies = np.array(energies) / len(atoms)
    time_ps = np.arange(len(energies)) * every * dt_fs * 1e-3
    drift = abs(np.polyfit(time_ps, energies, 1)[0])  # eV/atom/ps
    assert 50 < atoms.get_temperature() < 600  # it moved, and stayed a solid
    assert drift < 2e-5, f"drift {drift:.2e} eV/atom/ps"
    assert np.ptp(energies) < 1e-4, f"energy spread {np.ptp(energies):.2e} eV/atom"


def test_thermostats_and_barostats_run(morse_file):
    from ase.md.langevin import Langevin
    from ase.md.npt import NPT
    from ase.md.nptberendsen import NPTBerendsen

    atoms = crystal(seed=1)
    atoms.calc = MLPotCalculator(morse_file)
    Langevin(atoms, 2 * units.fs, temperature_K=300, friction=0.05,
             rng=np.random.default_rng(1)).run(100)
    assert 100 < atoms.get_temperature() < 600
    v0 = atoms.get_volume()
    NPTBerendsen(atoms, 2 * units.fs, temperature_K=300, pressure_au=1e4 * units.bar,
                 taut=50 * units.fs, taup=200 * units.fs,
                 compressibility_au=1e-2 / units.GPa).run(50)
    assert atoms.get_volume() < v0  # compressed by 1 GPa
    NPT(atoms, 2 * units.fs, temperature_K=300, externalstress=0.0, ttime=50 * units.fs,
        pfactor=(200 * units.fs) ** 2 * 10 * units.GPa).run(30)
    assert np.isfinite(atoms.get_potential_energy()) and atoms.get_temperature() < 1000


def test_optimizers_cell_filters_and_constraints(morse_file):
    from ase.constraints import FixAtoms
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS, FIRE

    atoms = molecule("H2O")
    atoms.positions += [[0.1, 0, 0], [0, 0.1, 0], [0, 0, -0.1]]
    atoms.calc = MLPotCalculator(morse_file)
    assert BFGS(atoms, logfile=None).run(fmax=1e-3, steps=200)
    assert atoms.get_distances(0, [1, 2]) == pytest.approx([0.97, 0.97], abs=0.05)

    atoms = crystal(seed=2)
    atoms.calc = MLPotCalculator(morse_file)
    atoms.set_constraint(FixAtoms(indices=[0, 1, 2]))
    fixed = atoms.positions[:3].copy()
    assert FIRE(atoms, logfile=None).run(fmax=0.01, steps=300)
    np.testing.assert_array_equal(atoms.positions[:3], fixed)
    assert np.abs(atoms.get_forces()[:3]).max() == 0.0

    atoms = crystal(strain=0.03, seed=3)  # stretched: the cell must shrink back
    atoms.calc = MLPotCalculator(morse_file)
    assert BFGS(FrechetCellFilter(atoms), logfile=None).run(fmax=1e-3, steps=200)
    assert atoms.get_volume() < 0.95 * crystal(strain=0.03).get_volume()
    assert np.abs(atoms.get_stress()).max() < 1e-4
