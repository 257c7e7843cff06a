"""A committee's uncertainty in every engine (issue 16, item 4): the ASE calculator's results,
integrators' MDState.outputs, the thermo CSV, model_devi.out, --stop-uncertainty (one replica,
several, all) and OpenMM's UncertaintyReporter report the same deviations for the same structure,
equal to the model's own outputs and to mlpot.uncertainty.model_deviation of the members."""
import csv

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.io import read

import integrators as I
import integrators.cli as md_cli
import mlpot
from integrators import health as H
from integrators.reporters import ModelDeviFile, Reporter
from mlpot import keys as K
from mlpot.ase import MLPotCalculator
from mlpot.errors import EXIT_BAD_INPUT, EXIT_STOPPED
from mlpot.inputs import structure_inputs
from mlpot.models import build_model
from mlpot.models.committee import Committee
from mlpot.uncertainty import model_deviation

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _member(seed):
    torch.manual_seed(seed)
    return build_model("egnn", ["Si"], cutoff=3.0, dtype="float64", hidden=8, edge_hidden=8,
                       num_layers=1, readout_hidden=8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An exported committee of three untrained EGNNs (float64), a single model and a
    rattled 8-atom Si cell."""
    folder = tmp_path_factory.mktemp("committee")
    committee = mlpot.export(Committee([_member(s) for s in range(3)], calibration=2.0),
                             str(folder / "committee.pt"))
    single = mlpot.export(_member(7), str(folder / "single.pt"))
    atoms = bulk("Si", cubic=True)
    atoms.rattle(0.15, seed=3)
    xyz = str(folder / "si.xyz")
    atoms.write(xyz)
    return committee, single, xyz


def _reference(model, atoms, stress=True):
    """The model's own outputs for ``atoms`` and the deviation of its members recomputed by
    mlpot.uncertainty (numpy arrays)."""
    data = structure_inputs(torch.tensor(atoms.positions), model.atom_types(atoms.numbers),
                            torch.tensor(atoms.cell.array), torch.tensor([True] * 3))
    out = model(data, True, stress)
    n = len(atoms)
    dev = model_deviation(out[K.ENERGY_MEMBERS], out[K.FORCES_MEMBERS],
                          torch.zeros(n, dtype=torch.long), torch.tensor([n]),
                          out[K.VIRIAL_MEMBERS] if stress else None)
    return ({k: v.detach().numpy() for k, v in out.items()},
            {k: v.detach().numpy() for k, v in dev.items()})


def test_ase_integrators_and_openmm_report_the_same_deviation(files):
    committee, _, xyz = files
    model = mlpot.load(committee)
    assert model.committee == 3
    atoms = read(xyz)
    out, dev = _reference(model, atoms)
    assert dev[K.MAX_FORCE_DEV][0] > 1e-4  # a real disagreement, not a symmetric zero
    for k in dev:  # the model's own deviation is DeePMD's definition of its members
        np.testing.assert_allclose(out[k], dev[k], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(out[K.MAX_FORCE_DEV + K.CALIBRATED_SUFFIX],
                               2.0 * dev[K.MAX_FORCE_DEV], rtol=1e-12)

    # ASE: the mean stays the energy/forces, the committee's values ride along in results
    calc = MLPotCalculator(model)
    atoms.calc = calc
    forces = atoms.get_forces()
    atoms.get_stress()
    r = calc.results
    np.testing.assert_allclose(forces, out[K.FORCES], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(forces, out[K.FORCES_MEMBERS].mean(0), rtol=1e-10, atol=1e-12)
    assert isinstance(r["max_force_dev"], float) and isinstance(r["energy_dev"], float)
    for k in (K.MAX_FORCE_DEV, K.ENERGY_DEV, K.VIRIAL_DEV):
        assert r[k] == pytest.approx(float(dev[k][0]), rel=1e-10)
        assert r[k + K.CALIBRATED_SUFFIX] == pytest.approx(2.0 * float(dev[k][0]), rel=1e-10)
    np.testing.assert_allclose(r["forces_dev"], dev[K.FORCES_DEV], rtol=1e-10)
    assert r["energy_members"].shape == (3,) and r["forces_members"].shape == (3, 8, 3)
    np.testing.assert_allclose(r["energy_members"], out[K.ENERGY_MEMBERS][:, 0], rtol=1e-12)
    np.testing.assert_allclose(r["forces_members"], out[K.FORCES_MEMBERS], rtol=1e-12)

    # integrators: the provider's outputs land in MDState.outputs, per replica
    st = I.state_from_ase(atoms, replicas=2, dtype=torch.float64)
    provider = I.MLPotForces(model, model.atom_types(atoms.numbers), atomic_numbers=atoms.numbers)
    st = I.VelocityVerlet(1.0, compute_stress=True).init(st, provider)
    for k in (K.MAX_FORCE_DEV, K.ENERGY_DEV, K.VIRIAL_DEV):
        np.testing.assert_allclose(st.outputs[k].numpy(), np.repeat(dev[k], 2), rtol=1e-10)
    np.testing.assert_allclose(st.outputs[K.FORCES_DEV][1].numpy(), dev[K.FORCES_DEV], rtol=1e-10)

    # OpenMM: the reporter on the positions of an OpenMM state (nm), the box as the cell
    openmm = pytest.importorskip("openmm")
    from openmm import app, unit

    from mlpot.openmm import UncertaintyReporter, topology_from_ase

    sim = _openmm_simulation(atoms, openmm, app, unit, topology_from_ase)
    rep = UncertaintyReporter(committee, None, str(xyz) + ".csv", interval=5)
    rep.report(sim, sim.context.getState(getPositions=True))
    rep.close()
    for k in (K.MAX_FORCE_DEV, K.ENERGY_DEV, K.VIRIAL_DEV):
        assert float(rep.last[k]) == pytest.approx(float(dev[k][0]), rel=1e-8)
    np.testing.assert_allclose(rep.last[K.FORCES_DEV], dev[K.FORCES_DEV], rtol=1e-8)
    with open(str(xyz) + ".csv") as fh:
        rows = list(csv.DictReader(fh))
    assert float(rows[0]["max_force_dev"]) == pytest.approx(float(dev[K.MAX_FORCE_DEV][0]),
                                                             rel=1e-8)


def _openmm_simulation(atoms, openmm, app, unit, topology_from_ase):
    """A periodic System of free particles (a NonbondedForce without charges or epsilon makes
    it periodic; the reporter evaluates the committee itself, whatever the forces)."""
    top = topology_from_ase(atoms)
    system = openmm.System()
    nb = openmm.NonbondedForce()
    nb.setNonbondedMethod(openmm.NonbondedForce.CutoffPeriodic)
    nb.setCutoffDistance(0.25)
    for m in atoms.get_masses():
        system.addParticle(m)
        nb.addParticle(0.0, 0.1, 0.0)
    system.addForce(nb)
    box = atoms.cell.array * 0.1
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box])
    sim = app.Simulation(top, system, openmm.VerletIntegrator(0.001 * unit.picosecond),
                         openmm.Platform.getPlatformByName("Reference"))
    sim.context.setPositions(atoms.positions * 0.1 * unit.nanometer)
    sim.context.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box])
    return sim


class Capture(Reporter):
    """Keeps the committee's members at every report (numpy), for the checks below."""

    def __init__(self, interval):
        super().__init__(interval)
        self.seen = []

    def report(self, state, integrator):
        self.seen.append((state.step, {k: state.outputs[k].numpy().copy() for k in
                                       (K.FORCES_MEMBERS, K.ENERGY_MEMBERS, K.VIRIAL_MEMBERS)}))


def test_thermo_columns_and_model_devi_equal_a_numpy_computation(files, tmp_path):
    committee, _, xyz = files
    model = mlpot.load(committee)
    atoms = read(xyz)
    st = I.initialize_velocities(I.state_from_ase(atoms, replicas=2, dtype=torch.float64,
                                                  seed=1), 600.0)
    provider = I.MLPotForces(model, model.atom_types(atoms.numbers), atomic_numbers=atoms.numbers)
    thermo, devi = str(tmp_path / "thermo.csv"), str(tmp_path / "model_devi.out")
    cap = Capture(4)
    I.simulate(st, I.Langevin(1.0, 600.0, 0.01, compute_stress=True), provider, 12,
               [I.ThermoCSV(thermo, 4), ModelDeviFile(devi, 4), cap], last_good_path=None)
    n = len(atoms)
    expected = {}
    for step, m in cap.seen:
        f, e, v = m[K.FORCES_MEMBERS], m[K.ENERGY_MEMBERS], m[K.VIRIAL_MEMBERS]
        for r in range(2):  # DeePMD-kit's definitions, population std (numpy's default)
            fdev = np.linalg.norm(np.std(f[r], axis=0), axis=-1)
            vdev = np.std(v[r], axis=0).reshape(9) / n
            expected[step, r] = [vdev.max(), vdev.min(), vdev.mean(), fdev.max(), fdev.min(),
                                 fdev.mean(), np.std(e[r]) / n]
    assert sorted({s for s, _ in expected}) == [0, 4, 8, 12]
    for r in range(2):
        with open(str(tmp_path / f"model_devi.r{r}.out")) as fh:
            lines = fh.read().splitlines()
        assert lines[0].split() == ["#", "step", "max_devi_v", "min_devi_v", "avg_devi_v",
                                    "max_devi_f", "min_devi_f", "avg_devi_f", "devi_e"]
        table = np.loadtxt(lines[1:], ndmin=2)
        assert table[:, 0].tolist() == [0, 4, 8, 12]
        for row in table:
            np.testing.assert_allclose(row[1:], expected[int(row[0]), r], rtol=1e-5)
    with open(thermo) as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[-3:] == ["max_force_dev", "energy_dev", "virial_dev"]
    assert len(rows) == 8
    for row in rows:
        want = expected[int(row["step"]), int(row["replica"])]
        assert float(row["max_force_dev"]) == pytest.approx(want[3], rel=1e-8)
        assert float(row["energy_dev"]) == pytest.approx(want[6], rel=1e-8)
        assert float(row["virial_dev"]) == pytest.approx(want[0], rel=1e-8)


def test_stop_uncertainty_exits_3_and_saves_the_structure_that_crossed(files, tmp_path, capsys):
    committee, _, xyz = files
    model = mlpot.load(committee)
    _, dev = _reference(model, read(xyz))
    start = float(dev[K.MAX_FORCE_DEV][0])
    thermo = str(tmp_path / "t.csv")
    base = ["md", committee, xyz, "--steps", "30", "--no-progress", "--thermo", thermo,
            "--thermo-every", "1", "--temperature", "300", "--replicas", "2"]
    # half the starting deviation: both replicas pass it at the first check (step 1)
    assert md_cli.main(base + ["--stop-uncertainty", f"{start * 0.5:.12g}"]) == EXIT_STOPPED
    err = capsys.readouterr().err
    stop_line = [ln for ln in err.splitlines() if ln.startswith("mlpot md: stopped")]
    assert len(stop_line) == 1 and "max_force_dev passed --stop-uncertainty" in stop_line[0]
    saved = read(str(tmp_path / "t_uncertain.xyz"), index=":")
    assert sorted(a.info["replica"] for a in saved) == [0, 1]
    for a in saved:  # the structure that crossed: its deviation, recomputed, is over the limit
        assert a.info["step"] == 1
        _, d = _reference(model, a)
        assert float(d[K.MAX_FORCE_DEV][0]) > start * 0.5
        assert a.info["max_force_dev"] == pytest.approx(float(d[K.MAX_FORCE_DEV][0]), rel=1e-6)
    # without a limit the same run goes to the end
    assert md_cli.main(base) == 0


def test_non_committee_with_stop_uncertainty_is_one_line_exit_2(files, tmp_path, capsys):
    _, single, xyz = files
    for option in (["--stop-uncertainty", "0.1"], ["--model-devi", str(tmp_path / "m.out")]):
        rc = md_cli.main(["md", single, xyz, "--steps", "2", "--no-progress",
                          "--thermo", str(tmp_path / "t.csv")] + option)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == EXIT_BAD_INPUT
        assert len(err) == 1 and "committee" in err[0] and option[0] in err[0]
    rc = md_cli.main(["md", files[0], xyz, "--stop-uncertainty", "-1", "--no-progress"])
    assert rc == EXIT_BAD_INPUT and "--stop-uncertainty" in capsys.readouterr().err


class SpringCommittee:
    """A committee of two harmonic members with different spring constants: its force
    deviation grows with each atom's displacement from its centre (exact, cheap)."""

    committee = 2

    def __init__(self, centers):
        self.members = [I.Harmonic(1.0, centers), I.Harmonic(3.0, centers)]

    def __call__(self, x, cell, stress):
        outs = [m(x, cell, stress) for m in self.members]
        r, n = x.shape[:2]
        fm = torch.stack([o["forces"] for o in outs], 1)  # [R, K, N, 3]
        em = torch.stack([o["energy"] for o in outs], 1)  # [R, K]
        dev = model_deviation(em.T, fm.transpose(0, 1).reshape(2, r * n, 3),
                              torch.arange(r).repeat_interleave(n), torch.full((r,), n))
        return {"energy": em.mean(1), "forces": fm.mean(1),
                "max_force_dev": dev[K.MAX_FORCE_DEV],
                "forces_dev": dev[K.FORCES_DEV].reshape(r, n), "energy_dev": dev[K.ENERGY_DEV]}


def test_per_replica_stop_holds_the_crossed_replica_while_the_others_go_on(tmp_path):
    atoms = bulk("Ar", "fcc", a=5.3, cubic=True)
    st = I.make_state(atoms.positions, atoms.get_masses(), atoms.cell.array, True, atoms.numbers,
                      replicas=3, seed=0)
    st = I.initialize_velocities(st, torch.tensor([0.01, 2000.0, 0.01]))
    provider = SpringCommittee(torch.tensor(atoms.positions))
    path, thermo = str(tmp_path / "uncertain.xyz"), str(tmp_path / "thermo.csv")
    rule = H.UncertaintyStop(0.05, path)
    health = H.HealthCheck([rule], last_good_path=None)
    integ = I.Langevin(1.0, torch.tensor([0.01, 2000.0, 0.01]), 0.001)
    with pytest.warns(I.MDWarning, match="replica 1"):
        end = I.simulate(st, integ, provider, 60, [I.ThermoCSV(thermo, 1)], health=health,
                         last_good_path=None)
    assert end.step == 60 and end.active.tolist() == [True, False, True]
    saved = read(path, index=":")
    assert [a.info["replica"] for a in saved] == [1]
    stop_step = saved[0].info["step"]
    assert 0 < stop_step < 60 and saved[0].info["max_force_dev"] > 0.05
    # the stopped replica is held at the structure that crossed; the others moved on
    np.testing.assert_allclose(end.positions[1].numpy(), saved[0].positions, atol=1e-6)  # extxyz
    assert float(end.outputs["max_force_dev"][1]) == pytest.approx(saved[0].info["max_force_dev"])
    with open(thermo) as fh:
        rows = list(csv.DictReader(fh))
    assert max(int(r["step"]) for r in rows if r["replica"] == "1") == stop_step - 1
    assert max(int(r["step"]) for r in rows if r["replica"] == "0") == 60
    # a checkpoint keeps the stopped replica stopped; the rule then stops the run when the
    # last two cross (a lower threshold), exit code 3
    ck = str(tmp_path / "md.ckpt")
    I.save_md_checkpoint(ck, end, integ)
    st2, integ2 = I.load_md_checkpoint(ck)
    assert st2.active.tolist() == [True, False, True]
    rule2 = H.UncertaintyStop(1e-6, path)
    with pytest.raises(I.UncertaintyStopped, match="uncertainty check") as err:
        I.simulate(st2, integ2, provider, 5, health=H.HealthCheck([rule2], last_good_path=None),
                   last_good_path=None)
    assert err.value.exit_code == EXIT_STOPPED
    assert sorted(a.info["replica"] for a in read(path, index=":")) == [0, 2]


def test_openmm_reporter_stops_the_run_and_saves_the_ml_atoms(files, tmp_path):
    openmm = pytest.importorskip("openmm")
    from openmm import app, unit

    from mlpot.openmm import UncertaintyReporter, topology_from_ase

    committee, single, xyz = files
    atoms = read(xyz)
    sim = _openmm_simulation(atoms, openmm, app, unit, topology_from_ase)
    sim.context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    csv_path, last = str(tmp_path / "u.csv"), str(tmp_path / "last.xyz")
    ml = list(range(4))  # a subset: the reporter sees the ML atoms only
    rep = UncertaintyReporter(committee, ml, csv_path, interval=2, threshold=1e-9,
                              last_path=last)
    sim.reporters.append(rep)
    with pytest.raises(H.UncertaintyStopped, match="uncertainty check at step 2") as err:
        sim.step(10)
    rep.close()
    assert err.value.exit_code == EXIT_STOPPED
    saved = read(last)
    assert len(saved) == 4 and saved.info["step"] == 2
    state = sim.context.getState(getPositions=True)
    x = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer) * 10.0
    np.testing.assert_allclose(saved.positions, x[:4], atol=1e-6)  # extxyz digits
    assert saved.info["max_force_dev"] == pytest.approx(float(rep.last[K.MAX_FORCE_DEV]))
    with open(csv_path) as fh:
        assert [r["step"] for r in csv.DictReader(fh)] == ["2"]
    with pytest.raises(mlpot.errors.UserError, match="committee"):
        UncertaintyReporter(single, None, csv_path, 10)


def test_ase_observer_stops_on_uncertainty_and_saves_the_structure(files, tmp_path):
    from ase.md.verlet import VelocityVerlet
    from ase.units import fs

    committee, _, xyz = files
    atoms = read(xyz)
    atoms.calc = MLPotCalculator(committee)
    atoms.get_forces()
    start = atoms.calc.results["max_force_dev"]
    dyn = VelocityVerlet(atoms, 1.0 * fs)
    path = str(tmp_path / "crossed.xyz")
    check = H.HealthCheck(H.default_rules() + [H.UncertaintyStop(start * 0.5, path)],
                          last_good_path=None)
    dyn.attach(H.HealthCheck.for_ase(atoms, dyn, health=check), interval=1)
    with pytest.raises(I.UncertaintyStopped, match="uncertainty check at step 1") as err:
        dyn.run(5)
    assert err.value.exit_code == EXIT_STOPPED and path in str(err.value)
    saved = read(path)
    np.testing.assert_allclose(saved.positions, atoms.positions, atol=1e-6)
    assert saved.info["max_force_dev"] == pytest.approx(atoms.calc.results["max_force_dev"])
    assert saved.info["max_force_dev"] > start * 0.5


def test_md_cli_holds_each_replica_at_its_crossing_and_runs_the_rest(files, tmp_path, capsys):
    """Replicas cross at their own steps: each is saved and held there, the last one runs on.
    (The held replicas still take their random numbers, so the others follow the same
    trajectory as in a run without the threshold.)"""
    committee, _, xyz = files
    base = ["md", committee, xyz, "--steps", "30", "--no-progress", "--thermo-every", "1",
            "--temperature", "2000", "--replicas", "3", "--seed", "4"]
    free = str(tmp_path / "free.csv")
    assert md_cli.main(base + ["--thermo", free]) == 0
    with open(free) as fh:
        rows = list(csv.DictReader(fh))
    dev = np.zeros((31, 3))
    for row in rows:
        dev[int(row["step"]), int(row["replica"])] = float(row["max_force_dev"])
    peaks = np.sort(dev[1:].max(0))
    assert peaks[0] < peaks[1]
    limit = 0.5 * (peaks[0] + peaks[1])  # the lowest replica never crosses, the others do
    first = {r: int(np.argmax(dev[1:, r] > limit)) + 1 for r in range(3)
             if dev[1:, r].max() > limit}
    thermo = str(tmp_path / "held.csv")
    capsys.readouterr()
    assert md_cli.main(base + ["--thermo", thermo, "--stop-uncertainty", repr(float(limit))]) == 0
    err = capsys.readouterr().err
    assert err.count("mlpot md: warning:") == len(first) == 2
    saved = read(str(tmp_path / "held_uncertain.xyz"), index=":")
    assert {a.info["replica"]: a.info["step"] for a in saved} == first
    with open(thermo) as fh:
        held = list(csv.DictReader(fh))
    for r in range(3):
        steps = [int(row["step"]) for row in held if int(row["replica"]) == r]
        assert steps == list(range(first.get(r, 31)))
    for row in held:  # the same numbers as the free run up to each replica's stop
        assert float(row["max_force_dev"]) == pytest.approx(dev[int(row["step"]),
                                                                int(row["replica"])], rel=1e-9)


def test_resumed_run_leaves_the_same_thermo_and_model_devi(files, tmp_path):
    committee, _, xyz = files

    def run(folder, steps, *extra):
        folder.mkdir(exist_ok=True)
        return md_cli.main(["md", committee, xyz, "--steps", str(steps), "--no-progress",
                            "--thermo-every", "2", "--thermo", str(folder / "t.csv"),
                            "--model-devi", str(folder / "model_devi.out"),
                            "--checkpoint", str(folder / "md.ckpt"), "--checkpoint-every", "4",
                            "--temperature", "500"] + list(extra))

    assert run(tmp_path / "a", 12) == 0
    assert run(tmp_path / "b", 8) == 0
    with open(tmp_path / "b" / "model_devi.out", "a") as fh:  # a half-written line of a kill
        fh.write("          10       1.0")
    assert run(tmp_path / "b", 12, "--resume") == 0
    for name in ("t.csv", "model_devi.out"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    assert len((tmp_path / "a" / "model_devi.out").read_text().splitlines()) == 1 + 7
