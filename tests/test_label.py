"""`mlpot label`: labels equal the reference called directly (EMT with its stress as a virial,
PySCF on H2O), mlpot's readers read them back, a killed run resumes without recomputing
finished frames, failed frames are recorded and skipped, bad input is exit 2 and one line."""
import csv
import json
import os
import subprocess
import sys

import ase.io
import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

import mlpot.data
from mlpot import units
from mlpot.cli import main as cli
from mlpot.label import LabellerSpec, WorkersDied, label_file, side_files

# PySCF is not skipped when missing: the test extra installs it (pyproject: test includes pyscf)

HERE = os.path.dirname(os.path.abspath(__file__))
THIS = os.path.splitext(os.path.basename(__file__))[0]


class CountingEMT(EMT):
    """EMT that appends the frame_id of each frame it labels to the file ``log``, fails on
    frames whose info has fail=True, and kills its process (os._exit, as a kill would) when
    the file ``log + ".exit_at"`` holds a number and the log reaches that many lines (a file,
    not an argument, so that the resumed run has the same settings)."""

    def __init__(self, log=None, **kwargs):
        super().__init__(**kwargs)
        self.log = log

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        if atoms is not None and atoms.info.get("fail"):
            raise RuntimeError("this frame is meant to fail")
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{atoms.info.get('frame_id')}\n")
            if os.path.exists(self.log + ".exit_at"):
                with open(self.log) as f:
                    calls = sum(1 for _ in f)
                if calls >= int(open(self.log + ".exit_at").read()):
                    os._exit(9)
        super().calculate(atoms, properties, system_changes)


class NoIron(Calculator):
    """A calculator that is not EMT and fails on iron: found by the dry run."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if "Fe" in atoms.get_chemical_symbols():
            raise ValueError("no parameters for Fe")
        self.results = {"energy": 0.0, "forces": np.zeros((len(atoms), 3))}


def cu_frames(n=4):
    frames = []
    rng = np.random.default_rng(1)
    for k in range(n):
        a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((1, 1, 2))
        strain = np.eye(3) + rng.normal(0, 0.01, (3, 3))
        a.set_cell(a.cell.array @ strain, scale_atoms=True)
        a.positions += rng.normal(0, 0.05, a.positions.shape)
        a.info["frame_id"] = k
        frames.append(a)
    return frames


def water_frames(n=2):
    rng = np.random.default_rng(2)
    frames = []
    for k in range(n):
        a = molecule("H2O")
        a.positions += rng.normal(0, 0.03, (3, 3))
        a.info["frame_id"] = k
        frames.append(a)
    return frames


def run_cli(args, capsys):
    code = cli(["label"] + [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_emt_equals_emt_called_directly_and_reads_back(tmp_path, capsys):
    frames = cu_frames(3)
    cluster = bulk("Cu", "fcc", a=3.6, cubic=True)
    cluster.pbc = False
    cluster.cell = np.zeros((3, 3))
    cluster.positions += np.random.default_rng(3).normal(0, 0.05, (4, 3))
    frames.append(cluster)
    inp, out = tmp_path / "in.xyz", tmp_path / "out.xyz"
    ase.io.write(inp, frames)
    frames = ase.io.read(inp, index=":")  # the positions as written (extxyz: 8 decimals)
    code, stdout, _ = run_cli([inp, "-o", out, "--ase-calculator", "ase.calculators.emt:EMT"],
                              capsys)
    assert code == 0
    assert "labelled 4 of 4 frames" in stdout and "0 failed" in stdout
    assert not os.path.exists(side_files(str(out))[0])  # the progress file is gone
    labelled = ase.io.read(out, index=":")
    back = mlpot.data.read(str(out))
    assert len(labelled) == len(back) == 4
    for ref, lab, data in zip(frames, labelled, back):
        atoms = ref.copy()
        atoms.calc = EMT()
        e, f = atoms.get_potential_energy(), atoms.get_forces()
        np.testing.assert_allclose(lab.positions, ref.positions, atol=1e-8)
        assert lab.info["REF_energy"] == pytest.approx(e, abs=1e-10)
        # extxyz holds per-atom columns with 8 decimals (energy and virial: every digit)
        np.testing.assert_allclose(lab.arrays["REF_forces"], f, rtol=0, atol=1e-8)
        assert float(data.energy[0]) == pytest.approx(e, abs=1e-10)
        np.testing.assert_allclose(data.forces.numpy(), f, rtol=0, atol=1e-8)
        if ref.pbc.all():
            stress = atoms.get_stress(voigt=False)  # eV/A^3, ASE's sign
            virial = -stress * atoms.get_volume()
            assert np.abs(virial).max() > 1e-2  # a strained, rattled cell: a real test
            np.testing.assert_allclose(np.reshape(lab.info["REF_virial"], (3, 3)), virial,
                                       atol=1e-10)
            np.testing.assert_allclose(data.virial[0].numpy(), virial, atol=1e-10)
            np.testing.assert_allclose(data.stress[0].numpy(), stress, atol=1e-12)
        else:
            assert "REF_virial" not in lab.info
            assert data.virial is None or bool(np.isnan(data.virial.numpy()).all())


@pytest.mark.parametrize("method,charge,spin", [("pbe", 0, 0), ("hf", 1, 1)])
def test_pyscf_h2o_equals_pyscf_called_directly(tmp_path, capsys, method, charge, spin):
    from pyscf import dft, gto, scf

    frames = water_frames(2)
    inp, out = tmp_path / "h2o.xyz", tmp_path / "h2o_pbe.xyz"
    ase.io.write(inp, frames)
    frames = ase.io.read(inp, index=":")
    code, stdout, _ = run_cli([inp, "-o", out, "--labeller", "pyscf", "--method", method,
                               "--basis", "sto-3g", "--charge", charge, "--spin", spin], capsys)
    assert code == 0, stdout
    labelled = mlpot.data.read(str(out))
    # atomic unit of force, CODATA 2018: 8.2387235e-8 N = 51.42208 eV/A
    assert units.HARTREE_PER_BOHR_TO_EV_PER_A == pytest.approx(51.42208, rel=1e-6)
    for atoms, data in zip(frames, labelled):
        mol = gto.M(atom=[(s, tuple(p)) for s, p in zip(atoms.get_chemical_symbols(),
                                                        atoms.positions)],
                    unit="Angstrom", basis="sto-3g", charge=charge, spin=spin, verbose=0)
        if method == "hf":
            mf = scf.UHF(mol)  # H2O+ (a doublet): unrestricted
        else:
            mf = dft.RKS(mol)
            mf.xc = method
        mf.conv_tol = 1e-9
        e = mf.kernel()
        grad = mf.nuc_grad_method().kernel()
        assert mf.converged
        assert float(data.energy[0]) == pytest.approx(e * 27.211386, abs=2e-4)  # eV, ~1e-8 rel
        assert float(data.energy[0]) == pytest.approx(e * units.HARTREE_TO_EV, abs=1e-6)
        np.testing.assert_allclose(data.forces.numpy(),
                                   -grad * units.HARTREE_PER_BOHR_TO_EV_PER_A, atol=1e-5)
        assert np.abs(grad).max() > 1e-3  # rattled: nonzero forces to compare


def test_pyscf_scf_not_converged_is_a_recorded_failure(tmp_path, capsys):
    inp, out = tmp_path / "h2o.xyz", tmp_path / "h2o_hf.xyz"
    ase.io.write(inp, water_frames(1))
    code, stdout, _ = run_cli([inp, "-o", out, "--labeller", "pyscf", "--method", "hf",
                               "--basis", "sto-3g", "--max-cycle", "1"], capsys)
    assert code == 0
    assert "labelled 0 of 1 frames" in stdout and "1 failed" in stdout
    rows = list(csv.DictReader(open(side_files(str(out))[1])))
    assert [r["index"] for r in rows] == ["0"] and "SCF not converged" in rows[0]["reason"]


def test_failing_frame_is_recorded_and_skipped(tmp_path, capsys):
    frames = cu_frames(4)
    frames[1].info["fail"] = True
    inp, out = tmp_path / "in.xyz", tmp_path / "out.xyz"
    ase.io.write(inp, frames)
    code, stdout, _ = run_cli([inp, "-o", out, "--ase-calculator", f"{THIS}:CountingEMT"],
                              capsys)  # no log: EMT, and fail=True frames raise
    assert code == 0
    assert "labelled 3 of 4 frames" in stdout and "1 failed" in stdout
    labelled = ase.io.read(out, index=":")
    assert [a.info["frame_id"] for a in labelled] == [0, 2, 3]
    rows = list(csv.DictReader(open(side_files(str(out))[1])))
    assert len(rows) == 1 and rows[0]["index"] == "1"
    assert "meant to fail" in rows[0]["reason"] and rows[0]["composition"] == "Cu8"


def test_killed_run_resumes_without_recomputing(tmp_path, capsys):
    frames = cu_frames(6)
    inp = tmp_path / "in.xyz"
    ase.io.write(inp, frames)
    out, log = tmp_path / "out.xyz", tmp_path / "calls.log"
    calc = [f"--ase-calculator={THIS}:CountingEMT", "--calc-kwargs", json.dumps({"log": str(log)})]
    (tmp_path / "calls.log.exit_at").write_text("3")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "mlpot.cli", "label", str(inp), "-o", str(out)]
                          + calc, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr  # killed at its third frame
    assert not out.exists()
    progress = side_files(str(out))[0]
    assert len(open(progress).read().strip().split("\n")) == 3  # header + 2 finished frames
    assert open(log).read().split() == ["0", "1", "2"]

    with open(progress, "a") as f:  # a kill while writing a line leaves it torn
        f.write('{"index": 4, "labels": {"energy": 1.')
    log.write_text("")
    os.remove(tmp_path / "calls.log.exit_at")
    code, stdout, _ = run_cli([inp, "-o", out] + calc, capsys)
    assert code == 0 and "2 from an earlier run" in stdout
    assert open(log).read().split() == ["2", "3", "4", "5"]  # 0 and 1 were not recomputed
    assert not os.path.exists(progress)

    fresh = tmp_path / "fresh.xyz"
    code, _, _ = run_cli([inp, "-o", fresh, "--ase-calculator", "ase.calculators.emt:EMT"],
                         capsys)
    assert code == 0
    assert out.read_text() == fresh.read_text()  # the same file, byte for byte


def test_a_dead_worker_is_one_line_and_the_rerun_resumes(tmp_path, capsys):
    inp, out, log = tmp_path / "in.xyz", tmp_path / "out.xyz", tmp_path / "calls.log"
    ase.io.write(inp, cu_frames(8))
    spec = LabellerSpec(kind="ase", calculator=f"{THIS}:CountingEMT",
                        calc_kwargs={"log": str(log)})
    (tmp_path / "calls.log.exit_at").write_text("4")
    with pytest.raises(WorkersDied, match="run the same command again"):
        label_file(str(inp), str(out), spec, workers=2, log=lambda s: None)
    progress = side_files(str(out))[0]
    done = [json.loads(line)["index"] for line in open(progress).read().split("\n")[1:] if line]
    assert 1 <= len(done) <= 3 and not out.exists()
    os.remove(tmp_path / "calls.log.exit_at")
    log.write_text("")
    summary = label_file(str(inp), str(out), spec, workers=2, log=lambda s: None)
    assert summary["labelled"] == 8 and summary["reused"] == len(done)
    assert sorted(int(k) for k in log.read_text().split()) == sorted(set(range(8)) - set(done))
    fresh = tmp_path / "fresh.xyz"
    label_file(str(inp), str(fresh), LabellerSpec(kind="ase", calculator="ase.calculators.emt:EMT"),
               log=lambda s: None)
    assert out.read_text() == fresh.read_text()


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    inp, out = tmp_path / "in.xyz", tmp_path / "out.xyz"
    ase.io.write(inp, cu_frames(2))
    spec = LabellerSpec(kind="ase", calculator="ase.calculators.emt:EMT")
    progress = side_files(str(out))[0]
    with open(progress, "w") as f:
        f.write(json.dumps({"header": {"format": 1, "input_sha256": "x", "frames": 2,
                                       "labeller": spec.signature()}}) + "\n")
    code, _, err = run_cli([inp, "-o", out, "--ase-calculator", "ase.calculators.emt:EMT"],
                           capsys)
    assert code == 2 and "other input or settings" in err and len(err.strip().split("\n")) == 1


def test_workers_give_the_same_labels(tmp_path):
    inp = tmp_path / "in.xyz"
    ase.io.write(inp, cu_frames(4))
    spec = LabellerSpec(kind="ase", calculator="ase.calculators.emt:EMT")
    one, two = tmp_path / "one.xyz", tmp_path / "two.xyz"
    label_file(str(inp), str(one), spec, workers=1, log=lambda s: None)
    summary = label_file(str(inp), str(two), spec, workers=2, log=lambda s: None)
    assert summary["labelled"] == 4
    assert one.read_text() == two.read_text()


def test_model_labeller_equals_the_ase_calculator(tmp_path, capsys):
    import torch

    from mlpot.ase import MLPotCalculator
    from mlpot.export import export
    from mlpot.models import build_model

    torch.manual_seed(0)
    model = build_model("egnn", ["H", "O"], cutoff=4.0, dtype="float64", hidden=8,
                        edge_hidden=8, num_layers=1, readout_hidden=8).eval()
    path = str(tmp_path / "model.pt")
    export(model, path)
    frames = water_frames(2)
    inp, out = tmp_path / "in.xyz", tmp_path / "out.xyz"
    ase.io.write(inp, frames)
    frames = ase.io.read(inp, index=":")
    code, _, _ = run_cli([inp, "-o", out, "--model", path], capsys)
    assert code == 0
    back = mlpot.data.read(str(out))
    calc = MLPotCalculator(path)
    for atoms, data in zip(frames, back):
        atoms.calc = calc
        assert float(data.energy[0]) == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
        np.testing.assert_allclose(data.forces.numpy(), atoms.get_forces(), rtol=0, atol=1e-8)
    # and its atomic energies (distillation's per-atom targets) under the prefix
    for atoms, labelled in zip(frames, ase.io.read(out, index=":")):
        atoms.calc = calc
        np.testing.assert_allclose(labelled.arrays["REF_atomic_energies"],
                                   atoms.get_potential_energies(), rtol=0, atol=1e-7)
    # an element outside the model's type map: before any work
    ase.io.write(inp, bulk("Cu", "fcc", a=3.6))
    code, _, err = run_cli([inp, "-o", tmp_path / "cu.xyz", "--model", path], capsys)
    assert code == 2 and "no type for Cu" in err


@pytest.mark.parametrize("case", ["no_module", "no_class", "periodic_pyscf", "emt_element",
                                  "dry_run", "functional", "basis", "spin", "calc_kwargs"])
def test_bad_input_is_exit_2_and_one_line_before_any_work(tmp_path, capsys, case):
    inp, out = tmp_path / "in.xyz", tmp_path / "out.xyz"
    structures = {"periodic_pyscf": [bulk("Cu", "fcc", a=3.6)],
                  "emt_element": cu_frames(1) + [bulk("Si", "diamond", a=5.43)],
                  "dry_run": [molecule("H2O"), bulk("Fe", "bcc", a=2.87)],
                  "basis": [molecule("H2O"), bulk("U", "fcc", a=5.0, cubic=False)]}
    frames = structures.get(case, water_frames(1))
    if case == "basis":
        frames[1].pbc = False
        frames[1].cell = np.zeros((3, 3))
    ase.io.write(inp, frames)
    args = {"no_module": ["--ase-calculator", "ase.calculators.nosuch:EMT"],
            "no_class": ["--ase-calculator", "ase.calculators.emt:NoSuch"],
            "periodic_pyscf": ["--labeller", "pyscf", "--basis", "sto-3g"],
            "emt_element": ["--ase-calculator", "ase.calculators.emt:EMT"],
            "dry_run": ["--ase-calculator", f"{THIS}:NoIron"],
            "functional": ["--labeller", "pyscf", "--method", "pbez"],
            "basis": ["--labeller", "pyscf", "--basis", "sto-3g"],
            "spin": ["--labeller", "pyscf", "--basis", "sto-3g", "--spin", "1"],
            "calc_kwargs": ["--ase-calculator", "ase.calculators.emt:EMT", "--calc-kwargs",
                            "{bad"]}[case]
    expect = {"no_module": "cannot import ase.calculators.nosuch", "no_class": "has no NoSuch",
              "periodic_pyscf": "molecules only", "emt_element": "no parameters for Si",
              "dry_run": "dry run", "functional": "does not know this functional",
              "basis": "basis", "spin": "spin", "calc_kwargs": "not JSON"}[case]
    code, _, err = run_cli([inp, "-o", out] + args, capsys)
    assert code == 2
    assert len(err.strip().split("\n")) == 1 and err.startswith("mlpot label: error:")
    assert expect in err
    assert not out.exists()
    if case != "dry_run":  # the dry run is the first work; everything else comes before it
        assert not os.path.exists(side_files(str(out))[0])
