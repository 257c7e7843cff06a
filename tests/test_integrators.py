"""The integrators package: exactness, reproducibility, safety, I/O (fast; the statistical checks
of the ensembles are in test_integrators_ensembles.py)."""
import io
import os

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.lj import LennardJones as ASELennardJones

import integrators as I
from integrators.checkpoint import load_md_checkpoint, save_md_checkpoint
from integrators.cli import main as md_main
from mlpot import keys as K
from mlpot import units
from mlpot.neighbors import neighbor_list_batch, pair_vectors

RHO_AR = 0.02035  # atoms/A^3: liquid argon, reduced density 0.8


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def argon(replicas=1, rattle=0.05, repeat=2, seed=0, temperature=100.0, dtype=torch.float64,
          device="cpu"):
    """Argon at liquid density on an fcc lattice, rattled, with Maxwell-Boltzmann velocities."""
    atoms = bulk("Ar", "fcc", a=(4 / RHO_AR) ** (1 / 3), cubic=True).repeat(repeat)
    rng = np.random.default_rng(seed)
    pos = atoms.positions + rng.normal(0, rattle, (replicas, len(atoms), 3))
    st = I.make_state(pos, atoms.get_masses(), atoms.cell.array, True, atoms.numbers,
                      seed=seed, dtype=dtype, device=device)
    return I.initialize_velocities(st, temperature), atoms


def lj(**kw):
    return I.LennardJones(0.0104, 3.4, kw.pop("cutoff", 6.0), **kw)


# ------------------------------------------------------------------------------ units, state
def test_kinetic_energy_and_temperature_match_ase():
    st, atoms = argon(replicas=2)
    st = st.replace(fixed_com=False)
    atoms = atoms.copy()
    atoms.positions = st.positions[1].numpy()
    atoms.set_velocities(st.velocities[1].numpy() * units.A_PER_FS_TO_ASE_VELOCITY)
    assert I.kinetic_energy(st.velocities, st.masses)[1].item() == pytest.approx(
        atoms.get_kinetic_energy(), rel=1e-12)
    assert I.temperature_K(st)[1].item() == pytest.approx(atoms.get_temperature(), rel=1e-12)
    back = I.state_from_ase(atoms)
    assert torch.allclose(back.velocities[0], st.velocities[1], atol=1e-12)


def test_input_errors_are_clear():
    with pytest.raises(ValueError, match="timestep_fs must be"):
        I.VelocityVerlet(0.0)
    with pytest.raises(ValueError, match="timestep_fs must be"):
        I.Langevin(-1.0, 300.0)
    with pytest.raises(ValueError, match="timestep_fs must be"):
        I.Bussi(float("nan"), 300.0)
    with pytest.raises(ValueError, match="temperature_K must be >= 0"):
        I.Langevin(1.0, -5.0)
    with pytest.raises(ValueError, match="temperature_K must be >= 0"):
        I.NoseHooverChain(1.0, [300.0, -1.0])
    with pytest.raises(ValueError, match="temperature_K must be >= 0"):
        I.StochasticCellRescaling(1.0, float("inf"))
    with pytest.raises(ValueError, match="masses are missing"):
        I.make_state(np.zeros((2, 3)), None)
    with pytest.raises(ValueError, match="mass of atom 1 is 0"):
        I.make_state(np.zeros((2, 3)), [1.0, 0.0])
    with pytest.raises(ValueError, match="mass of atom 0 is nan"):
        I.make_state(np.zeros((2, 3)), [float("nan"), 1.0])
    with pytest.raises(ValueError, match="got 3 masses for 2 atoms"):
        I.make_state(np.zeros((2, 3)), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="coupling must be one of"):
        I.StochasticCellRescaling(1.0, 300.0, coupling="xyz")
    st = I.make_state(np.zeros((2, 3)), [1.0, 1.0])
    with pytest.raises(ValueError, match="NPT needs a periodic system"):
        I.StochasticCellRescaling(1.0, 300.0).init(st, I.IdealGas())
    with pytest.raises(ValueError, match="temperature_K has 3 values for 1 replicas"):
        I.Langevin(1.0, [1.0, 2.0, 3.0]).step(I.Langevin(1.0).init(st, I.Harmonic(1.0)),
                                             I.Harmonic(1.0))


# ------------------------------------------------------------------------------ NVE physics
def test_harmonic_oscillator_follows_the_analytic_trajectory():
    """x(t) = x0 cos(wt) + v0/w sin(wt); velocity Verlet's error is second order in dt."""
    k = np.array([0.5, 2.0])  # eV/A^2
    m = np.array([2.0, 12.0])  # amu
    w = np.sqrt(k / m * units.EV_PER_AMU_TO_A2_PER_FS2)  # rad/fs
    x0 = np.array([[[0.3, -0.1, 0.0], [0.0, 0.2, 0.1]], [[-0.2, 0.0, 0.4], [0.1, 0.1, 0.1]]])
    v0 = np.array([[[0.0, 0.01, 0.0], [0.002, 0.0, -0.003]], [[0.0, 0.0, 0.0], [0.0, 0.004, 0.0]]])
    period = 2 * np.pi / w.max()
    errors = []
    for n_per_period in (50, 100, 200):
        dt = period / n_per_period
        st = I.make_state(x0, m, velocities=v0)
        nve = I.VelocityVerlet(dt)
        st = nve.init(st, I.Harmonic(k))
        err = 0.0
        for _ in range(3 * n_per_period):
            st = nve.step(st, I.Harmonic(k))
            t = st.time_fs
            ww = w[None, :, None]
            exact = x0 * np.cos(ww * t) + v0 / ww * np.sin(ww * t)
            err = max(err, np.abs(st.positions.numpy() - exact).max())
        errors.append(err)
    assert errors[-1] < 2e-3 * np.abs(x0).max()
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.6 < coarse / fine < 4.4, errors


def test_nve_energy_error_shrinks_as_dt_squared():
    """Velocity Verlet on a Lennard-Jones liquid (smooth cutoff): the fluctuation of the total
    energy over the same 2 ps scales as dt^2 (ratio 4 for each halving of dt)."""
    st0, _ = argon(replicas=2, rattle=0.2, temperature=120.0)
    spread = []
    for dt in (8.0, 4.0, 2.0):
        f = lj(switch_width_A=1.5)
        nve = I.VelocityVerlet(dt)
        st = nve.init(st0, f)
        e = [nve.conserved_energy(st)]
        for _ in range(int(2000 / dt)):
            st = nve.step(st, f)
            e.append(nve.conserved_energy(st))
        e = torch.stack(e)
        spread.append(float((e - e.mean(0)).std(0).max()))
    assert spread[-1] < 2e-5 * 32  # eV: tiny against kT = 0.01 eV per atom
    for coarse, fine in zip(spread, spread[1:]):
        assert 3.0 < coarse / fine < 5.0, spread


def test_replicas_are_independent_and_equal_single_runs():
    st, _ = argon(replicas=3, seed=4)
    nve = I.VelocityVerlet(5.0)
    f = lj()
    batch = st
    batch = nve.init(batch, f)
    for _ in range(30):
        batch = nve.step(batch, f)
    for r in range(3):
        one = st.replace(positions=st.positions[r:r + 1], velocities=st.velocities[r:r + 1],
                         cell=st.cell[r:r + 1], bath_energy=st.bath_energy[r:r + 1])
        f1 = lj()
        one = nve.init(one, f1)
        for _ in range(30):
            one = nve.step(one, f1)
        assert torch.allclose(one.positions[0], batch.positions[r], atol=1e-10)


# ------------------------------------------------------------------------------ conserved
@pytest.mark.parametrize("make", [
    lambda: I.Langevin(5.0, 100.0, 0.01),
    lambda: I.Bussi(5.0, 100.0, 100.0),
    lambda: I.NoseHooverChain(5.0, 100.0, 200.0),
], ids=["langevin", "bussi", "nose-hoover"])
def test_conserved_energy_of_thermostats(make):
    """The effective energy (K + U [+ P V] + bath energy [+ chain energy]) drifts far less than the
    energy the bath exchanged (start 30 K off target so that it exchanges a lot)."""
    integ = make()
    st, _ = argon(replicas=2, temperature=130.0, seed=2)
    f = lj(switch_width_A=1.0)
    st = integ.init(st, f)
    h0 = integ.conserved_energy(st)
    e0 = I.kinetic_energy(st.velocities, st.masses) + st.energy
    for _ in range(300):
        st = integ.step(st, f)
    drift = (integ.conserved_energy(st) - h0).abs().max()
    exchanged = (I.kinetic_energy(st.velocities, st.masses) + st.energy - e0).abs().min()
    assert exchanged > 0.05  # eV
    assert drift < 0.02 * exchanged, (float(drift), float(exchanged))


@pytest.mark.parametrize("coupling", ["iso", "aniso"])
def test_npt_effective_energy_drift_is_first_order_in_dt(coupling):
    """Stochastic cell rescaling's effective energy K + U + P0 V + bath energy: its drift while the
    volume relaxes is small and halves with dt (the scheme is first order in the cell move)."""
    drift = []
    for dt in (5.0, 2.5):
        integ = I.StochasticCellRescaling(dt, 100.0, 500.0, 100.0, 500.0, 1e-3, coupling)
        st, _ = argon(replicas=2, temperature=130.0, seed=2)
        f = lj(switch_width_A=1.0)
        st = integ.init(st, f)
        h0, e0 = integ.conserved_energy(st), I.kinetic_energy(st.velocities, st.masses) + st.energy
        for _ in range(int(1500 / dt)):
            st = integ.step(st, f)
        drift.append((integ.conserved_energy(st) - h0).abs().max())
        exchanged = (I.kinetic_energy(st.velocities, st.masses) + st.energy - e0).abs().min()
        assert drift[-1] < 0.15 * exchanged, (float(drift[-1]), float(exchanged))
    assert 1.5 < drift[0] / drift[1] < 2.7, drift


def test_each_replica_has_its_own_temperature():
    """temperature_K may be one value per replica (e.g. for replica exchange)."""
    k = np.linspace(0.5, 2.0, 32)
    st = I.make_state(np.zeros((32, 3)), np.full(32, 4.0), replicas=3, seed=1)
    st = I.initialize_velocities(st, [50.0, 150.0, 300.0], remove_com=False)
    integ = I.Langevin(2.0, [50.0, 150.0, 300.0], 0.05)
    st = integ.init(st, I.Harmonic(k))
    temps = []
    for n in range(3000):
        st = integ.step(st, I.Harmonic(k))
        if n > 500:
            temps.append(I.temperature_K(st))
    mean = torch.stack(temps).mean(0)
    assert torch.allclose(mean, torch.tensor([50.0, 150.0, 300.0], dtype=torch.float64), rtol=0.04)


# ------------------------------------------------------------------------------ reproducibility
def _run(integ, st, f, n):
    st = integ.init(st, f)
    for _ in range(n):
        st = integ.step(st, f)
    return st


@pytest.mark.parametrize("make", [
    lambda: I.Langevin(5.0, 100.0, 0.02),
    lambda: I.Bussi(5.0, 100.0, 50.0),
    lambda: I.StochasticCellRescaling(5.0, 100.0, 100.0, 50.0, 200.0, 1e-3, "tri"),
], ids=["langevin", "bussi", "npt-tri"])
def test_same_seed_same_trajectory(make):
    a = _run(make(), argon(seed=3)[0], lj(), 20)
    b = _run(make(), argon(seed=3)[0], lj(), 20)
    c = _run(make(), argon(seed=3)[0].replace(rng=torch.Generator().manual_seed(99)), lj(), 20)
    assert torch.equal(a.positions, b.positions) and torch.equal(a.cell, b.cell)
    assert not torch.allclose(a.positions, c.positions)


@pytest.mark.parametrize("make", [
    lambda: I.VelocityVerlet(5.0),
    lambda: I.Langevin(5.0, 100.0, 0.02),
    lambda: I.NoseHooverChain(5.0, 100.0, 100.0),
    lambda: I.Bussi(5.0, 100.0, 50.0),
    lambda: I.StochasticCellRescaling(5.0, 100.0, 100.0, 50.0, 200.0, 1e-3, "iso"),
    lambda: I.StochasticCellRescaling(5.0, 100.0, 100.0, 50.0, 200.0, 1e-3, "aniso"),
], ids=["nve", "langevin", "nose-hoover", "bussi", "npt-iso", "npt-aniso"])
def test_resumed_run_continues_the_uninterrupted_one(make, tmp_path):
    """2n steps in one go, and n steps + checkpoint + load + n steps: same numbers, same logs."""
    st, _ = argon(replicas=2, seed=5)
    exact = dict(skin_A=0.0)  # a fresh neighbor list each call: no hidden state in the provider
    full = I.simulate(st.copy(), make(), lj(**exact), 24, [I.ThermoCSV(str(tmp_path / "a.csv"), 4)])
    ck = str(tmp_path / "md.ckpt")
    I.simulate(st.copy(), make(), lj(**exact), 12, [I.ThermoCSV(str(tmp_path / "b.csv"), 4)],
               checkpoint_path=ck)
    with open(tmp_path / "b.csv", "a") as fh:  # rows a crashed run wrote after the checkpoint
        fh.write("16,80,0,1,1,1,1,1,1\n")
    st2, integ2 = load_md_checkpoint(ck)
    assert st2.step == 12 and type(integ2) is type(make())
    resumed = I.simulate(st2, integ2, lj(**exact), 12, [I.ThermoCSV(str(tmp_path / "b.csv"), 4)])
    for name in ("positions", "velocities", "cell", "forces", "energy", "bath_energy"):
        assert torch.equal(getattr(full, name), getattr(resumed, name)), name
    for key, v in full.extras.items():
        assert torch.equal(v, resumed.extras[key])
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


def test_checkpoint_write_is_atomic_and_validated(tmp_path):
    st, _ = argon()
    nve = I.VelocityVerlet(2.0)
    st = nve.init(st, lj())
    path = tmp_path / "x.ckpt"
    save_md_checkpoint(str(path), st, nve)
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]  # no temporary file left
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an mlpot MD checkpoint"):
        load_md_checkpoint(str(tmp_path / "other.pt"))
    with pytest.raises(FileNotFoundError, match="no MD checkpoint"):
        load_md_checkpoint(str(tmp_path / "missing.ckpt"))


# ------------------------------------------------------------------------------ safety
class Breaks:
    """Forces of a provider, with NaN (or a huge force) from the n-th call on."""

    def __init__(self, inner, at_call, value):
        self.inner, self.at, self.value, self.calls = inner, at_call, value, 0

    def __call__(self, x, cell, stress):
        out = dict(self.inner(x, cell, stress))
        self.calls += 1
        if self.calls >= self.at:
            f = out["forces"].clone()
            f[0, 3, 1] = self.value
            out["forces"] = f
        return out


@pytest.mark.parametrize("value,match", [(float("nan"), "force nan"), (5e4, "force 5e\\+04")])
def test_bad_forces_stop_the_run_and_save_the_last_good_frame(tmp_path, value, match):
    from ase.io import read

    st, _ = argon(replicas=2)
    last = str(tmp_path / "last_good.xyz")
    f = Breaks(lj(), at_call=7, value=value)  # call 1 is init: step 6 gets the bad forces
    with pytest.raises(I.MDError, match=f"step 6 .*replica 0, atom 3: {match}.*step 5.*last_good"):
        I.simulate(st, I.Langevin(5.0, 100.0), f, 20, last_good_path=last)
    frames = read(last, index=":")
    assert len(frames) == 2 and frames[0].info["step"] == 5
    st5 = _run(I.Langevin(5.0, 100.0), argon(replicas=2)[0], lj(), 5)
    assert np.allclose(frames[1].positions, st5.positions[1].numpy(), atol=1e-6)


def test_bad_starting_structure_is_reported():
    st = I.make_state([[0, 0, 0], [0.01, 0, 0]], [40.0, 40.0], np.eye(3) * 10, True)
    with pytest.raises(I.MDError, match="starting structure"):
        I.simulate(st, I.VelocityVerlet(1.0), lj(), 5, last_good_path=None)


# ------------------------------------------------------------------------------ providers
def test_lennard_jones_matches_ase_and_reuses_its_neighbor_list():
    st, atoms = argon(replicas=2, rattle=0.1)
    f = I.LennardJones(0.0104, 3.4, 6.0, skin_A=1.0)
    out = f(st.positions, st.cell, True)
    for r in range(2):
        a = atoms.copy()
        a.positions = st.positions[r].numpy()
        a.calc = ASELennardJones(sigma=3.4, epsilon=0.0104, rc=6.0, smooth=False)
        assert out["energy"][r].item() == pytest.approx(a.get_potential_energy(), abs=1e-10)
        assert np.allclose(out["forces"][r].numpy(), a.get_forces(), atol=1e-10)
        stress = out["stress"][r].numpy()
        voigt = stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
        assert np.allclose(voigt, a.get_stress(), atol=1e-10)
    # moved and strained a little: the Verlet list is reused, and results equal a fresh list
    x = st.positions + 0.1 * torch.randn(st.positions.shape, dtype=torch.float64,
                                         generator=torch.Generator().manual_seed(0))
    cell = st.cell * 1.01
    again, fresh = f(x, cell, True), I.LennardJones(0.0104, 3.4, 6.0)(x, cell, True)
    assert f.rebuilds == 1
    for key in ("energy", "forces", "stress"):
        assert torch.allclose(again[key], fresh[key], atol=1e-12)
    f(x * 1.2, cell * 1.2, False)
    assert f.rebuilds == 2


def test_ideal_gas_stress_is_the_strain_derivative():
    v0, b = 1000.0, 0.01

    def cell_energy(h):
        return 0.5 * b * (I.state.det3(h) - v0) ** 2 / v0 + 0.1 * h[:, 0, 0] ** 2

    gas = I.IdealGas(cell_energy)
    cell = torch.tensor([[[10.5, 0.0, 0.0], [0.3, 9.8, 0.0], [0.2, -0.4, 10.1]]],
                        dtype=torch.float64)
    out = gas(torch.zeros(1, 2, 3, dtype=torch.float64), cell, True)
    eps, h = 1e-6, torch.zeros(3, 3, dtype=torch.float64)
    for a in range(3):
        for c in range(3):
            e = torch.zeros(3, 3, dtype=torch.float64)
            e[a, c] += eps / 2
            e[c, a] += eps / 2
            up = cell_energy(cell @ (torch.eye(3, dtype=torch.float64) + e))
            dn = cell_energy(cell @ (torch.eye(3, dtype=torch.float64) - e))
            h[a, c] = (up - dn) / (2 * eps)
    assert torch.allclose(out["stress"][0], h / I.state.det3(cell)[0], atol=1e-9)


class MorseModel(torch.nn.Module):
    """A stand-in for an mlpot model with the same forward signature: pairwise Morse energies
    over mlpot's neighbor list, forces and stress by autograd (displacement trick)."""

    def __init__(self, cutoff=6.0, d0=0.02, a=1.2, r0=3.8):
        super().__init__()
        self.cutoff, self.d0, self.a, self.r0 = cutoff, d0, a, r0

    def forward(self, data, compute_forces: bool = True, compute_stress: bool = False):
        pos, cell, batch = data[K.POSITIONS], data[K.CELL], data[K.BATCH]
        i, j, s = neighbor_list_batch(pos.detach(), cell.detach(), data[K.PBC], data[K.PTR],
                                      self.cutoff)
        strain = torch.zeros_like(cell, requires_grad=True)
        pos = pos.detach().requires_grad_(True)
        sym = 0.5 * (strain + strain.transpose(-1, -2))
        x = pos + torch.bmm(pos.unsqueeze(1), sym[batch]).squeeze(1)
        h = cell + cell @ sym
        r = pair_vectors(x, h, batch, i, j, s).norm(dim=-1)
        e_pair = self.d0 * ((1 - torch.exp(-self.a * (r - self.r0))) ** 2 - 1)
        e_pair = e_pair * 0.5 * (1 + torch.cos(np.pi * r / self.cutoff))
        energy = torch.zeros(cell.shape[0], dtype=pos.dtype).index_add(0, batch[i], 0.5 * e_pair)
        gpos, gstrain = torch.autograd.grad(energy.sum(), [pos, strain])
        out = {K.ENERGY: energy.detach().double(), K.FORCES: -gpos}
        if compute_stress:
            out[K.STRESS] = gstrain / I.state.det3(cell)[:, None, None]
        return out


def test_mlpot_forces_adapter_batches_replicas():
    st, atoms = argon(replicas=3, rattle=0.2)
    types = np.zeros(len(atoms), dtype=np.int64)
    f = I.MLPotForces(MorseModel(), types, pbc=(True, True, True), atomic_numbers=atoms.numbers)
    out = f(st.positions, st.cell, True)
    assert out["energy"].shape == (3,) and out["forces"].shape == st.positions.shape
    for r in range(3):  # one replica at a time gives the same numbers
        one = f(st.positions[r:r + 1], st.cell[r:r + 1], True)
        assert torch.allclose(one["forces"][0], out["forces"][r], atol=1e-12)
        assert torch.allclose(one["stress"][0], out["stress"][r], atol=1e-12)
    x = st.positions.clone()  # forces are -dE/dx (central finite difference)
    x[1, 5, 2] += 1e-5
    ep = f(x, st.cell, False)["energy"][1]
    x[1, 5, 2] -= 2e-5
    em = f(x, st.cell, False)["energy"][1]
    assert out["forces"][1, 5, 2].item() == pytest.approx(-(ep - em).item() / 2e-5, abs=1e-7)
    npt = I.StochasticCellRescaling(5.0, 100.0, 1.0, 100.0, 500.0, 1e-4)
    end = I.simulate(st, npt, f, 10)
    assert end.step == 10 and torch.isfinite(end.positions).all()


# ------------------------------------------------------------------------------ precision, device
def test_float32_runs_in_float32_and_conserves_energy():
    st, _ = argon(replicas=2, dtype=torch.float32)
    nve = I.VelocityVerlet(4.0)
    f = lj(switch_width_A=1.0)
    st = nve.init(st, f)
    h0 = nve.conserved_energy(st)
    for _ in range(200):
        st = nve.step(st, f)
    assert st.positions.dtype == torch.float32 and st.forces.dtype == torch.float32
    assert st.energy.dtype == torch.float64
    assert (nve.conserved_energy(st) - h0).abs().max() < 2e-3  # eV, 32 atoms


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    st, _ = argon(replicas=2)
    a = _run(I.VelocityVerlet(4.0), st, lj(), 20)
    b = _run(I.VelocityVerlet(4.0), st.to("cuda"), lj(), 20)
    assert b.positions.is_cuda
    assert torch.allclose(a.positions, b.positions.cpu(), atol=1e-9)
    c = _run(I.StochasticCellRescaling(4.0, 100.0, 1.0, 100.0, 200.0, 1e-3, "tri"),
             st.to("cuda"), lj(), 20)
    assert c.positions.is_cuda and torch.isfinite(c.positions).all()


# ------------------------------------------------------------------------------ reporters
def test_thermo_csv_and_progress_bar(tmp_path):
    st, _ = argon(replicas=2)
    stream = io.StringIO()
    path = str(tmp_path / "thermo.csv")
    integ = I.Bussi(5.0, 100.0, 100.0, compute_stress=True)
    end = I.simulate(st, integ, lj(), 10, [I.ThermoCSV(path, 5), I.ProgressBar(10, 5, stream)])
    rows = [line.split(",") for line in open(path).read().splitlines()]
    assert rows[0] == list(I.reporters.THERMO_COLUMNS)
    assert [r[0] for r in rows[1:]] == ["0", "0", "5", "5", "10", "10"]
    last = dict(zip(rows[0], rows[-1]))
    q = I.thermo(end, integ)
    assert float(last["temperature_K"]) == pytest.approx(q["temperature_K"][1].item(), rel=1e-8)
    assert float(last["pressure_bar"]) == pytest.approx(I.pressure_bar(end)[1].item(), rel=1e-8)
    assert float(last["volume_A3"]) == pytest.approx(end.volume()[1].item(), rel=1e-8)
    assert "step 10/10" in stream.getvalue() and "steps/s" in stream.getvalue()


@pytest.mark.parametrize("ext", ["dcd", "xtc", "h5", "traj"])
def test_trajectory_files(tmp_path, ext):
    if ext == "h5":
        pytest.importorskip("tables")
    import mdtraj

    st, _ = argon(replicas=2)
    path = str(tmp_path / f"run.{ext}")
    integ = I.StochasticCellRescaling(5.0, 100.0, 100.0, 50.0, 200.0, 1e-3)
    end = I.simulate(st, integ, lj(), 6, [I.TrajectoryReporter(path, 3, replica=None)])
    for r in range(2):
        name = str(tmp_path / f"run.r{r}.{ext}")
        if ext == "traj":
            from ase.io import read

            frames = read(name, index=":")
            assert len(frames) == 3
            assert np.allclose(frames[-1].positions, end.positions[r].numpy(), atol=1e-10)
            assert np.allclose(frames[-1].get_velocities() / units.A_PER_FS_TO_ASE_VELOCITY,
                               end.velocities[r].numpy(), atol=1e-10)
            assert frames[-1].get_potential_energy() == pytest.approx(end.energy[r].item())
            continue
        top = I.reporters.mdtraj_topology(end.atomic_numbers.numpy())
        t = mdtraj.load(name) if ext == "h5" else mdtraj.load(name, top=top)  # h5 has its own
        assert t.n_frames == 3
        atol = 0.011 if ext == "xtc" else 1e-4  # XTC keeps 0.001 nm; the others float32
        assert np.allclose(t.xyz[-1] * 10, end.positions[r].numpy(), atol=atol)  # nm -> A
        assert np.allclose(t.unitcell_volumes[-1] * 1e3, end.volume()[r].item(), rtol=1e-4)


def _frames(path):
    """Positions [F, N, 3] in Angstrom of a trajectory file."""
    import mdtraj
    from ase.io import read

    if path.endswith(".traj"):
        return np.stack([a.positions for a in read(path, index=":")])
    return mdtraj.load(path, top=I.reporters.mdtraj_topology([18] * 32)).xyz * 10.0


@pytest.mark.parametrize("ext", ["dcd", "xtc", "traj"])
def test_trajectory_is_cut_back_on_resume(tmp_path, ext):
    """A run crashed after its checkpoint at step 4 had written frames up to step 8: resuming
    from the checkpoint drops frames 6 and 8 and writes them again."""
    st, _ = argon()
    path, ck = str(tmp_path / f"run.{ext}"), str(tmp_path / "run.ckpt")
    st4 = I.simulate(st, I.Langevin(5.0, 100.0), lj(), 4, [I.TrajectoryReporter(path, 2)],
                     checkpoint_path=ck)
    first = I.simulate(st4, I.Langevin(5.0, 100.0), lj(), 4, [I.TrajectoryReporter(path, 2)])
    before = _frames(path)
    again, integ = load_md_checkpoint(ck)
    again = I.simulate(again, integ, lj(), 4, [I.TrajectoryReporter(path, 2)])
    x = _frames(path)
    assert len(x) == 5  # steps 0, 2, 4, 6, 8
    assert np.array_equal(x[:3], before[:3])  # copied as stored
    atol = 0.011 if ext == "xtc" else 2e-3
    assert np.allclose(x[-1], again.positions[0].numpy(), atol=atol)
    assert np.allclose(first.positions, again.positions, atol=1e-9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt", f"run.{ext}"]


_RESUME_CHILD = """
import os, sys
import integrators as I
from integrators.checkpoint import load_md_checkpoint

mode, thermo, traj, ckpt = sys.argv[1:5]
if mode == "csv":  # killed as the resumed run writes its first CSV line
    class Dies:
        def __init__(self, fh, *a, **k):
            pass

        def writerow(self, row):
            os._exit(9)

        writerows = writerow

    I.reporters.csv.writer = Dies
elif mode == "copy":  # killed as the first kept frame is written again
    import mdtraj.formats as F

    base = F.DCDTrajectoryFile if traj.endswith(".dcd") else F.XTCTrajectoryFile

    class Dies(base):
        def write(self, *a, **k):
            os._exit(9)

    setattr(F, base.__name__, Dies)
elif mode == "moved":  # killed right after the cut-back copy replaced the old file
    real = os.replace

    def replace(a, b):
        real(a, b)
        os._exit(9)

    os.replace = replace
state, integ = load_md_checkpoint(ckpt)
I.simulate(state, integ, I.LennardJones(0.0104, 3.4, 6.0), 4,
           [I.ThermoCSV(thermo, 2), I.TrajectoryReporter(traj, 2)], last_good_path=None)
"""


@pytest.mark.parametrize("mode,ext", [("csv", "dcd"), ("copy", "dcd"), ("copy", "xtc"),
                                      ("moved", "dcd"), ("moved", "xtc")])
def test_a_kill_during_resume_loses_no_rows_or_frames(tmp_path, mode, ext):
    """Issue 13 item 4: the resume rewrote the CSV through an unflushed buffer and the trajectory
    with force_overwrite; a kill in that window lost what was there. Killed (os._exit) in the
    resume window, the files keep every row and frame up to the checkpoint, and a second resume
    gives the files of an uninterrupted run."""
    import subprocess
    import sys

    thermo, traj, ck = (str(tmp_path / n) for n in ("t.csv", f"t.{ext}", "t.ckpt"))
    st, _ = argon()
    st4 = I.simulate(st.copy(), I.Langevin(5.0, 100.0), lj(), 4,
                     [I.ThermoCSV(thermo, 2), I.TrajectoryReporter(traj, 2)], checkpoint_path=ck)
    I.simulate(st4, I.Langevin(5.0, 100.0), lj(), 4,  # the crashed run went on to step 8
               [I.ThermoCSV(thermo, 2), I.TrajectoryReporter(traj, 2)])
    rows, frames = open(thermo).read().splitlines(), _frames(traj)
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "2", "4", "6", "8"] and len(frames) == 5
    child = tmp_path / "child.py"
    child.write_text(_RESUME_CHILD)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(child), mode, thermo, traj, ck], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 9, done.stderr  # killed where the test meant to
    kept = open(thermo).read().splitlines()
    assert kept[:4] == rows[:4]  # header and steps 0, 2, 4
    x = _frames(traj)
    assert len(x) >= 3 and np.array_equal(x[:3], frames[:3])
    again, integ = load_md_checkpoint(ck)
    I.simulate(again, integ, lj(), 4, [I.ThermoCSV(thermo, 2), I.TrajectoryReporter(traj, 2)])
    assert open(thermo).read().splitlines() == rows
    assert np.allclose(_frames(traj), frames, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["child.py", "t.csv", f"t.{ext}", "t.ckpt"])  # no temporary file left


def test_thermo_csv_resume_cuts_a_half_written_line(tmp_path):
    st, _ = argon()
    path, ck = str(tmp_path / "t.csv"), str(tmp_path / "t.ckpt")
    I.simulate(st, I.Langevin(5.0, 100.0), lj(), 4, [I.ThermoCSV(path, 2)], checkpoint_path=ck)
    whole = open(path).read()
    with open(path, "a") as fh:
        fh.write("6,30,0,0.0")  # killed in the middle of a row
    again, integ = load_md_checkpoint(ck)
    I.simulate(again, integ, lj(), 2, [I.ThermoCSV(path, 2)])
    text = open(path).read()
    assert text.startswith(whole) and text.count("\n") == whole.count("\n") + 1
    assert text.splitlines()[-1].startswith("6,30,0,") and len(text.splitlines()[-1]) > 20


# ------------------------------------------------------------------------------ command line
def test_cli_md_runs_and_resumes(tmp_path, capsys):
    atoms = bulk("Ar", "fcc", a=(4 / RHO_AR) ** (1 / 3), cubic=True).repeat(2)
    atoms.rattle(0.05, seed=1)
    xyz = str(tmp_path / "ar.xyz")
    atoms.write(xyz)
    common = ["md", "lj", xyz, "--ensemble", "npt", "--temperature", "90", "--pressure", "200",
              "--timestep", "5", "--tau-p", "200", "--compressibility", "1e-3", "--lj-cutoff", "6",
              "--thermo-every", "5", "--no-progress", "--replicas", "2", "--seed", "3"]
    a = str(tmp_path / "a.csv")
    traj = str(tmp_path / "a.xtc")
    assert md_main(common + ["--steps", "20", "--thermo", a, "--traj", traj]) == 0
    assert os.path.exists(tmp_path / "a.r1.xtc")
    b, ck = str(tmp_path / "b.csv"), str(tmp_path / "b.ckpt")
    assert md_main(common + ["--steps", "10", "--thermo", b, "--checkpoint", ck]) == 0
    assert md_main(common + ["--steps", "20", "--thermo", b, "--checkpoint", ck, "--resume"]) == 0
    assert open(a).read() == open(b).read()
    rows = open(a).read().splitlines()
    assert len(rows) == 1 + 5 * 2
    assert md_main(["md", str(tmp_path / "missing.pt"), xyz, "--no-progress"]) == 2  # bad input
    assert "no model file" in capsys.readouterr().err
    assert md_main(["md", "lj", xyz, "--timestep", "-1", "--no-progress"]) == 2
    assert "--timestep -1.0: must be a number of fs > 0" in capsys.readouterr().err


def test_cli_md_with_an_exported_mlpot_model(tmp_path):
    models = pytest.importorskip("mlpot.models")
    export = pytest.importorskip("mlpot.export")
    model = str(tmp_path / "model.pt")
    export.export(models.build_model("egnn", ["Ar"], cutoff=5.0, dtype="float64"), model)
    atoms = bulk("Ar", "fcc", a=(4 / RHO_AR) ** (1 / 3), cubic=True).repeat(2)
    xyz = str(tmp_path / "ar.xyz")
    atoms.write(xyz)
    csv = str(tmp_path / "t.csv")
    args = ["md", model, xyz, "--ensemble", "npt", "--steps", "4", "--thermo-every", "2",
            "--thermo", csv, "--no-progress", "--replicas", "2", "--timestep", "1"]
    assert md_main(args) == 0
    assert len(open(csv).read().splitlines()) == 1 + 3 * 2
