"""integrators.stability: the one definition of a stable MD run (blow-up rule, NVE drift, the
batched NVT survival run), on analytic potentials (fast)."""
import math
import re

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

import integrators as I
from integrators.stability import _select

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def copper_lj():
    """32 Cu atoms (fcc, periodic) with a smooth Lennard-Jones of copper's size and depth."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    return atoms, I.LennardJones(0.4, 2.338, 5.0, skin_A=0.5, switch_width_A=1.0)


def ethanol():
    return molecule("CH3CH2OH")


# ------------------------------------------------------------------------------ the rule
def test_bonds_come_from_covalent_radii_of_the_start():
    m = ethanol()
    bonds = I.bonds_from_structure(m.numbers, m.positions)
    # C-C, C-O, O-H and five C-H: 8 bonds; no H-H, no C...H across the molecule
    assert bonds.shape == (8, 2)
    sym = m.get_chemical_symbols()
    kinds = sorted("".join(sorted(sym[i] + sym[j])) for i, j in bonds.tolist())
    assert kinds == ["CC", "CH", "CH", "CH", "CH", "CH", "CO", "HO"]
    assert bool((bonds[:, 0] < bonds[:, 1]).all())
    # a crystal is not molecular: its rule has no bonds
    assert I.BlowupRule.for_structure(bulk("Si"), molecular=False).bonds is None


def test_a_stretched_bond_is_flagged_and_a_long_but_unbroken_one_is_not():
    m = ethanol()
    bonds = I.BlowupRule.for_structure(m).bonds
    c, o = 1, 2  # CH3-CH2-OH: atom 1 is the C bound to the O (atom 2)
    assert [c, o] in bonds.tolist()
    x = m.positions.copy()
    u = (x[o] - x[c]) / np.linalg.norm(x[o] - x[c])
    x[o] = x[c] + 1.95 * u  # stretched from 1.43 to 1.95 A: still a bond
    assert I.blowup_reason(x, bonds=bonds) is None
    x[o] = x[c] + 2.1 * u
    why = I.blowup_reason(x, bonds=bonds)
    assert why.kind == "bond" and f"bond {c}-{o}" in why.message and "2.1 A" in why.message
    assert I.blowup_reason(x, bonds=bonds, max_bond_A=2.2) is None
    assert I.blowup_reason(x) is None  # without bonds only forces and distances count


def test_close_atoms_across_the_periodic_boundary_are_flagged():
    cell = np.eye(3) * 6.0
    x = np.array([[0.1, 3.0, 3.0], [5.7, 3.0, 3.0], [3.0, 3.0, 3.0]])  # 0.4 A through x = 0
    why = I.blowup_reason(x, cell=cell, pbc=True)
    assert why.kind == "distance" and "atoms 0 and 1" in why.message and "0.4 A" in why.message
    assert I.blowup_reason(x, cell=cell, pbc=False) is None  # 5.6 A apart without images
    assert I.blowup_reason(x, cell=cell, pbc=True, min_distance_A=0.3) is None


def test_large_and_non_finite_forces_are_flagged():
    x = ethanol().positions
    f = np.zeros_like(x)
    f[4] = [0.0, 40.0, 0.0]
    assert I.blowup_reason(x, f) is None
    f[4] = [30.0, 40.0, 0.0]  # |F| = 50: at the limit, not above it
    assert I.blowup_reason(x, f) is None
    f[4] = [30.0, 40.1, 0.0]
    why = I.blowup_reason(x, f)
    assert why.kind == "force" and "atom 4" in why.message
    assert I.blowup_reason(x, f, max_force_eV_per_A=60.0) is None
    f[4] = [math.nan, 0.0, 0.0]
    assert "not finite" in I.blowup_reason(x, f).message
    assert "energy is not finite" in I.blowup_reason(x, np.zeros_like(x),
                                                     energy=math.inf).message
    with pytest.raises(ValueError, match="min_distance_A must be a finite number > 0"):
        I.BlowupRule(min_distance_A=0.0)


# ------------------------------------------------------------------------------ NVE drift
def test_drift_is_the_absolute_polyfit_slope_after_the_warm_up():
    rng = np.random.default_rng(0)
    t = np.arange(0, 5.0, 0.01)  # ps
    n_atoms = 27
    # a fast initial relaxation (ignored), then a slope of -0.27 meV/atom/ps, plus noise
    e = -100.0 - 0.05 * np.exp(-t / 0.1) - 0.27e-3 * n_atoms * t + rng.normal(0, 2e-3, t.size)
    after = t >= 1.0
    expected = abs(np.polyfit(t[after], e[after] / n_atoms * 1000.0, 1)[0])
    got = I.nve_drift(t, e, n_atoms, warmup_ps=1.0)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-10)
    assert got == pytest.approx(0.27, abs=0.02)
    # several replicas at once; the warm-up changes the answer
    both = I.nve_drift(t, np.stack([e, -e], axis=1), n_atoms)
    assert both == pytest.approx([expected, expected], rel=1e-10)
    assert I.nve_drift(t, e, n_atoms, warmup_ps=0.0) != pytest.approx(expected, rel=1e-3)
    with pytest.raises(ValueError, match="fewer than two distinct times after the 1 ps"):
        I.nve_drift(t[:50], e[:50], n_atoms)
    with pytest.raises(ValueError, match="500 times but conserved energies"):
        I.nve_drift(t, e[:-1], n_atoms)


# ------------------------------------------------------------------------------ the runs
def test_a_huge_timestep_blows_up_every_replica_with_its_reason():
    atoms, lj = copper_lj()
    run = I.run_nvt(lj, I.state_from_ase(atoms), 300.0, time_ps=4.0, timestep_fs=40.0,
                    replicas=3, check_every=5, seed=1)
    assert run.survived == 0 and run.survived_fraction == 0.0
    assert run.steps_done < run.steps  # the run ends when no replica is left
    for k, o in enumerate(run.outcomes):
        assert o.replica == k and not o.survived
        assert o.kind == "force" and "eV/A" in o.reason and f"replica {k}:" in o.reason
        assert 0 < o.time_ps <= run.steps_done * 0.04 + 1e-9
    nve = I.run_nve(lj, I.state_from_ase(atoms), 300.0, time_ps=4.0, timestep_fs=40.0,
                    replicas=2, warmup_ps=0.1)
    assert nve.survived == 0 and nve.drift_meV_per_atom_ps == [None, None]


def test_a_small_timestep_is_stable_and_conserves_energy():
    atoms, lj = copper_lj()
    run = I.run_nvt(lj, I.state_from_ase(atoms), 300.0, time_ps=0.3, timestep_fs=2.0,
                    replicas=3, check_every=5, seed=1)
    assert run.survived == 3 and run.steps_done == run.steps == 150
    assert all(o.time_ps is None and o.kind is None for o in run.outcomes)
    assert run.conserved_eV.shape == (150 // 100 + 1, 3) and np.isfinite(run.conserved_eV).all()
    nve = I.run_nve(lj, I.state_from_ase(atoms), 300.0, time_ps=0.5, timestep_fs=1.0,
                    replicas=2, warmup_ps=0.1, sample_every=5)
    assert nve.survived == 2
    assert nve.times_ps.shape == (101,) and nve.times_ps[-1] == pytest.approx(0.5)
    drift = nve.drift_meV_per_atom_ps
    assert all(0 <= d < 0.5 for d in drift)  # a smooth potential at 1 fs drifts very little
    assert drift[0] == pytest.approx(I.nve_drift(nve.times_ps, nve.conserved_eV[:, 0], 32, 0.1))
    # the conserved energy moves far more with a timestep close to blowing up
    rough = I.run_nve(lj, I.state_from_ase(atoms), 300.0, time_ps=0.5, timestep_fs=8.0,
                      replicas=2, warmup_ps=0.1, sample_every=1)
    spread = np.ptp(rough.conserved_eV, axis=0)
    assert (spread > 10 * np.ptp(nve.conserved_eV, axis=0)).all()


class PushedOxygen:
    """Atoms on springs at their start (2 eV/A^2); the O (atom 2) is also pushed by 5 eV/A
    along +x once it is 0.2 A beyond its start, which takes it about 2.5 A away: a bond breaks
    only in a replica that starts past the edge. The same function for every replica."""

    def __init__(self, x0):
        self.springs = I.Harmonic(2.0, center=x0)
        self.edge = float(x0[2, 0]) + 0.2

    def __call__(self, positions, cell, compute_stress):
        out = self.springs(positions, cell, compute_stress)
        past = (positions[:, 2, 0] > self.edge).to(positions.dtype)  # [R]
        out["forces"] = out["forces"].clone()
        out["forces"][:, 2, 0] += 5.0 * past
        return out


def test_a_replica_that_breaks_a_bond_leaves_the_batch_and_the_others_go_on():
    m = ethanol()
    rule = I.BlowupRule.for_structure(m)
    pushed = m.copy()
    pushed.positions[2, 0] += 0.3  # past the edge, all bonds still shorter than 2 A
    assert I.blowup_reason(pushed.positions, bonds=rule.bonds) is None
    state = I.state_from_ase([m, pushed])
    run = I.run_nvt(PushedOxygen(m.positions), state, 50.0, time_ps=0.2, timestep_fs=0.5,
                    rule=rule, replicas=None, check_every=4, sample_every=20)
    good, bad = run.outcomes
    assert good.survived and run.steps_done == run.steps == 400
    assert not bad.survived and bad.kind == "bond" and "replica 1:" in bad.reason
    assert re.search(r"the bond (2-\d+|\d+-2) is 2\.\d+ A long", bad.reason), bad.reason
    steps = round(bad.time_ps / 0.0005)
    assert steps % 4 == 0 and f"(step {steps})" in bad.reason  # found at a geometry check
    # replica 1's conserved energy is recorded until it left, replica 0's to the end
    assert np.isfinite(run.conserved_eV[:, 0]).all()
    assert np.isnan(run.conserved_eV[-1, 1]) and np.isfinite(run.conserved_eV[0, 1])


def test_a_starting_structure_that_has_blown_up_is_one_clear_error():
    m = ethanol()
    m.positions[3] = m.positions[2] + [0.3, 0.0, 0.0]
    springs = I.Harmonic(1.0, center=m.positions)
    with pytest.raises(I.MDInputError, match="starting structure already fails the blow-up "
                                             "rule .*atoms 2 and 3 are 0.3 A apart"):
        I.run_nvt(springs, I.state_from_ase(m), 300.0, 0.01)
    with pytest.raises(ValueError, match="thermostat must be one of langevin, bussi"):
        I.run_nvt(springs, I.state_from_ase(m), 300.0, 0.01, thermostat="berendsen")
    with pytest.raises(ValueError, match="run time must be a finite number > 0 ps"):
        I.run_nve(springs, I.state_from_ase(m), 300.0, 0.0)


def test_bussi_runs_and_select_keeps_per_replica_tensors():
    atoms, lj = copper_lj()
    run = I.run_nvt(lj, I.state_from_ase(atoms), 300.0, time_ps=0.05, timestep_fs=2.0,
                    replicas=2, thermostat="bussi", tau_fs=20.0)
    assert run.survived == 2 and run.ensemble == "nvt-bussi"
    st = I.NoseHooverChain(1.0, 300.0).init(
        I.initialize_velocities(I.state_from_ase(atoms, replicas=3), 300.0), lj)
    sub = _select(st, torch.tensor([2, 0]))
    assert sub.n_replicas == 2 and sub.extras["nhc_vel"].shape[0] == 2
    assert torch.equal(sub.positions[0], st.positions[2])
    assert torch.equal(sub.energy, st.energy[[2, 0]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_runs_work_on_cuda_with_replicas_leaving_the_batch():
    m = ethanol()
    rule = I.BlowupRule.for_structure(m)
    pushed = m.copy()
    pushed.positions[2, 0] += 0.3
    state = I.state_from_ase([m, pushed], device="cuda")
    run = I.run_nvt(PushedOxygen(torch.as_tensor(m.positions, device="cuda")), state, 50.0,
                    time_ps=0.2, timestep_fs=0.5, rule=rule, replicas=None, check_every=4)
    assert [o.survived for o in run.outcomes] == [True, False]
    assert run.outcomes[1].kind == "bond"
    atoms, lj = copper_lj()
    nve = I.run_nve(lj, I.state_from_ase(atoms, device="cuda"), 300.0, time_ps=0.2,
                    timestep_fs=1.0, replicas=2, warmup_ps=0.05)
    assert nve.survived == 2 and all(d < 0.5 for d in nve.drift_meV_per_atom_ps)
