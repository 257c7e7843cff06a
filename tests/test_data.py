"""The data layer: readers (extxyz/ASE formats, DeePMD npy), validation, batching."""
import os

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.io import write

from mlpot import keys as K
from mlpot.data import AtomicData, AtomicDataset, DataError, TypeMap, read, read_ase, read_deepmd


def emt_frames(n=4, seed=0):
    """Periodic Cu frames labelled by ASE's EMT (energy, forces, stress)."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        atoms.set_cell(atoms.cell * (1 + 0.01 * k), scale_atoms=True)
        atoms.calc = EMT()
        e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        atoms.calc = None
        atoms.info["REF_energy"] = e
        atoms.arrays["REF_forces"] = f
        atoms.info["REF_stress"] = s
        frames.append(atoms)
    return frames


@pytest.fixture
def xyz_file(tmp_path):
    frames = emt_frames()
    path = tmp_path / "cu.xyz"
    write(path, frames, format="extxyz")
    return str(path), frames


def test_extxyz_labels_round_trip(xyz_file):
    path, frames = xyz_file
    data = read(path, type_map=["Cu"], require=("energy", "forces", "stress"))
    assert len(data) == len(frames)
    for d, a in zip(data, frames):
        assert d.energy.dtype == torch.float64
        assert float(d.energy[0]) == pytest.approx(a.info["REF_energy"], rel=1e-7)
        np.testing.assert_allclose(d.forces.numpy(), a.arrays["REF_forces"], rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(d.positions.numpy(), a.positions, atol=1e-7)
        np.testing.assert_allclose(d.cell[0].numpy(), a.cell.array, atol=1e-9)
        xx, yy, zz, yz, xz, xy = a.info["REF_stress"]
        np.testing.assert_allclose(d.stress[0].numpy(),
                                   [[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]], rtol=1e-6)
        # virial = -stress * volume (ASE's sign)
        np.testing.assert_allclose(d.virial[0].numpy(), -d.stress[0].numpy() * a.get_volume())
        assert d.atom_types.tolist() == [0] * len(a)
        assert d.sources[0].endswith("frame %d" % frames.index(a))


def test_calculator_results_and_named_keys(tmp_path):
    atoms = molecule("H2O")
    atoms.center(vacuum=3.0)
    atoms.info["my_E"] = -14.2
    atoms.arrays["my_F"] = np.arange(9.0).reshape(3, 3) * 0.01
    path = tmp_path / "w.xyz"
    write(path, atoms, format="extxyz")
    d = read_ase(str(path), energy_key="my_E", forces_key="my_F", require=("energy", "forces"))[0]
    assert float(d.energy[0]) == pytest.approx(-14.2)
    assert not d.pbc.any()
    # A SinglePointCalculator's results are found without naming a key.
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms2 = molecule("CH4")
    atoms2.calc = SinglePointCalculator(atoms2, energy=-24.0, forces=np.ones((5, 3)))
    write(tmp_path / "m.xyz", atoms2, format="extxyz")
    d2 = read(str(tmp_path / "m.xyz"), require=("energy", "forces"))[0]
    assert float(d2.energy[0]) == pytest.approx(-24.0)
    assert torch.allclose(d2.forces, torch.ones(5, 3, dtype=torch.float64))


def test_units_are_converted(tmp_path):
    atoms = molecule("H2O")
    atoms.info["REF_energy"] = -76.0  # Hartree
    atoms.arrays["REF_forces"] = np.full((3, 3), 0.01)  # Hartree/Bohr
    write(tmp_path / "h.xyz", atoms, format="extxyz")
    d = read(str(tmp_path / "h.xyz"), energy_unit="Hartree", length_unit="Bohr")[0]
    assert float(d.energy[0]) == pytest.approx(-76.0 * 27.211386, rel=1e-6)
    assert float(d.forces[0, 0]) == pytest.approx(0.01 * 27.211386 / 0.529177, rel=1e-5)
    np.testing.assert_allclose(d.positions.numpy(), atoms.positions * 0.529177210903)
    with pytest.raises(DataError, match="unknown energy unit"):
        read(str(tmp_path / "h.xyz"), energy_unit="Ry")


def write_deepmd(root, frames, type_map=("O", "H"), virial=True, nopbc=False):
    """Write frames as a DeePMD npy system (one set)."""
    os.makedirs(root / "set.000", exist_ok=True)
    z_of = {s: k for k, s in enumerate(type_map)}
    types = [z_of[s] for s in frames[0].get_chemical_symbols()]
    np.savetxt(root / "type.raw", types, fmt="%d")
    (root / "type_map.raw").write_text("\n".join(type_map) + "\n")
    nf = len(frames)
    np.save(root / "set.000" / "coord.npy", np.stack([a.positions for a in frames]).reshape(nf, -1))
    if nopbc:
        (root / "nopbc").write_text("")
    else:
        np.save(root / "set.000" / "box.npy", np.stack([a.cell.array for a in frames]).reshape(nf, 9))
    np.save(root / "set.000" / "energy.npy", np.array([a.info["E"] for a in frames]))
    np.save(root / "set.000" / "force.npy", np.stack([a.arrays["F"] for a in frames]).reshape(nf, -1))
    if virial:
        np.save(root / "set.000" / "virial.npy", np.stack([a.info["V"] for a in frames]).reshape(nf, 9))


def water_frames(n=3, seed=0):
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        a = molecule("H2O")
        a.set_cell([6.0, 6.5, 7.0])
        a.pbc = True
        a.positions += 3.0 + rng.normal(0, 0.02, (3, 3))
        a.info["E"] = float(rng.normal(-14, 0.1))
        a.arrays["F"] = rng.normal(0, 1, (3, 3))
        a.info["V"] = rng.normal(0, 1, (3, 3))
        frames.append(a)
    return frames


def test_deepmd_reader(tmp_path):
    frames = water_frames()
    write_deepmd(tmp_path / "sys0", frames)
    write_deepmd(tmp_path / "sys1", frames[:2])
    data = read(str(tmp_path), type_map=["H", "O"], require=("energy", "forces", "virial"))
    assert len(data) == 5  # both systems found below the folder
    d = data[0]
    assert d.atomic_numbers.tolist() == [8, 1, 1]
    assert d.atom_types.tolist() == [1, 0, 0]  # through the user's type map, not DeePMD's
    assert float(d.energy[0]) == pytest.approx(frames[0].info["E"])
    np.testing.assert_allclose(d.forces.numpy(), frames[0].arrays["F"])
    np.testing.assert_allclose(d.virial[0].numpy(), frames[0].info["V"])
    vol = 6.0 * 6.5 * 7.0
    np.testing.assert_allclose(d.stress[0].numpy(), -frames[0].info["V"] / vol)
    assert d.pbc.all()


def test_deepmd_nopbc_and_errors(tmp_path):
    frames = water_frames(2)
    write_deepmd(tmp_path / "mol", frames, nopbc=True, virial=False)
    d = read_deepmd(str(tmp_path / "mol"))[0]
    assert not d.pbc.any()
    with pytest.raises(DataError, match="virial"):
        read_deepmd(str(tmp_path / "mol"), require=("virial",))
    # an atom count that does not match type.raw
    np.savetxt(tmp_path / "mol" / "type.raw", [0, 1, 1, 1], fmt="%d")
    with pytest.raises(DataError, match="3 atoms per frame but type.raw lists 4"):
        read_deepmd(str(tmp_path / "mol"))
    # no type_map.raw and no type map given
    np.savetxt(tmp_path / "mol" / "type.raw", [0, 1, 1], fmt="%d")
    os.remove(tmp_path / "mol" / "type_map.raw")
    with pytest.raises(DataError, match="no type_map.raw"):
        read_deepmd(str(tmp_path / "mol"))
    assert read_deepmd(str(tmp_path / "mol"), type_map=["O", "H"])[0].atomic_numbers.tolist() == [8, 1, 1]
    with pytest.raises(DataError, match="no type.raw"):
        read_deepmd(str(tmp_path / "mol" / "set.000"))
    with pytest.raises(DataError, match="apply to ASE formats"):
        read(str(tmp_path / "mol"), energy_key="E", type_map=["O", "H"])


class _CreatesAFile:
    """Unpickling this runs code: it creates the file `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_deepmd_bad_type_raw_is_one_line_error(tmp_path):
    from mlpot.errors import UserError, exit_code_of

    write_deepmd(tmp_path / "w", water_frames(1))
    type_raw = tmp_path / "w" / "type.raw"
    for text, what in (("0\n1.5\n1\n", "'1.5' (entry 2) is not an integer"),
                       ("O\nH\nH\n", "'O' (entry 1) is not an integer"),
                       ("\n", "empty")):
        type_raw.write_text(text)
        with pytest.raises(DataError) as info:
            read_deepmd(str(tmp_path / "w"))
        msg = str(info.value)
        assert msg.startswith(f"{type_raw}: {what}") and "\n" not in msg
        assert "integer type index" in msg
        assert isinstance(info.value, UserError) and exit_code_of(info.value) == 2


def test_deepmd_object_and_non_numeric_npy_are_refused_unpickled(tmp_path):
    write_deepmd(tmp_path / "w", water_frames(1))
    energy = tmp_path / "w" / "set.000" / "energy.npy"
    marker = tmp_path / "pwned"
    np.save(energy, np.array([_CreatesAFile(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(DataError) as info:
        read_deepmd(str(tmp_path / "w"))
    msg = str(info.value)
    assert msg.startswith(f"{energy}: an object array") and "\n" not in msg
    assert "numpy.save" in msg
    assert not marker.exists()  # nothing was unpickled
    np.save(energy, np.array(["-14.0"]))
    with pytest.raises(DataError, match=r"energy\.npy: an array of <U5 values; expected a numeric"):
        read_deepmd(str(tmp_path / "w"))
    energy.write_bytes(b"not an npy file")
    with pytest.raises(DataError, match=r"energy\.npy: .*expected a numeric array"):
        read_deepmd(str(tmp_path / "w"))


def _write_one(tmp_path, atoms, name="bad.xyz"):
    path = tmp_path / name
    write(path, atoms, format="extxyz")
    return str(path)


def test_missing_labels_are_named(tmp_path):
    frames = emt_frames(3)
    del frames[2].info["REF_energy"]
    path = _write_one(tmp_path, frames)
    with pytest.raises(DataError, match=r"bad.xyz:frame 2: no energy found"):
        read(path, require=("energy", "forces"))
    assert len(read(path, require=("forces",))) == 3  # not asked for: fine
    with pytest.raises(DataError, match="no energy under the key 'E_dft'"):
        read(path, energy_key="E_dft")
    with pytest.raises(DataError, match="unknown label"):
        read(path, require=("energies",))


def test_nan_and_inf_are_rejected(tmp_path):
    frames = emt_frames(2)
    frames[1].arrays["REF_forces"][3, 1] = np.nan
    with pytest.raises(DataError, match=r"frame 1: forces contain NaN"):
        read(_write_one(tmp_path, frames))
    frames = emt_frames(2)
    frames[0].info["REF_energy"] = np.inf
    with pytest.raises(DataError, match=r"frame 0: energy contain NaN or infinite"):
        read(_write_one(tmp_path, frames, "b2.xyz"))


def test_wrong_atom_count_unknown_element_zero_volume_close_atoms(tmp_path):
    a = emt_frames(1)[0]
    d = AtomicData.from_ase(a, forces=np.zeros((len(a) - 1, 3)), source="x")
    from mlpot.data import check_structure

    with pytest.raises(DataError, match=r"forces have shape \(7, 3\); expected \(8, 3\)"):
        check_structure(d, "x")
    with pytest.raises(DataError, match=r"element\(s\) \['Cu'\] not in the type map \['O', 'H'\]"):
        read(_write_one(tmp_path, [a]), type_map=["O", "H"])
    flat = Atoms("H2", positions=[[0, 0, 0], [0.0, 0, 1.0]], cell=[[3, 0, 0], [0, 3, 0], [0, 0, 0]],
                 pbc=True)
    with pytest.raises(DataError, match="periodic along xyz but its lattice vectors there span zero"):
        read(_write_one(tmp_path, [flat], "flat.xyz"))
    flat.pbc = [True, True, False]  # a slab: fine
    assert len(read(_write_one(tmp_path, [flat], "slab.xyz"))) == 1
    close = Atoms("H2", positions=[[0, 0, 0], [0.0, 0, 0.1]])
    with pytest.raises(DataError, match="atoms 0 and 1 are 0.100 A apart"):
        read(_write_one(tmp_path, [close], "close.xyz"))
    # across a periodic boundary too
    close_pbc = Atoms("H2", positions=[[0, 0, 0.05], [0.0, 0, 4.95]], cell=[5, 5, 5], pbc=True)
    with pytest.raises(DataError, match="0.100 A apart"):
        read(_write_one(tmp_path, [close_pbc], "close2.xyz"))
    assert len(read(_write_one(tmp_path, [close], "close3.xyz"), min_distance=None)) == 1


def test_type_map():
    tm = TypeMap(["O", "H"])
    assert tm.types([1, 8, 8]).tolist() == [1, 0, 0]
    assert TypeMap.from_atomic_numbers([8, 1, 6, 1]).symbols == ["H", "C", "O"]
    with pytest.raises(DataError, match="not a chemical element"):
        TypeMap(["Ox"])
    with pytest.raises(DataError, match="listed twice"):
        TypeMap(["H", "H"])


def test_collate_split_and_neighbors(xyz_file):
    path, _ = xyz_file
    cu = read(path, type_map=["Cu"])
    mol = AtomicData.from_ase(molecule("CH4"), energy=-1.0)
    items = [cu[0].with_neighbors(4.0), mol.with_neighbors(4.0), cu[1].with_neighbors(4.0)]
    b = AtomicData.collate(items)
    assert b.num_structures == 3
    assert b.ptr.tolist() == [0, 8, 13, 21]
    assert b.batch.tolist() == [0] * 8 + [1] * 5 + [2] * 8
    # forces missing for the molecule: NaN there, values elsewhere
    assert torch.isnan(b.forces[8:13]).all() and torch.isfinite(b.forces[:8]).all()
    assert torch.isnan(b.stress[1]).all()
    # the batched neighbor list equals the collated per-structure ones
    direct = AtomicData.collate([cu[0], mol, cu[1]]).with_neighbors(4.0)
    assert torch.equal(direct.edge_index, b.edge_index)
    assert torch.equal(direct.edge_cell_shift, b.edge_cell_shift)
    # edge vectors never cross structures and lie inside the cutoff
    v = b.edge_vectors()
    assert float(v.norm(dim=1).max()) < 4.0
    assert torch.equal(b.batch[b.edge_index[0]], b.batch[b.edge_index[1]])
    # split gives back the pieces
    back = b.split()
    for x, y in zip(back, items):
        assert torch.equal(x.positions, y.positions)
        assert torch.equal(x.edge_index, y.edge_index)
    d = b.as_dict()
    assert d[K.EDGE_INDEX].shape[0] == 2 and d[K.CELL].shape == (3, 3, 3)
    atoms = b.to_ase()
    assert atoms[0].get_potential_energy() == pytest.approx(float(cu[0].energy[0]))
    assert b.to(dtype=torch.float32).positions.dtype == torch.float32
    assert b.to(dtype=torch.float32).energy.dtype == torch.float64


def test_dataset_and_loader(xyz_file):
    path, _ = xyz_file
    ds = AtomicDataset(read(path), TypeMap(["Cu"]), cutoff=3.0)
    assert ds.has("stress") and ds.has("virial") and ds.has("forces")
    batches = list(ds.loader(batch_size=3))
    assert [bt.num_structures for bt in batches] == [3, 1]
    assert batches[0].edge_index.shape[1] == 3 * 8 * 12  # fcc: 12 nearest neighbors < 3 A
    with pytest.raises(DataError, match="no structures"):
        AtomicDataset([], TypeMap(["Cu"]), 3.0, name="validation")


def test_virial_only_file_satisfies_a_stress_requirement(tmp_path, xyz_file):
    # MACE-style files (mlearn, for one) carry REF_virial and no stress: training with a stress
    # loss must read them, with stress = -virial / volume
    _, frames = xyz_file
    for a in frames:
        stress = a.info.pop("REF_stress")
        xx, yy, zz, yz, xz, xy = stress
        s = np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
        a.info["REF_virial"] = (-s * a.get_volume()).reshape(-1)
    path = tmp_path / "virial.xyz"
    write(path, frames, format="extxyz")
    data = read(str(path), type_map=["Cu"], require=("energy", "forces", "stress"))
    for d, a in zip(data, frames):
        np.testing.assert_allclose(d.stress[0].numpy() * a.get_volume(),
                                   -np.reshape(a.info["REF_virial"], (3, 3)), rtol=1e-6)
