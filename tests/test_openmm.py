"""mlpot.openmm: TorchForce and PythonForce agree with the model on every platform, ML/MM
systems split their energy as promised, MD conserves energy, and openmm-app tools work."""
import io
import warnings

import numpy as np
import pytest
import torch  # noqa: F401 - before openmm/openmmtorch
import openmm
from openmm import app, unit
from ase.build import molecule

import mlpot.openmm as mo
from mlpot.openmm import forces
from _fitting import periodic_water_and_ethanol
from mlpot import keys as K
from mlpot import testing as T
from mlpot import units
from mlpot.ase import MLPotCalculator
from mlpot.check import water_box
from mlpot.export import export, load
from mlpot.models import build_model

PLATFORMS = [p for p in ("Reference", "CPU", "CUDA")
             if p in [openmm.Platform.getPlatform(i).getName()
                      for i in range(openmm.Platform.getNumPlatforms())]]
BACKENDS = [b for b in ("torch", "python") if mo.backend_status(b)[0]]
KJ = unit.kilojoule_per_mole


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def egnn(dtype="float64"):
    torch.manual_seed(0)
    return build_model("egnn", ["H", "C", "O"], cutoff=4.0, dtype=dtype, hidden=16,
                       edge_hidden=16, num_layers=2, readout_hidden=16).eval()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    model = egnn()
    path = str(tmp_path_factory.mktemp("openmm") / "egnn.pt")
    export(model, path)
    return model, path


def evaluate(system, positions_A, platform="Reference", group=None):
    """(energy eV, forces eV/A) of an OpenMM System."""
    properties = {"Precision": "double"} if platform == "CUDA" else {}
    context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName(platform), properties)
    context.setPositions(positions_A * units.ANGSTROM_TO_NM)
    kw = {} if group is None else {"groups": {group}}
    state = context.getState(getEnergy=True, getForces=True, **kw)
    e = state.getPotentialEnergy().value_in_unit(KJ) * units.KJ_PER_MOL_TO_EV
    f = state.getForces(asNumpy=True).value_in_unit(KJ / unit.nanometer)
    return e, f / units.EV_PER_A_TO_KJ_PER_MOL_NM


def structures():
    return periodic_water_and_ethanol(3)


# ---------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("name", ["periodic water", "ethanol"])
def test_every_path_gives_the_same_energy_and_forces(model_file, name):
    """Python model, exported file, ASE calculator, TorchForce and PythonForce on every
    platform: equal within float64 round-off."""
    model, path = model_file
    atoms = structures()[name]
    ref = model(T.to_data(atoms, model).as_dict())
    e_ref, f_ref = float(ref[K.ENERGY][0]), ref[K.FORCES].detach().numpy()
    results = {}
    exported = load(path)
    out = exported(T.to_data(atoms, model).as_dict())
    results["exported"] = float(out[K.ENERGY][0]), out[K.FORCES].detach().numpy()
    atoms.calc = MLPotCalculator(path)
    results["ase"] = atoms.get_potential_energy(), atoms.get_forces()
    topology = mo.topology_from_ase(atoms)
    assert (topology.getPeriodicBoxVectors() is not None) == bool(atoms.pbc.all())
    for backend in BACKENDS:
        system = mo.create_system(path, topology, backend=backend)
        for platform in PLATFORMS:
            results[f"{backend}/{platform}"] = evaluate(system, atoms.positions, platform)
    assert len(results) >= 2 + len(PLATFORMS)
    for key, (e, f) in results.items():
        assert e == pytest.approx(e_ref, abs=1e-8), key
        np.testing.assert_allclose(f, f_ref, atol=1e-8, err_msg=key)


def test_chunked_deep_potential_in_every_path(tmp_path):
    """A Deep Potential evaluated in chunks of centres (as for large systems) gives the numbers of
    the whole pass in the exported file, ASE and OpenMM."""
    torch.manual_seed(0)
    model = build_model("dp_se_e2_a", ["H", "O"], cutoff=4.0, dtype="float64",
                        embedding=[8, 16], axis_neuron=4, fitting=[16, 16]).eval()
    atoms = structures()["periodic water"]
    model.chunk_atoms = 0
    ref = model(T.to_data(atoms, model).as_dict())
    model.chunk_atoms = 7
    path = str(tmp_path / "dp.pt")
    export(model, path)
    assert load(path).module.chunk_atoms == 7 < len(atoms)  # the file keeps the chunk size
    results = {"exported": load(path)(T.to_data(atoms, model).as_dict())}
    results["exported"] = [float(results["exported"][K.ENERGY][0]),
                           results["exported"][K.FORCES].detach().numpy()]
    atoms.calc = MLPotCalculator(path)
    results["ase"] = atoms.get_potential_energy(), atoms.get_forces()
    topology = mo.topology_from_ase(atoms)
    for backend in BACKENDS:
        results[backend] = evaluate(mo.create_system(path, topology, backend=backend),
                                    atoms.positions, "CPU" if "CPU" in PLATFORMS else "Reference")
    for key, (e, f) in results.items():
        assert e == pytest.approx(float(ref[K.ENERGY][0]), abs=1e-8), key
        np.testing.assert_allclose(f, ref[K.FORCES].detach().numpy(), atol=1e-8, err_msg=key)


def test_float32_model_on_the_cpu_platform(model_file, tmp_path):
    model, _ = model_file
    path = str(tmp_path / "egnn32.pt")
    export(model, path, dtype="float32")
    atoms = structures()["periodic water"]
    ref = model(T.to_data(atoms, model).as_dict())
    topology = mo.topology_from_ase(atoms)
    for backend in BACKENDS:
        e, f = evaluate(mo.create_system(path, topology, backend=backend), atoms.positions, "CPU")
        assert e == pytest.approx(float(ref[K.ENERGY][0]), abs=1e-4 * len(atoms))
        np.testing.assert_allclose(f, ref[K.FORCES].detach().numpy(), atol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_subset_of_atoms(model_file, backend):
    """The force acts on the ML atoms only; other particles get no force from it."""
    model, path = model_file
    mol = T.small_molecule("CH3CH2OH")
    extra = np.array([[8.0, 0, 0], [0, 9.0, 0], [0, 0, -7.0]])
    positions = np.concatenate([extra[:2], mol.positions, extra[2:]])
    ml = list(range(2, 2 + len(mol)))
    system = openmm.System()
    for _ in range(len(positions)):
        system.addParticle(12.0)
    system.addForce(mo.create_force(path, mol.numbers, atoms=ml, backend=backend))
    e, f = evaluate(system, positions)
    ref = model(T.to_data(mol, model).as_dict())
    assert e == pytest.approx(float(ref[K.ENERGY][0]), abs=1e-8)
    np.testing.assert_allclose(f[ml], ref[K.FORCES].detach().numpy(), atol=1e-8)
    assert np.abs(f[[0, 1, len(positions) - 1]]).max() == 0.0


def test_errors_and_the_fallback(model_file, monkeypatch):
    _, path = model_file
    top = mo.topology_from_ase(molecule("CH3Cl"))
    with pytest.raises(ValueError, match=r"\['Cl'\] not in the type map"):
        mo.create_system(path, top, backend="python")
    with pytest.raises(ValueError, match="unknown backend"):
        mo.create_force(path, [1, 1], backend="jax")
    # where TorchForce cannot run, 'auto' builds a PythonForce and says so once
    from mlpot.openmm import forces

    real = forces.backend_status
    monkeypatch.setattr(forces, "backend_status", lambda b: (False, "torch 2.10 (simulated)")
                        if forces._ALIASES.get(b, b) == "torch" else real(b))
    monkeypatch.setattr(forces, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="PythonForce because TorchForce is not usable"):
        f1 = mo.create_force(path, [8, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f2 = mo.create_force(path, [8, 1, 1])
    assert isinstance(f1, openmm.PythonForce) and isinstance(f2, openmm.PythonForce)
    with pytest.raises(RuntimeError, match="'torch' backend is not usable: torch 2.10"):
        mo.create_force(path, [8, 1, 1], backend="torch")


# ---------------------------------------------------------------------------- ML/MM
def ethanol_in_water(nonbonded=app.PME):
    """Ethanol in TIP3P water with a small hand-written force field (so the test needs no
    force-field package): topology, MM system, positions (A), ethanol atom indices."""
    eth = molecule("CH3CH2OH")
    eth.positions -= eth.positions.mean(0)
    box = water_box(4)
    centre = box.cell.diagonal() / 2
    eth.positions += centre
    d = np.linalg.norm(box.positions[::3, None] - eth.positions[None], axis=2).min(1)
    keep = np.repeat(d > 3.0, 3)
    atoms = eth + box[keep]
    atoms.cell, atoms.pbc = box.cell, True
    topology = mo.topology_from_ase(atoms, residue_name="ETH")
    ff = app.ForceField(io.StringIO(_ffxml(eth)))
    system = ff.createSystem(topology, nonbondedMethod=nonbonded,
                             nonbondedCutoff=0.55 * unit.nanometer, constraints=None,
                             rigidWater=True)
    _no_dispersion_correction(system)
    return topology, system, atoms, list(range(len(eth)))


def _no_dispersion_correction(system):
    """The long-range LJ correction depends on all atom types at once (not pairwise)."""
    for force in system.getForces():
        if isinstance(force, openmm.NonbondedForce):
            force.setUseDispersionCorrection(False)


def _ffxml(eth) -> str:
    """Types C3 (methyl C), C2 (CH2), OH, HC, HO for ethanol; OW, HW for TIP3P water."""
    from ase.neighborlist import natural_cutoffs, neighbor_list

    i, j = neighbor_list("ij", eth, natural_cutoffs(eth, mult=1.2))
    nbrs = {a: sorted(j[i == a].tolist()) for a in range(len(eth))}
    sym = eth.get_chemical_symbols()
    types = []
    for a, s in enumerate(sym):
        if s == "C":
            types.append("C2" if any(sym[b] == "O" for b in nbrs[a]) else "C3")
        elif s == "O":
            types.append("OH")
        else:
            types.append("HO" if sym[nbrs[a][0]] == "O" else "HC")
    charge = {"C3": -0.18, "C2": 0.145, "OH": -0.683, "HO": 0.418, "HC": 0.06}
    lj = {"C3": (0.34, 0.457), "C2": (0.34, 0.457), "OH": (0.307, 0.88), "HO": (1.0, 0.0),
          "HC": (0.265, 0.0657), "OW": (0.315061, 0.636386), "HW": (1.0, 0.0)}
    mass = {"C": 12.011, "O": 15.999, "H": 1.008}
    elem = {"C3": "C", "C2": "C", "OH": "O", "HO": "H", "HC": "H", "OW": "O", "HW": "H"}
    x = ["<ForceField><AtomTypes>"]
    x += [f'<Type name="{t}" class="{t}" element="{e}" mass="{mass[e]}"/>' for t, e in elem.items()]
    x.append('</AtomTypes><Residues><Residue name="ETH">')
    x += [f'<Atom name="{s}{a}" type="{t}" charge="{charge[t]}"/>'
          for a, (s, t) in enumerate(zip(sym, types))]
    x += [f'<Bond atomName1="{sym[a]}{a}" atomName2="{sym[b]}{b}"/>'
          for a in range(len(eth)) for b in nbrs[a] if a < b]
    x.append('</Residue><Residue name="HOH"><Atom name="O" type="OW" charge="-0.834"/>'
             '<Atom name="H1" type="HW" charge="0.417"/><Atom name="H2" type="HW" '
             'charge="0.417"/><Bond atomName1="O" atomName2="H1"/><Bond atomName1="O" '
             'atomName2="H2"/></Residue></Residues>')
    x.append('<HarmonicBondForce><Bond class1="C3" class2="C2" length="0.1526" k="259408"/>'
             '<Bond class1="C3" class2="HC" length="0.109" k="284512"/>'
             '<Bond class1="C2" class2="HC" length="0.109" k="284512"/>'
             '<Bond class1="C2" class2="OH" length="0.141" k="267776"/>'
             '<Bond class1="OH" class2="HO" length="0.0945" k="462750"/>'
             '<Bond class1="OW" class2="HW" length="0.09572" k="462750"/></HarmonicBondForce>')
    x.append('<HarmonicAngleForce>'
             '<Angle class1="HC" class2="C3" class3="HC" angle="1.88" k="276"/>'
             '<Angle class1="HC" class2="C3" class3="C2" angle="1.91" k="418"/>'
             '<Angle class1="HC" class2="C2" class3="HC" angle="1.88" k="276"/>'
             '<Angle class1="C3" class2="C2" class3="HC" angle="1.91" k="418"/>'
             '<Angle class1="C3" class2="C2" class3="OH" angle="1.91" k="418"/>'
             '<Angle class1="HC" class2="C2" class3="OH" angle="1.91" k="418"/>'
             '<Angle class1="C2" class2="OH" class3="HO" angle="1.89" k="460"/>'
             '<Angle class1="HW" class2="OW" class3="HW" angle="1.82421813418" k="836.8"/>'
             '</HarmonicAngleForce>')
    x.append('<PeriodicTorsionForce><Proper class1="" class2="C3" class3="C2" class4="" '
             'periodicity1="3" phase1="0" k1="0.65"/><Proper class1="" class2="C2" '
             'class3="OH" class4="" periodicity1="3" phase1="0" k1="0.7"/>'
             '</PeriodicTorsionForce>')
    x.append('<NonbondedForce coulomb14scale="0.8333333333" lj14scale="0.5">'
             '<UseAttributeFromResidue name="charge"/>')
    x += [f'<Atom type="{t}" sigma="{s}" epsilon="{e}"/>' for t, (s, e) in lj.items()]
    x.append("</NonbondedForce></ForceField>")
    return "".join(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ml_mm_energy_is_mm_part_plus_ml_part(model_file, backend):
    """With a pairwise-additive MM force field (reaction field), the MM part of the mixed system
    is exactly E_MM(all) - E_MM(ethanol alone); the ML part is the model's energy of the
    ethanol; and the mixed system runs MD."""
    model, path = model_file
    topology, mm_system, atoms, ml = ethanol_in_water(app.CutoffPeriodic)
    mixed = mo.create_mixed_system(path, topology, mm_system, ml, backend=backend,
                                   force_group=1)
    for k in range(mixed.getNumForces()):
        if mixed.getForce(k).getForceGroup() != 1:
            assert mixed.getForce(k).getForceGroup() == 0
    e_ml, f_ml = evaluate(mixed, atoms.positions, group=1)
    ref = model(T.to_data(atoms[ml], model).as_dict())
    assert e_ml == pytest.approx(float(ref[K.ENERGY][0]), abs=1e-8)
    np.testing.assert_allclose(f_ml[ml], ref[K.FORCES].detach().numpy(), atol=1e-8)
    assert np.abs(f_ml[len(ml):]).max() == 0.0

    e_mm_part, _ = evaluate(mixed, atoms.positions, group=0)
    e_all_mm, _ = evaluate(mm_system, atoms.positions)
    eth_top, eth_system, _, _ = _ethanol_alone(topology, atoms, ml)
    e_eth_mm, _ = evaluate(eth_system, atoms.positions[ml])
    assert e_mm_part == pytest.approx(e_all_mm - e_eth_mm, abs=1e-6)
    e_total, _ = evaluate(mixed, atoms.positions)
    assert e_total == pytest.approx(e_mm_part + e_ml, abs=1e-8)
    assert mixed.getNumConstraints() == mm_system.getNumConstraints()  # water only

    integrator = openmm.LangevinMiddleIntegrator(300, 1.0, 0.0005)
    sim = app.Simulation(topology, mixed, integrator, openmm.Platform.getPlatformByName("CPU"))
    sim.context.setPositions(atoms.positions * units.ANGSTROM_TO_NM)
    sim.minimizeEnergy(maxIterations=20)
    sim.step(20)
    state = sim.context.getState(getEnergy=True)
    assert np.isfinite(state.getPotentialEnergy().value_in_unit(KJ))


def _ethanol_alone(topology, atoms, ml):
    """The MM system of the ethanol by itself, in the same box."""
    from mlpot.openmm import topology_from_ase

    eth = atoms[ml]
    top = topology_from_ase(eth, residue_name="ETH")
    ff = app.ForceField(io.StringIO(_ffxml(molecule("CH3CH2OH"))))
    system = ff.createSystem(top, nonbondedMethod=app.CutoffPeriodic,
                             nonbondedCutoff=0.55 * unit.nanometer, constraints=None)
    _no_dispersion_correction(system)
    return top, system, eth, list(range(len(eth)))


def test_ml_mm_with_pme_matches_openmm_ml(model_file):
    """Our mechanical embedding equals openmm-ml's createMixedSystem with mlpot plugged in."""
    openmmml = pytest.importorskip("openmmml")
    from mlpot.openmmml_plugin import register

    register()
    _, path = model_file
    topology, mm_system, atoms, ml = ethanol_in_water(app.PME)
    ours = mo.create_mixed_system(path, topology, mm_system, ml, backend=BACKENDS[0])
    potential = openmmml.MLPotential("mlpot", modelPath=path)
    theirs = potential.createMixedSystem(topology, mm_system, ml, backend=BACKENDS[0])
    e_ours, f_ours = evaluate(ours, atoms.positions)
    e_theirs, f_theirs = evaluate(theirs, atoms.positions)
    assert e_ours == pytest.approx(e_theirs, abs=1e-6)
    np.testing.assert_allclose(f_ours, f_theirs, atol=1e-5)
    # and an all-ML system through openmm-ml equals ours
    mol = T.small_molecule("CH3CH2OH")
    top = mo.topology_from_ase(mol)
    e1, _ = evaluate(potential.createSystem(top), mol.positions)
    e2, _ = evaluate(mo.create_system(path, top), mol.positions)
    assert e1 == pytest.approx(e2, abs=1e-10)


# ---------------------------------------------------------------------------- dynamics
@pytest.fixture(scope="module")
def morse_file(tmp_path_factory):
    from test_ase_calculator import morse_model

    path = str(tmp_path_factory.mktemp("openmm") / "morse.pt")
    export(morse_model(), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_nve_conserves_energy(morse_file, backend):
    from test_ase_calculator import crystal

    atoms = crystal()
    system = mo.create_system(morse_file, mo.topology_from_ase(atoms), backend=backend,
                              remove_cm_motion=False)
    integrator = openmm.VerletIntegrator(2.0 * units.FS_TO_PS)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"))
    context.setPositions(atoms.positions * units.ANGSTROM_TO_NM)
    context.setVelocitiesToTemperature(300, 1)
    energies = []
    steps, every = (5000, 20) if backend == "torch" else (3000, 20)
    for _ in range(steps // every):
        integrator.step(every)
        s = context.getState(getEnergy=True)
        energies.append((s.getPotentialEnergy() + s.getKineticEnergy()).value_in_unit(KJ))
    energies = np.array(energies) * units.KJ_PER_MOL_TO_EV / len(atoms)  # eV/atom
    time_ps = np.arange(len(energies)) * every * 2e-3
    drift = abs(np.polyfit(time_ps, energies, 1)[0])
    assert drift < 2e-5, f"drift {drift:.2e} eV/atom/ps"
    assert np.ptp(energies) < 1e-4, f"energy spread {np.ptp(energies):.2e} eV/atom"


@pytest.mark.parametrize("backend", BACKENDS)
def test_simulation_reporters_checkpoints_and_serialization(model_file, backend, tmp_path):
    _, path = model_file
    atoms = water_box(2)
    topology = mo.topology_from_ase(atoms)
    system = mo.create_system(path, topology, backend=backend)
    platform = openmm.Platform.getPlatformByName("CPU")
    sim = app.Simulation(topology, system, openmm.LangevinMiddleIntegrator(300, 1, 0.0005),
                         platform)
    sim.context.setPositions(atoms.positions * units.ANGSTROM_TO_NM)
    log = tmp_path / "log.csv"
    sim.reporters += [app.DCDReporter(str(tmp_path / "traj.dcd"), 5),
                      app.StateDataReporter(str(log), 5, step=True, potentialEnergy=True,
                                            temperature=True),
                      app.CheckpointReporter(str(tmp_path / "state.chk"), 10)]
    sim.step(20)
    assert len(log.read_text().strip().splitlines()) == 5
    assert (tmp_path / "traj.dcd").stat().st_size > 0
    saved = sim.context.getState(getPositions=True).getPositions(asNumpy=True)

    if backend == "python":  # the computation is pickled into the XML
        clone = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    else:  # the openmm-torch 1.5 wheels segfault deserializing any TorchForce (mlpot doctor)
        clone = mo.create_system(path, topology, backend=backend)
    sim2 = app.Simulation(topology, clone, openmm.LangevinMiddleIntegrator(300, 1, 0.0005),
                          platform)
    sim2.loadCheckpoint(str(tmp_path / "state.chk"))
    pos2 = sim2.context.getState(getPositions=True).getPositions(asNumpy=True)
    np.testing.assert_allclose(pos2.value_in_unit(unit.nanometer),
                               saved.value_in_unit(unit.nanometer), atol=1e-12)
    e1 = sim.context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(KJ)
    e2 = sim2.context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(KJ)
    assert e1 == pytest.approx(e2, abs=1e-8)
    sim2.step(5)


# ---------------------------------------------------------------------------- doctor
def test_doctor_runs_a_real_calculation_everywhere(capsys):
    import argparse

    from mlpot.doctor import add_doctor_parser

    parser = argparse.ArgumentParser(prog="mlpot")
    add_doctor_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["doctor", "--platform", "Reference"])
    code = args.func(args)
    text = capsys.readouterr().out
    assert code == 0, text
    for line in ("torch 2.", "openmm 8.", "neighbor-list extension", "exported file + ASE",
                 "PythonForce on Reference, box: |dE|"):
        assert line in text, text
    if "torch" in BACKENDS:
        assert "TorchForce on Reference, molecule: |dE|" in text
    assert "everything works" in text


def test_doctor_advice_for_the_usual_failures():
    from mlpot.doctor import advice_for

    assert "import torch before openmm" in advice_for(
        "libnvrtc.so.12: cannot open shared object file")
    assert "torch/openmm-torch mismatch" in advice_for("RuntimeError: set_stride is not allowed")
    assert 'pip install -e ".[torchforce]"' in advice_for("undefined symbol: _ZN3c10")
    assert "OpenMM >= 8.5" in advice_for("OpenMM 8.4 has no PythonForce")
    assert advice_for("something else entirely") == ""


@pytest.mark.parametrize("dist,version,requires,torch_version,match", [
    ("openmmtorch", "1.5", [], "2.9.1+cu128", True),             # PyPI's wheel: built for 2.9
    ("openmmtorch", "1.5", [], "2.10.0", False),                 # openmm-torch issue 175
    ("acellera-openmmtorch-cpu", "1.10", ["openmm", "torch<2.13,>=2.10"], "2.12.1", True),
    ("acellera-openmmtorch-cpu", "1.10", ["openmm", "torch<2.13,>=2.10"], "2.13.0", False),
    ("acellera-openmmtorch-cu12", "1.10", ["torch (>=2.10,<2.13)"], "2.9.1", False),
    ("openmm-torch", "1.6", [], "2.14.1", None),                 # from source / conda: trusted
    (None, None, [], "2.14.1", None),                            # not installed
])
def test_torchforce_is_chosen_only_for_the_torch_its_wheel_is_built_for(
        monkeypatch, dist, version, requires, torch_version, match):
    from importlib import metadata

    monkeypatch.setattr(metadata, "packages_distributions",
                        lambda: {"openmmtorch": [dist]} if dist else {})
    monkeypatch.setattr(metadata, "version", lambda name: version)
    monkeypatch.setattr(metadata, "requires", lambda name: requires)
    monkeypatch.setattr(forces.torch, "__version__", torch_version)
    got, line = forces.torchforce_combination()
    assert got is match, line
    assert f"torch {torch_version}" in line
    if match is False:
        ok, why = forces.backend_status("torch")
        assert not ok and "it crashes with this torch" in why and "[torchforce]" in why


@pytest.mark.skipif("torch" not in BACKENDS, reason="openmm-torch cannot run here")
@pytest.mark.parametrize("jit_optimize", [False, True])
def test_torchforce_with_and_without_the_optimizing_executor(model_file, jit_optimize):
    """TorchForce runs in the thread that steps OpenMM; by default mlpot switches TorchScript's
    optimizing executor off there (faster on CPU). Either way: the same energy and forces, also
    for a model that mlpot.load already ran (its classes must survive into openmm-torch's copy)."""
    model, path = model_file
    atoms = structures()["periodic water"]
    ref = model(T.to_data(atoms, model).as_dict())
    exported = load(path)
    exported(T.to_data(atoms, model).as_dict())  # run once by the unoptimized executor
    before = torch._C._get_graph_executor_optimize()
    torch._C._set_graph_executor_optimize(True)
    try:
        system = mo.create_system(exported, mo.topology_from_ase(atoms), backend="torch",
                                  jit_optimize=jit_optimize)
        assert torch._C._get_graph_executor_optimize() == jit_optimize
        for platform in PLATFORMS:
            e, f = evaluate(system, atoms.positions, platform)
            assert e == pytest.approx(float(ref[K.ENERGY][0]), abs=1e-8)
            np.testing.assert_allclose(f, ref[K.FORCES].detach().numpy(), atol=1e-8)
    finally:
        torch._C._set_graph_executor_optimize(before)


# ---------------------------------------------------------------------------- atom counts
def _system(n):
    system = openmm.System()
    for _ in range(n):
        system.addParticle(12.0)
    return system


@pytest.mark.parametrize("backend", BACKENDS)
def test_atom_count_is_checked_against_the_system_at_creation(model_file, backend):
    """A force for N atoms and a System of another size: one clear line naming both counts
    when the force is created with the System (it used to fail at the first evaluation with
    "index out of range in self")."""
    from mlpot.errors import UserError
    from mlpot.openmm.forces import OpenMMSetupError

    _, path = model_file
    cases = [
        (4, [8, 1, 1], None, r"the force is for 3 atoms \(one per atomic number given\) but the "
                             "System has 4 particles"),
        (2, [8, 1, 1], None, "the force is for 3 atoms .* System has 2 particles"),
        (3, [8, 1, 1], [0, 1, 5], "ML atom index 5 is outside the System's 3 particles"),
        (6, [8, 1, 1, 1], [0, 1, 2], "4 atomic numbers for 3 ML atoms and 6 particles"),
    ]
    for n, numbers, atoms, message in cases:
        with pytest.raises(OpenMMSetupError, match=message) as info:
            mo.create_force(path, numbers, atoms=atoms, backend=backend, system=_system(n))
        assert "\n" not in str(info.value) and isinstance(info.value, UserError)
    with pytest.raises(OpenMMSetupError, match="ML atom index -1 is negative"):
        mo.create_force(path, [8, 1, 1], atoms=[0, 1, -1], backend=backend)
    # what fits passes: one number per particle, or per ML atom of a larger System
    mo.create_force(path, [8, 1, 1], backend=backend, system=_system(3))
    mo.create_force(path, [8, 1, 1], atoms=[4, 0, 2], backend=backend, system=_system(5))
    mo.create_force(path, [1, 8, 1, 1, 1], atoms=[1, 2, 3], backend=backend, system=_system(5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_force_added_to_a_system_of_another_size_says_so(model_file, backend):
    """Without system=..., the first evaluation stops with both counts (not an index error)."""
    _, path = model_file
    positions = np.array([[0.0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0], [5.0, 5.0, 5.0]])
    for n in (4, 2):
        system = _system(n)
        system.addForce(mo.create_force(path, [8, 1, 1], backend=backend))
        with pytest.raises(Exception, match=f"mlpot.openmm: the System has {n} particles but the "
                                            "mlpot force was made for 3 atoms"):
            evaluate(system, positions[:n])
    if backend == "torch":  # a PythonForce is handed its particles only: checked at creation
        system = _system(3)
        system.addForce(mo.create_force(path, [8, 1, 1], atoms=[0, 1, 3], backend=backend))
        with pytest.raises(Exception, match="the System has 3 particles but the mlpot force's ML "
                                            "atom indices go up to 3"):
            evaluate(system, positions[:3])
