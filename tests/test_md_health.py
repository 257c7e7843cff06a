"""The MD health check (integrators.health) in simulate, mlpot md, ASE and OpenMM; mlpot md's
bad-input errors; the integrator registry and MDState.to without the checkpoint module."""
import ast
import os

import numpy as np
import pytest
import torch
from ase.build import bulk

import integrators as I
import integrators.cli as md_cli
from integrators import health as H
from integrators.checkpoint import load_md_checkpoint, save_md_checkpoint
from mlpot.errors import EXIT_BAD_INPUT, EXIT_STOPPED, RunStopped, exit_code_of

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

RHO_AR = 0.02035  # atoms/A^3, liquid argon


def argon_atoms(repeat=2):
    return bulk("Ar", "fcc", a=(4 / RHO_AR) ** (1 / 3), cubic=True).repeat(repeat)


def lattice_state(temperature, repeat=2, replicas=1, seed=0):
    """Argon on its perfect fcc lattice with Maxwell-Boltzmann velocities (NVE from here halves
    the temperature)."""
    atoms = argon_atoms(repeat)
    st = I.make_state(atoms.positions, atoms.get_masses(), atoms.cell.array, True, atoms.numbers,
                      replicas=replicas, seed=seed)
    return I.initialize_velocities(st, temperature)


def lj():
    return I.LennardJones(0.0104, 3.4, 6.0)


class Bounded:
    """A provider whose forces are clipped to +-fmax eV/A, like a learned model's bounded
    outputs: a run that explodes never reaches the --max-force limit."""

    def __init__(self, inner, fmax=2.0):
        self.inner, self.fmax = inner, fmax

    def __call__(self, x, cell, stress):
        out = dict(self.inner(x, cell, stress))
        out["forces"] = out["forces"].clamp(-self.fmax, self.fmax)
        return out


# ------------------------------------------------------------------------------ simulate
def test_normal_equilibration_never_trips_the_check():
    """NVE from a lattice start halves the temperature; a thermostat cools a start 3x too hot:
    both run to the end with the default check."""
    st = lattice_state(200.0, replicas=2)
    t0 = I.temperature_K(st)
    end = I.simulate(st, I.VelocityVerlet(5.0), lj(), 400, last_good_path=None)
    assert end.step == 400
    assert (I.temperature_K(end) < 0.75 * t0).all()  # the halving happened
    hot = lattice_state(300.0, seed=1)
    end = I.simulate(hot, I.Bussi(5.0, 100.0, 50.0), lj(), 300, last_good_path=None)
    assert I.temperature_K(end).item() < 200.0


def test_exploding_nve_with_bounded_forces_stops_with_the_last_good_frame(tmp_path):
    """The issue's case (NVE, dt = 50 fs, 1200 K): forces stay bounded, the temperature goes to
    millions of K. The check stops it within a few steps and saves the frame before."""
    from ase.io import read

    last = str(tmp_path / "last_good.xyz")
    st = lattice_state(1200.0)
    with pytest.raises(H.HealthCheckFailed, match=r"health check at step (\d+): .*last_good") as e:
        I.simulate(st.copy(), I.VelocityVerlet(50.0), Bounded(lj()), 300, last_good_path=last)
    assert isinstance(e.value, RunStopped) and exit_code_of(e.value) == EXIT_STOPPED
    assert "\n" not in str(e.value)
    failed_at = int(str(e.value).split("at step ")[1].split(":")[0])
    assert failed_at < 20
    frame = read(last)
    assert frame.info["step"] == failed_at - 1
    unchecked = I.simulate(st, I.VelocityVerlet(50.0), Bounded(lj()), 300, health=None,
                           last_good_path=None)  # what the run did without the check
    assert I.temperature_K(unchecked).item() > 1e5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_health_check_on_cuda_stops_where_the_cpu_run_stops():
    def stop_step(device):
        st = lattice_state(1200.0).to(device)
        with pytest.raises(H.HealthCheckFailed) as e:
            I.simulate(st, I.VelocityVerlet(50.0), Bounded(lj()), 300, last_good_path=None)
        return str(e.value).split(":")[0]

    assert stop_step("cuda") == stop_step("cpu")
    st = lattice_state(200.0).to("cuda")
    assert I.simulate(st, I.VelocityVerlet(5.0), lj(), 100, last_good_path=None).step == 100


def test_langevin_runaway_is_stopped():
    st = lattice_state(300.0)
    with pytest.raises(H.HealthCheckFailed):
        I.simulate(st, I.Langevin(50.0, 300.0, 0.01), Bounded(lj()), 300, last_good_path=None)


def snap(step, t, x=None, e=None, target=None, cell=None, pbc=(True, True, True)):
    x = torch.zeros(1, 4, 3, dtype=torch.float64) if x is None else x
    return H.Snapshot(step=step, positions=x,
                      cell=torch.eye(3, dtype=torch.float64)[None] * 10 if cell is None else cell,
                      pbc=torch.tensor(pbc), temperature_K=torch.tensor([float(t)],
                                                                        dtype=torch.float64),
                      conserved_eV=None if e is None else torch.tensor([float(e)],
                                                                       dtype=torch.float64),
                      target_K=None if target is None else torch.tensor([float(target)],
                                                                        dtype=torch.float64))


def test_temperature_rule_uses_start_running_mean_target_and_floor():
    nve = H.TemperatureRunaway(3.0, floor_K=50.0)
    nve.start(snap(0, 100.0))
    assert nve.check(snap(0, 100), snap(1, 290.0)) is None  # 3 x 100
    assert nve.check(snap(1, 290), snap(2, 500.0)) is None  # 3 x mean(100, 290) = 585
    assert "T = 2000 K" in nve.check(snap(2, 500), snap(3, 2000.0))
    hot = H.TemperatureRunaway(3.0)
    hot.start(snap(0, 900.0, target=300.0))  # a hot start under a thermostat
    assert hot.check(snap(0, 900), snap(1, 2600.0, target=300.0)) is None
    assert hot.check(snap(1, 900), snap(2, 2800.0, target=300.0)) is not None
    cold = H.TemperatureRunaway(3.0, floor_K=50.0)
    cold.start(snap(0, 0.0))  # zero velocities: the floor, not 0 K, is the reference
    assert cold.check(snap(0, 0), snap(1, 140.0)) is None
    assert cold.check(snap(1, 140), snap(2, float("nan"))) is not None
    with pytest.raises(ValueError, match="ratio must be"):
        H.TemperatureRunaway(1.0)


def test_drift_and_displacement_rules():
    drift = H.EnergyDrift(0.1)
    drift.start(snap(0, 100, e=-10.0))
    assert drift.check(snap(0, 100), snap(1, 100, e=-9.7)) is None  # 0.075 eV/atom
    assert "0.125 eV/atom" in drift.check(snap(0, 100), snap(1, 100, e=-9.5))
    jump = H.MaxDisplacement(1.0)
    x0 = torch.zeros(1, 4, 3, dtype=torch.float64)
    x0[0, 2, 0] = 9.9
    wrapped = x0.clone()
    wrapped[0, 2, 0] = 0.1  # across the periodic boundary: 0.2 A
    assert jump.check(snap(0, 1, x0), snap(1, 1, wrapped)) is None
    moved = x0.clone()
    moved[0, 1, 1] = 1.5
    assert "atom 1 of replica 0 moved 1.5 A in one step" in jump.check(snap(0, 1, x0),
                                                                       snap(1, 1, moved))
    assert jump.check(snap(0, 1, x0), snap(2, 1, moved)) is None  # 2 steps: 2 A allowed
    molecule = dict(cell=torch.zeros(1, 3, 3, dtype=torch.float64), pbc=(False,) * 3)
    assert jump.check(snap(0, 1, x0, **molecule), snap(1, 1, wrapped, **molecule)) is not None


# ------------------------------------------------------------------------------ mlpot md
def _xyz(tmp_path, atoms=None):
    path = str(tmp_path / "start.xyz")
    (argon_atoms(3) if atoms is None else atoms).write(path)
    return path


def _bounded_lj(monkeypatch):
    monkeypatch.setattr(md_cli, "_forces",
                        lambda args, atoms, device: (Bounded(lj()), torch.float64))


def test_md_cli_exploding_run_exits_3_with_one_line(tmp_path, capsys, monkeypatch):
    _bounded_lj(monkeypatch)
    thermo = str(tmp_path / "t.csv")
    args = ["md", "lj", _xyz(tmp_path), "--ensemble", "nve", "--timestep", "50",
            "--temperature", "1200", "--steps", "300", "--no-progress", "--thermo", thermo]
    assert md_cli.main(args) == EXIT_STOPPED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlpot md: stopped: MD stopped by the health")
    last = str(tmp_path / "t_last_good.xyz")
    assert last in err[0] and os.path.exists(last)
    assert md_cli.main(args + ["--no-health-check"]) == 0  # the old behaviour: "success"
    capsys.readouterr()
    # thresholds from the options: a huge drift tolerance and ratio leave the displacement rule
    assert md_cli.main(args + ["--max-drift", "1e9", "--max-temperature-ratio", "1e9"]) == 3
    assert "moved" in capsys.readouterr().err


@pytest.mark.parametrize("extra,match", [
    (["--replicas", "0"], "--replicas 0: must be a whole number >= 1"),
    (["--steps", "-10"], "--steps -10: must be a whole number >= 0"),
    (["--timestep", "0"], "--timestep 0.0: must be a number of fs > 0"),
    (["--temperature", "-5"], "--temperature -5.0: must be a number of K >= 0"),
    (["--tau-t", "nan"], "--tau-t nan: must be"),
    (["--thermo-every", "0"], "--thermo-every 0: must be"),
    (["--max-drift", "0"], "--max-drift 0.0: must be"),
    (["--frame", "3"], "--frame 3: .* has 1 frame"),
    (["--frame", "-2"], "--frame -2: .* has 1 frame"),
    (["--resume", "--checkpoint", "nothing.ckpt"], "--resume needs an existing --checkpoint"),
    (["--device", "gpu"], "--device gpu: not a device"),
    (["--device", "cuda:99"], "--device cuda:99: (no CUDA GPU|only \\d+ CUDA device)"),
])
def test_md_cli_bad_values_are_one_line_with_exit_2(tmp_path, capsys, extra, match):
    import re

    thermo = str(tmp_path / "t.csv")
    rc = md_cli.main(["md", "lj", _xyz(tmp_path), "--no-progress", "--steps", "2",
                      "--thermo", thermo] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == EXIT_BAD_INPUT and len(err) == 1
    assert re.search(match, err[0]), err[0]
    assert not os.path.exists(thermo)  # nothing ran


def test_md_cli_bad_files_are_one_line_with_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.xyz"
    empty.write_text("")
    garbage = tmp_path / "garbage.xyz"
    garbage.write_text("not a structure\n")
    not_ckpt = tmp_path / "x.ckpt"
    not_ckpt.write_text("hello")
    for argv, match in [
        (["md", "lj", str(empty)], "is empty"),
        (["md", "lj", str(garbage)], "cannot read"),
        (["md", "lj", str(tmp_path / "missing.xyz")], "no structure file"),
        (["md", str(tmp_path / "m.pt"), _xyz(tmp_path)], "no model file"),
        (["md", "lj", _xyz(tmp_path), "--resume", "--checkpoint", str(not_ckpt)],
         "not an mlpot MD checkpoint"),
    ]:
        assert md_cli.main(argv + ["--no-progress", "--thermo", str(tmp_path / "t.csv")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err


def test_overlapping_atoms_give_a_one_line_warning(tmp_path, capsys, monkeypatch):
    atoms = argon_atoms(2)
    atoms.positions[1] = atoms.positions[0] + [0.3, 0.0, 0.0]
    st = I.make_state(atoms.positions, atoms.get_masses(), atoms.cell.array, True)
    with pytest.warns(I.MDWarning, match="atoms 0 and 1 of replica 0 are 0.3 A apart"):
        I.simulate(st, I.VelocityVerlet(1.0), I.Harmonic(1.0, st.positions[0]), 2,
                   health=None, last_good_path=None)
    monkeypatch.setattr(md_cli, "_forces", lambda args, atoms, device: (
        I.Harmonic(1.0, torch.as_tensor(atoms.positions)), torch.float64))
    assert md_cli.main(["md", "lj", _xyz(tmp_path, atoms), "--steps", "2", "--no-progress",
                        "--thermo", str(tmp_path / "t.csv"), "--temperature", "10"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "warning" in line] == [
        "mlpot md: warning: atoms 0 and 1 of replica 0 are 0.3 A apart (closer than 0.5 A): "
        "overlapping atoms usually mean a wrong structure or units"]


# ------------------------------------------------------------------------------ ASE, OpenMM
def _ase_run(dt_fs, thermostat, tmp_path, steps=200):
    from ase import units
    from ase.calculators.lj import LennardJones
    from ase.md.langevin import Langevin
    from ase.md.verlet import VelocityVerlet

    atoms = argon_atoms(2)
    atoms.calc = LennardJones(epsilon=0.0104, sigma=3.4, rc=6.0, smooth=True)
    rng = np.random.default_rng(0)
    masses = atoms.get_masses()[:, None]
    atoms.set_momenta(rng.normal(0, 1, (len(atoms), 3)) * np.sqrt(masses * units.kB * 100.0))
    dyn = (Langevin(atoms, dt_fs * units.fs, temperature_K=100, friction=0.01, rng=rng,
                    fixcm=False)
           if thermostat else VelocityVerlet(atoms, dt_fs * units.fs))
    last = str(tmp_path / "ase_last_good.xyz")
    check = I.HealthCheck.for_ase(atoms, dyn, last_good_path=last)
    assert check.target == (pytest.approx(100.0, rel=1e-3) if thermostat else None)
    dyn.attach(check, interval=1)
    dyn.run(steps)
    return atoms, last


@pytest.mark.parametrize("thermostat", [False, True], ids=["nve", "langevin"])
def test_ase_observer_passes_sane_runs_and_stops_blow_ups(tmp_path, thermostat):
    from ase.io import read

    _ase_run(5.0, thermostat, tmp_path)
    with pytest.raises(I.HealthCheckFailed, match="health check at step") as e:
        _ase_run(300.0, thermostat, tmp_path)
    assert isinstance(e.value, RunStopped)
    good = read(str(tmp_path / "ase_last_good.xyz"))
    assert good.info["step"] == int(str(e.value).split("at step ")[1].split(":")[0]) - 1


def _openmm_run(dt_fs, thermostat, tmp_path, steps=200):
    openmm = pytest.importorskip("openmm")
    from openmm import app, unit

    atoms = argon_atoms(3)  # the cutoff must be under half the box
    system = openmm.System()
    nb = openmm.NonbondedForce()
    nb.setNonbondedMethod(openmm.NonbondedForce.CutoffPeriodic)
    nb.setCutoffDistance(0.55)
    top = app.Topology()
    chain = top.addChain()
    for _ in atoms:
        system.addParticle(39.948)
        nb.addParticle(0.0, 0.34, 0.0104 * 96.485)  # sigma nm, epsilon kJ/mol
        top.addAtom("Ar", app.element.argon, top.addResidue("Ar", chain))
    system.addForce(nb)
    box = atoms.cell.array / 10.0
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box])
    top.setPeriodicBoxVectors(box)
    integ = (openmm.LangevinMiddleIntegrator(100 * unit.kelvin, 1 / unit.picosecond,
                                             dt_fs * unit.femtosecond)
             if thermostat else openmm.VerletIntegrator(dt_fs * unit.femtosecond))
    if thermostat:
        integ.setRandomNumberSeed(1)  # 0 draws another seed per run: the blow-up's step varied
    sim = app.Simulation(top, system, integ, openmm.Platform.getPlatformByName("Reference"))
    sim.context.setPositions(atoms.positions / 10.0)
    sim.context.setVelocitiesToTemperature(100 * unit.kelvin, 1)
    last = str(tmp_path / "omm_last_good.xyz")
    reporter = I.HealthCheck.for_openmm(sim, 5, last_good_path=last)
    assert reporter.target == (pytest.approx(100.0) if thermostat else None)
    sim.reporters.append(reporter)
    sim.step(steps)
    return sim, last


@pytest.mark.parametrize("thermostat", [False, True], ids=["nve", "langevin"])
def test_openmm_reporter_passes_sane_runs_and_stops_blow_ups(tmp_path, thermostat):
    from ase.io import read

    sim, _ = _openmm_run(5.0, thermostat, tmp_path)
    assert sim.currentStep == 200
    with pytest.raises(I.HealthCheckFailed, match="health check at step 5: ") as e:
        _openmm_run(150.0, thermostat, tmp_path)
    assert isinstance(e.value, RunStopped)
    good = read(str(tmp_path / "omm_last_good.xyz"))
    assert good.info["step"] == 0 and len(good) == 108
    assert np.allclose(good.positions, argon_atoms(3).positions, atol=1e-4)


# ------------------------------------------------------------------------------ structure
def test_checkpoint_module_imports_no_integrator_and_state_no_checkpoint():
    """The loop of issue 14: state.py imported checkpoint.py, which imported every integrator."""
    folder = os.path.dirname(I.__file__)

    def imported(name):
        tree = ast.parse(open(os.path.join(folder, name)).read())
        out = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                out.add(node.module or "")
        return out

    integrators = {"nve", "langevin", "bussi", "nose_hoover", "npt"}
    assert not integrators & imported("checkpoint.py")
    assert "checkpoint" not in imported("state.py")


def test_a_new_integrator_is_registered_and_read_back_from_a_checkpoint(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class TestOnlyVerlet(I.VelocityVerlet):
        pass

    assert I.REGISTRY["TestOnlyVerlet"] is TestOnlyVerlet
    st = lattice_state(50.0)
    integ = TestOnlyVerlet(2.0)
    path = str(tmp_path / "md.ckpt")
    save_md_checkpoint(path, integ.init(st, lj()), integ)
    _, back = load_md_checkpoint(path)
    assert type(back) is TestOnlyVerlet and back.timestep_fs == 2.0


def test_state_to_moves_tensors_directly(monkeypatch):
    import integrators.checkpoint as ck

    def no(*a, **k):
        raise AssertionError("MDState.to went through the checkpoint format")

    monkeypatch.setattr(ck, "state_to_dict", no)
    monkeypatch.setattr(ck, "state_from_dict", no)
    st = I.Langevin(1.0, 100.0).init(lattice_state(50.0), lj())
    moved = st.to(dtype=torch.float32)
    assert moved.positions.dtype == torch.float32 and moved.energy.dtype == torch.float64
    assert torch.equal(moved.positions, st.positions.float())
    assert torch.equal(moved.rng.get_state(), st.rng.get_state())  # same stream, own generator
    assert moved.rng is not st.rng


def test_stale_checkpoint_temporaries_are_removed_at_start(tmp_path):
    ckpt = tmp_path / "md.ckpt"
    stale = tmp_path / ".md.ckpt.k1ll3d.tmp"  # what a kill -9 during atomic_write leaves
    other = tmp_path / ".other.ckpt.abc.tmp"
    stale.write_bytes(b"half")
    other.write_bytes(b"not ours")
    I.simulate(lattice_state(50.0), I.VelocityVerlet(2.0), lj(), 2, checkpoint_path=str(ckpt),
               last_good_path=None)
    assert ckpt.exists() and not stale.exists() and other.exists()
