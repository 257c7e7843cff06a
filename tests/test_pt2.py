"""AOTInductor packages (.pt2, mlpot.aoti): the same numbers as the TorchScript file for every
family, a committee and a variance network, through mlpot.load, ASE, integrators and OpenMM;
clear errors for wrong and truncated files.

Each package is compiled once per session (about a minute each on 2 cores), in float64: the
compiling tests are marked slow (the suite runs them; ``-m "not slow"`` skips them).
"""
import json
import shutil
import zipfile

import numpy as np
import pytest
import torch
from ase import Atoms

from mlpot import keys as K
from mlpot import testing as T
from mlpot.aoti import CompiledModel, is_aoti_archive
from mlpot.checkpoint import CheckpointError, file_kind, read_checkpoint, save_checkpoint
from mlpot.data.atomic_data import AtomicData
from mlpot.cli import main as cli
from mlpot.export import METADATA_NAME, ExportError, export, format_of, load, read_metadata
from mlpot.models import available, build_model, network_class
from mlpot.models.committee import Committee
from mlpot.models.mve import build_mve
from mlpot.neighbors import backend

pytestmark = [pytest.mark.usefixtures("one_thread"),  # tests/conftest.py
              pytest.mark.skipif(backend() != "cpp", reason="the .pt2 export needs the C++ "
                                 "neighbor-list op")]
slow = pytest.mark.slow
FAMILIES = ("dp_se_e2_a", "egnn", "nequip")
CUTOFF = 3.5


def small(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(name, ["O", "H"], CUTOFF, "float64",
                        **getattr(network_class(name), "TEST_HPARAMS", {}))
    model.set_reference_energies(torch.tensor([-2041.2, -13.6]))
    return model.eval()


def systems():
    """Periodic (cubic), triclinic and non-periodic structures."""
    cubic = T.random_periodic(("O", "H"), 24, seed=3)
    tri = T.random_periodic(("O", "H"), 30, seed=4)
    tri.set_cell([[6.0, 0, 0], [1.5, 5.5, 0], [0.7, 1.1, 6.2]], scale_atoms=True)
    mol = T.small_molecule("H2O")
    other = mol.copy()
    other.translate([2.2, 0.3, 0.1])
    mol += other  # two waters
    apart = Atoms("OH", positions=[[0, 0, 0], [0, 0, 2 * CUTOFF]])  # no pairs
    return {"periodic": cubic, "triclinic": tri, "molecule": mol,
            "one water": T.small_molecule("H2O"), "no pairs": apart}


def assert_same(ref, out, keys=None):
    """float64: energies to 1e-10 relative, other outputs to 1e-8 of their norm."""
    assert set(out) == set(ref)
    for key in keys or ref:
        a, b = ref[key].detach(), out[key].detach()
        assert b.shape == a.shape and b.dtype == a.dtype, key
        if key == K.ENERGY:
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
        else:
            scale = float(a.norm()) if a.is_floating_point() else 1.0
            assert float((b - a).abs().max()) <= 1e-8 * max(scale, 1e-6), key


@pytest.fixture(scope="session")
def packages(tmp_path_factory):
    """{name: (TorchScript ExportedModel, .pt2 path)}, compiled on first use."""
    made = {}
    folder = tmp_path_factory.mktemp("pt2")

    def get(name: str):
        if name not in made:
            if name == "committee":
                model = Committee([small("egnn", 0), small("egnn", 1)]).eval()
            elif name == "mve":
                model = build_mve(small("egnn", 0)).eval()
            else:
                model = small(name)
            ts, pt2 = str(folder / f"{name}.pt"), str(folder / f"{name}.pt2")
            export(model, ts)
            if name == "egnn":  # through the command line, from a checkpoint
                ckpt = str(folder / "egnn_ckpt.pt")
                save_checkpoint(model, ckpt)
                assert cli(["export", ckpt, "-o", pt2]) == 0
            else:
                export(model, pt2)
            made[name] = (load(ts), pt2)
        return made[name]

    return get


@slow
@pytest.mark.parametrize("name", FAMILIES)
def test_pt2_equals_torchscript(packages, name):
    scripted, path = packages(name)
    compiled = load(path)
    assert isinstance(compiled, CompiledModel) and compiled.format == "aoti"
    # the sums over edges go to ATen's scatter, not to per-element atomic adds (slow on CPUs)
    with zipfile.ZipFile(path) as z:
        code = [z.read(n).decode() for n in z.namelist() if n.endswith(".cpp")]
    assert code and not any("atomic_add(" in c for c in code)
    for atoms in systems().values():
        data = T.to_data(atoms, scripted).as_dict()
        stress = bool(atoms.pbc.any())
        assert_same(scripted(dict(data), True, stress), compiled(dict(data), True, stress))
        # energy only, and LAMMPS's local atoms (the second half are ghosts)
        assert_same(scripted(dict(data), False), compiled(dict(data), False))
        data[K.LOCAL_ATOMS] = torch.tensor([len(atoms) // 2])
        assert_same(scripted(dict(data)), compiled(dict(data)))
    # a batch of two structures of different sizes
    batch = AtomicData.collate([T.to_data(a, scripted) for a in systems().values()]).as_dict()
    assert_same(scripted(dict(batch), True, True), compiled(dict(batch), True, True))


@slow
@pytest.mark.parametrize("name", ("committee", "mve"))
def test_pt2_committee_and_variance_network(packages, name):
    scripted, path = packages(name)
    compiled = load(path)
    assert compiled.uncertainty == scripted.uncertainty == ("committee" if name == "committee"
                                                            else "mve")
    assert compiled.committee == scripted.committee
    for atoms in systems().values():
        data = T.to_data(atoms, scripted).as_dict()
        stress = bool(atoms.pbc.any())
        assert_same(scripted(dict(data), True, stress), compiled(dict(data), True, stress))


@slow
def test_metadata_and_cli(packages):
    scripted, path = packages("egnn")
    info = read_metadata(path)
    assert is_aoti_archive(path)
    assert info.pop("format") == "aoti"
    expected = dict(scripted.metadata)
    for key in ("training_data_hash", "user"):  # the .pt2 came from a checkpoint
        info.pop(key), expected.pop(key)
    assert info == expected
    assert info["receptive_field"] == scripted.metadata["receptive_field"]
    with zipfile.ZipFile(path) as z:
        assert sum(n.endswith("/extra/" + METADATA_NAME) for n in z.namelist()) == 1


@slow
def test_ase_integrators_and_openmm_take_a_pt2(packages):
    from mlpot.ase import MLPotCalculator
    from integrators.forces import MLPotForces

    scripted, path = packages("egnn")
    atoms = systems()["triclinic"]
    # ASE
    results = []
    for model in (scripted.path, path):
        a = atoms.copy()
        a.calc = MLPotCalculator(model)
        results.append((a.get_potential_energy(), a.get_forces(), a.get_stress()))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-10)
    for k in (1, 2):
        np.testing.assert_allclose(results[1][k], results[0][k],
                                   atol=1e-8 * np.linalg.norm(results[0][k]))
    # per-atom stresses: the TorchScript file only; the .pt2 says so in one line
    from ase.calculators.calculator import PropertyNotImplementedError

    a.calc = MLPotCalculator(path)
    with pytest.raises(PropertyNotImplementedError, match="no per-atom virials"):
        a.get_stresses()
    # integrators: three replicas as one batch
    types_ = scripted.atom_types(atoms.numbers)
    pos = torch.tensor(atoms.positions)
    positions = torch.stack([pos, pos + 0.01, pos - 0.02])
    cell = torch.tensor(np.asarray(atoms.cell)).expand(3, 3, 3).clone()
    outs = [MLPotForces(m, types_)(positions, cell, True) for m in (scripted, load(path))]
    for key in ("energy", "forces", "stress"):
        np.testing.assert_allclose(outs[1][key].numpy(), outs[0][key].numpy(), rtol=1e-10,
                                   atol=1e-8 * float(outs[0][key].norm()))
    # OpenMM through PythonForce ('auto' picks it for a .pt2; TorchForce refuses one)
    openmm = pytest.importorskip("openmm")
    if not hasattr(openmm, "PythonForce"):
        pytest.skip("OpenMM without PythonForce (< 8.5)")
    import mlpot.openmm as mo
    from mlpot import units

    mol = systems()["molecule"]
    energies = []
    for model in (scripted.path, path):
        system = mo.create_system(model, mo.topology_from_ase(mol), backend="auto")
        context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                                 openmm.Platform.getPlatformByName("Reference"))
        context.setPositions(mol.positions * units.ANGSTROM_TO_NM)
        state = context.getState(getEnergy=True, getForces=True)
        energies.append((state.getPotentialEnergy()._value,
                         np.asarray(state.getForces(asNumpy=True)._value)))
    assert energies[1][0] == pytest.approx(energies[0][0], rel=1e-10)
    np.testing.assert_allclose(energies[1][1], energies[0][1],
                               atol=1e-8 * np.linalg.norm(energies[0][1]))
    with pytest.raises(ValueError, match="TorchForce runs TorchScript files"):
        mo.create_force(path, mol.numbers, backend="torch")


@slow
def test_wrong_and_truncated_pt2(packages, tmp_path):
    _, path = packages("egnn")
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match="not an mlpot model .*truncated"):
        load(str(truncated))
    # a PT2 archive without mlpot's metadata
    foreign = tmp_path / "foreign.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(foreign, "w") as dst:
        for item in src.infolist():
            if not item.filename.endswith(METADATA_NAME):
                dst.writestr(item, src.read(item.filename))
    with pytest.raises(ExportError, match="an AOTInductor package but not an mlpot model"):
        load(str(foreign))
    # mlpot's metadata but a damaged library inside
    damaged = tmp_path / "damaged.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(damaged, "w") as dst:
        for item in src.infolist():
            body = src.read(item.filename)
            dst.writestr(item, b"\0" * len(body) if item.filename.endswith(".so") else body)
    with pytest.raises(ExportError, match="the compiled model does not load"):
        load(str(damaged))
    shutil.copy(path, tmp_path / "ok.pt2")
    model = load(str(tmp_path / "ok.pt2"))
    with pytest.raises(ExportError, match="compiled for the CPU"):
        model.to("cuda")
    atoms = systems()["periodic"]
    data = T.to_data(atoms, model).as_dict()
    data[K.LOCAL_ATOMS] = torch.tensor([len(atoms) + 1])
    with pytest.raises(ValueError, match="local_atoms must be a count"):
        model(data)
    # a .pt2 given where a training checkpoint belongs: named as what it is
    assert file_kind(path) == "aoti"
    with pytest.raises(CheckpointError, match=r"exported \(compiled .pt2\) model, not a "
                                              "training checkpoint"):
        read_checkpoint(path)


def test_format_choice_and_export_errors(tmp_path, monkeypatch):
    assert format_of("model.pt2") == "aoti" and format_of("model.PT2") == "aoti"
    assert format_of("model.pt") == "torchscript"
    assert format_of("model.pt", "aoti") == "aoti"
    with pytest.raises(ExportError, match="unknown export format"):
        format_of("model.pt", "onnx")
    # without the compiled neighbor-list op: one line that says why and what to do
    import mlpot.aoti as aoti

    monkeypatch.setattr(aoti, "register_neighbor_op", lambda: None)
    with pytest.raises(ExportError, match="needs mlpot's compiled neighbor-list op"):
        export(small("egnn"), str(tmp_path / "m.pt2"))
    assert not (tmp_path / "m.pt2").exists()
    assert set(FAMILIES) <= set(available())


@slow
def test_mlpot_test_and_md_take_a_pt2(packages, tmp_path, capsys, monkeypatch):
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    scripted, path = packages("egnn")
    frames = []
    for atoms in list(systems().values())[:3]:  # labelled by the model itself, with an offset
        out = scripted(T.to_data(atoms, scripted).as_dict())
        out = {k: v.detach() for k, v in out.items()}
        atoms.calc = SinglePointCalculator(atoms, energy=float(out[K.ENERGY][0]) + 0.1,
                                           forces=out[K.FORCES].detach().numpy() + 0.01)
        frames.append(atoms)
    data = str(tmp_path / "data.xyz")
    write(data, frames, format="extxyz")
    metrics = []
    capsys.readouterr()  # what the fixture printed
    for model in (scripted.path, path):
        assert cli(["test", model, "--data", data, "--json"]) == 0
        metrics.append(json.loads(capsys.readouterr().out))
    for key, value in metrics[0].items():
        assert metrics[1][key] == pytest.approx(value, rel=1e-8, abs=1e-10), key
    structure = str(tmp_path / "water.xyz")
    write(structure, T.small_molecule("H2O"), format="extxyz")
    monkeypatch.chdir(tmp_path)  # mlpot md writes md_thermo.csv here
    assert cli(["md", path, structure, "--ensemble", "nve", "--steps", "3",
                "--no-progress"]) == 0
    assert (tmp_path / "md_thermo.csv").read_text().count("\n") >= 2
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(open(path, "rb").read()[:1000])
    capsys.readouterr()
    assert cli(["test", str(truncated), "--data", data]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "not an mlpot model" in err[0]
