"""Readers: every format ASE reads (extxyz first) and DeePMD npy sets, to ``AtomicData``.

Labels are looked up under the keys the user names, else under the usual ones
(``REF_energy``, ``energy``, ... and an attached ASE calculator's results). Units can be
converted on read (``energy_unit``, ``length_unit``); inside mlpot everything is eV and Angstrom.
Every frame is checked (``validate.check_structure``); a bad one raises ``DataError`` naming the
file and the frame.
"""
from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from .. import units
from .atomic_data import AtomicData
from .errors import DataError
from .type_map import TypeMap
from .validate import check_structure

ENERGY_KEYS = ("REF_energy", "energy", "Energy", "DFT_energy", "dft_energy", "total_energy",
               "free_energy")
FORCES_KEYS = ("REF_forces", "forces", "force", "Forces", "DFT_forces", "dft_forces")
STRESS_KEYS = ("REF_stress", "stress", "Stress", "DFT_stress", "dft_stress")
VIRIAL_KEYS = ("REF_virial", "virial", "Virial", "DFT_virial", "dft_virial")

ENERGY_UNITS_TO_EV = {
    "eV": 1.0,
    "meV": 1e-3,
    "Hartree": units.HARTREE_TO_EV,
    "Ha": units.HARTREE_TO_EV,
    "kcal/mol": 1.0 / units.EV_TO_KCAL_PER_MOL,
    "kJ/mol": units.KJ_PER_MOL_TO_EV,
}
LENGTH_UNITS_TO_ANGSTROM = {"A": 1.0, "Angstrom": 1.0, "nm": units.NM_TO_ANGSTROM,
                            "Bohr": units.BOHR_TO_ANGSTROM}

LABELS = ("energy", "forces", "stress", "virial")


def _unit_factor(table: Dict[str, float], unit: str, what: str) -> float:
    if unit not in table:
        raise DataError(f"unknown {what} unit '{unit}'; use one of {sorted(table)}")
    return table[unit]


def _check_require(require: Sequence[str]) -> None:
    for r in require:
        if r not in LABELS:
            raise DataError(f"require: unknown label '{r}'; use some of {list(LABELS)}")


def _from_calc(atoms, name):
    calc = atoms.calc
    if calc is None or not hasattr(calc, "results"):
        return None
    return calc.results.get(name)


def _find(atoms, user_key, candidates, where, per_atom, calc_name, label, frame):
    """The label's value from atoms.info / atoms.arrays / the calculator, or None."""
    store = atoms.arrays if per_atom else atoms.info
    if user_key is not None:
        if user_key in store:
            return store[user_key]
        value = _from_calc(atoms, user_key)
        if value is not None:
            return value
        present = sorted(k for k in store if k not in ("numbers", "positions"))
        raise DataError(
            f"{frame}: no {label} under the key '{user_key}' you named; "
            f"{'per-atom arrays' if per_atom else 'info keys'} present: {present}")
    for key in candidates:
        if key in store:
            return store[key]
    return _from_calc(atoms, calc_name)


def _as_3x3(value, frame: str, label: str) -> np.ndarray:
    a = np.asarray(value, dtype=np.float64).reshape(-1)
    if a.size == 9:
        return a.reshape(3, 3)
    if a.size == 6:  # Voigt order xx yy zz yz xz xy
        xx, yy, zz, yz, xz, xy = a
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    raise DataError(f"{frame}: {label} has {a.size} numbers; expected 9 (3x3) or 6 (Voigt)")


def read_ase(
    path: str,
    index: Union[str, int, slice] = ":",
    format: Optional[str] = None,
    type_map: Optional[Union[TypeMap, Sequence[str]]] = None,
    energy_key: Optional[str] = None,
    forces_key: Optional[str] = None,
    stress_key: Optional[str] = None,
    virial_key: Optional[str] = None,
    require: Sequence[str] = (),
    energy_unit: str = "eV",
    length_unit: str = "A",
    min_distance: Optional[float] = 0.5,
    energy_weight_key: Optional[str] = None,
    forces_weight_key: Optional[str] = None,
    atomic_energies_key: Optional[str] = None,
    hessian_key: Optional[str] = None,
) -> List[AtomicData]:
    """Read any file ASE reads (extxyz, xyz, traj, db, POSCAR/OUTCAR, cif, ...).

    Args:
        index: frames to read, as in ``ase.io.read`` (default all).
        type_map: elements of the model types; when given, an element outside it is an error
            and ``atom_types`` is set.
        energy_key, forces_key, stress_key, virial_key: where the labels are; default: the usual
            keys (``REF_energy``, ``energy``, ...) or the attached calculator's results.
        require: labels that every frame must have, e.g. ``("energy", "forces")``.
        energy_unit, length_unit: units of the file (converted to eV and Angstrom).
        min_distance: Angstrom; atoms closer than this are an error (None: no check).
        energy_weight_key, forces_weight_key: per-frame loss weights (numbers >= 0 in each
            frame's ``info``; every frame must have them when the key is named).
        atomic_energies_key: a per-atom array of energies (eV before ``energy_unit``; a
            teacher's, for distillation); a frame without it has no such label.
        hessian_key: a per-atom array of 9N numbers, the Hessian rows of each atom (eV/A^2
            before the units; ``mlpot.hessian``: a teacher's, for Hessian distillation); NaN
            rows are unlabelled; a frame without it has no such label.
    """
    import ase.io

    _check_require(require)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    e_f = _unit_factor(ENERGY_UNITS_TO_EV, energy_unit, "energy")
    l_f = _unit_factor(LENGTH_UNITS_TO_ANGSTROM, length_unit, "length")
    try:
        frames = ase.io.read(path, index=index, format=format)
    except Exception as err:  # noqa: BLE001 - re-raised with the file's name
        raise DataError(f"{path}: ASE could not read it ({type(err).__name__}: {err}); "
                        "check the file or pass format=...") from err
    if not isinstance(frames, list):
        frames = [frames]
    if not frames:
        raise DataError(f"{path}: no frames (index={index!r})")
    tm = _type_map(type_map)
    out = []
    for k, atoms in enumerate(frames):
        where = f"{path}:frame {k}"
        labels = {
            "energy": _find(atoms, energy_key, ENERGY_KEYS, where, False, "energy", "energy", where),
            "forces": _find(atoms, forces_key, FORCES_KEYS, where, True, "forces", "forces", where),
            "stress": _find(atoms, stress_key, STRESS_KEYS, where, False, "stress", "stress", where),
            "virial": _find(atoms, virial_key, VIRIAL_KEYS, where, False, "virial", "virial", where),
        }
        # a virial gives the stress (``_make``), so it satisfies a stress requirement
        missing = [r for r in require if labels[r] is None
                   and not (r == "stress" and labels["virial"] is not None)]
        if missing:
            hint = ("; data without forces: set loss.forces: 0 to train on energies alone, or "
                    "let an energy-only committee give the forces (`mlpot distill`, mode: "
                    "ensemble)") if "forces" in missing else ""
            raise DataError(
                f"{where}: no {' or '.join(missing)} found (looked for "
                f"{_looked_for(missing)} and the calculator's results); name the key with "
                f"{', '.join(m + '_key' for m in missing)}=..., or drop the frame{hint}")
        data = _make(atoms.positions * l_f, atoms.numbers, atoms.cell.array * l_f, atoms.pbc,
                     labels, e_f, l_f, where)
        for name, key in (("energy_weight", energy_weight_key),
                          ("forces_weight", forces_weight_key)):
            if key is not None:
                setattr(data, name, _weight(atoms.info, key, where))
        if atomic_energies_key is not None and atomic_energies_key in atoms.arrays:
            data.atomic_energies = _atomic_energies(atoms.arrays[atomic_energies_key], e_f,
                                                    atomic_energies_key, where)
        if hessian_key is not None and hessian_key in atoms.arrays:
            data.hessian = _hessian(atoms.arrays[hessian_key], len(atoms), e_f / l_f ** 2,
                                    hessian_key, where)
        out.append(_finish(data, tm, where, min_distance))
    return out


def _weight(info, key: str, where: str):
    """A frame's loss weight from ``info[key]``: a finite number >= 0, else a DataError."""
    import torch

    value = info.get(key)
    try:
        w = float(np.asarray(value, dtype=np.float64).reshape(-1)[0]) if value is not None \
            else None
    except (TypeError, ValueError, IndexError):
        w = None
    if w is None or not np.isfinite(w) or w < 0:
        raise DataError(f"{where}: the loss weight {key} = {value!r} is missing or not a number "
                        ">= 0; give every frame one, or remove the *_weight_key option")
    return torch.tensor([w], dtype=torch.float64)


def _atomic_energies(values, e_f: float, key: str, where: str):
    """A frame's per-atom energy labels [N] (float64, eV), finite, else a DataError."""
    import torch

    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise DataError(f"{where}: {key} holds a value that is not a finite number; fix the "
                        "file or drop the frame")
    return torch.as_tensor(a * e_f)


def _hessian(values, n_atoms: int, factor: float, key: str, where: str):
    """A frame's Hessian label, flattened [(3N)^2] (float64, eV/A^2; NaN rows unlabelled),
    else a DataError."""
    import torch

    from ..hessian import array_to_matrix

    try:
        m = array_to_matrix(values, n_atoms, where, key)
    except ValueError as err:
        raise DataError(str(err)) from None
    return torch.as_tensor(m.reshape(-1) * factor)


def _looked_for(missing):
    table = {"energy": ENERGY_KEYS, "forces": FORCES_KEYS, "stress": STRESS_KEYS,
             "virial": VIRIAL_KEYS}
    return ", ".join(k for m in missing for k in table[m][:3])


def _make(positions, numbers, cell, pbc, labels, e_f, l_f, where) -> AtomicData:
    n = len(numbers)
    energy, forces, stress, virial = (labels[k] for k in LABELS)
    if energy is not None:
        e = np.asarray(energy, dtype=np.float64).reshape(-1)
        if e.size != 1:
            raise DataError(f"{where}: energy has {e.size} values; expected one per frame")
        energy = float(e[0]) * e_f
    if forces is not None:
        forces = np.asarray(forces, dtype=np.float64)
        if forces.size != 3 * n:
            raise DataError(f"{where}: forces have {forces.size // 3 if forces.size % 3 == 0 else forces.size}"
                            f" rows but the frame has {n} atoms")
        forces = forces.reshape(n, 3) * (e_f / l_f)
    volume = abs(np.linalg.det(cell)) if np.all(pbc) else 0.0
    if stress is not None:
        stress = _as_3x3(stress, where, "stress") * (e_f / l_f**3)
    if virial is not None:
        virial = _as_3x3(virial, where, "virial") * e_f
        if stress is None and volume > 0:
            stress = -virial / volume
    if stress is not None and virial is None and volume > 0:
        virial = -stress * volume
    return AtomicData.from_arrays(positions, numbers, cell, pbc, energy=energy, forces=forces,
                                  stress=stress, virial=virial, source=where)


def _type_map(type_map) -> Optional[TypeMap]:
    if type_map is None or isinstance(type_map, TypeMap):
        return type_map
    return TypeMap(type_map)


def _finish(data: AtomicData, tm: Optional[TypeMap], where: str, min_distance) -> AtomicData:
    check_structure(data, where, min_distance=min_distance)
    if tm is not None:
        data.atom_types = tm.types(data.atomic_numbers.numpy(), where)
    return data


def find_deepmd_systems(path: str) -> List[str]:
    """DeePMD system folders (holding type.raw) at or below ``path``, sorted."""
    if os.path.isfile(os.path.join(path, "type.raw")):
        return [path]
    found = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(path, "**", "type.raw"),
                                                          recursive=True))
    return found


def read_deepmd(
    path: str,
    type_map: Optional[Union[TypeMap, Sequence[str]]] = None,
    require: Sequence[str] = (),
    energy_unit: str = "eV",
    length_unit: str = "A",
    min_distance: Optional[float] = 0.5,
) -> List[AtomicData]:
    """Read DeePMD npy data: a system folder (``type.raw``, ``type_map.raw``,
    ``set.*/{coord,box,energy,force,virial}.npy``, optional ``nopbc``) or a folder holding many.

    ``type_map.raw`` names the element of each type index; without it, pass ``type_map``
    (the elements of DeePMD types 0, 1, ... in order).
    """
    _check_require(require)
    if not os.path.isdir(path):
        raise DataError(f"{path}: not a folder; a DeePMD system is a folder with type.raw and set.*/")
    systems = find_deepmd_systems(path)
    if not systems:
        raise DataError(f"{path}: no type.raw found in it or below; is this DeePMD npy data?")
    e_f = _unit_factor(ENERGY_UNITS_TO_EV, energy_unit, "energy")
    l_f = _unit_factor(LENGTH_UNITS_TO_ANGSTROM, length_unit, "length")
    tm = _type_map(type_map)
    out: List[AtomicData] = []
    for system in systems:
        out.extend(_read_deepmd_system(system, tm, require, e_f, l_f, min_distance))
    return out


def _read_type_raw(path: str) -> np.ndarray:
    """The integer type index of each atom from a DeePMD ``type.raw``."""
    try:
        with open(path) as f:
            words = f.read().split()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot be read as text ({err}); expected one integer type "
                        "index (0, 1, ...) per atom") from err
    types = np.zeros(len(words), dtype=np.int64)
    for k, word in enumerate(words):
        try:
            types[k] = int(word)
        except (ValueError, OverflowError):
            raise DataError(f"{path}: '{word[:40]}' (entry {k + 1}) is not an integer; expected "
                            "one integer type index (0, 1, ...) per atom, whitespace-separated"
                            ) from None
    if types.size == 0:
        raise DataError(f"{path}: empty; expected one integer type index (0, 1, ...) per atom")
    return types


def _load_npy(path: str) -> np.ndarray:
    """A numeric array from a DeePMD ``.npy`` file, as float64. Never unpickles: an object array
    in a .npy is a pickle, and a pickle from a file can run code."""
    expected = "expected a numeric array written by numpy.save"
    try:
        a = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise DataError(f"{path}: an object array (pickled Python objects), not read since a "
                            f"pickle can run code; {expected}") from None
        raise DataError(f"{path}: not a valid .npy file ({err}); {expected}") from None
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot be read as a .npy file ({err}); {expected}") from None
    if not isinstance(a, np.ndarray):  # an .npz archive
        raise DataError(f"{path}: an .npz archive, not a .npy array; {expected}")
    if a.dtype.kind not in "biuf":
        raise DataError(f"{path}: an array of {a.dtype} values; {expected}")
    return a.astype(np.float64)


def _read_deepmd_system(system, tm, require, e_f, l_f, min_distance) -> List[AtomicData]:
    types = _read_type_raw(os.path.join(system, "type.raw"))
    names_file = os.path.join(system, "type_map.raw")
    if os.path.exists(names_file):
        with open(names_file) as f:
            names = f.read().split()
    elif tm is not None:
        names = tm.symbols
    else:
        raise DataError(f"{system}: no type_map.raw; pass type_map=[...] naming the element of "
                        "DeePMD types 0, 1, ... in order")
    if types.size and (types.min() < 0 or types.max() >= len(names)):
        raise DataError(f"{system}/type.raw: type {int(types.max())} but type_map.raw names only "
                        f"{len(names)} types ({names})")
    numbers = TypeMap(names).atomic_numbers
    numbers = np.asarray(numbers, dtype=np.int64)[types]
    nopbc = os.path.exists(os.path.join(system, "nopbc"))
    sets = sorted(glob.glob(os.path.join(system, "set.*")))
    if not sets:
        raise DataError(f"{system}: no set.* folders")
    out = []
    n = len(types)
    for s in sets:
        arrays = {}
        for name in ("coord", "box", "energy", "force", "virial"):
            f = os.path.join(s, name + ".npy")
            arrays[name] = _load_npy(f) if os.path.exists(f) else None
        coord = arrays["coord"]
        if coord is None:
            raise DataError(f"{s}: no coord.npy")
        nf = coord.shape[0]
        if coord.reshape(nf, -1).shape[1] != 3 * n:
            raise DataError(f"{s}/coord.npy: {coord.reshape(nf, -1).shape[1] // 3} atoms per frame "
                            f"but type.raw lists {n}")
        for name, per in (("box", 9), ("energy", 1), ("force", 3 * n), ("virial", 9)):
            a = arrays[name]
            if a is not None and a.size != nf * per:
                raise DataError(f"{s}/{name}.npy: {a.size} numbers; expected {nf} frames x {per}")
        if arrays["box"] is None and not nopbc:
            raise DataError(f"{s}: no box.npy and no 'nopbc' file in {system}; add one of them")
        label_names = {"energy": "energy", "forces": "force", "virial": "virial"}
        missing = [r for r in require if r != "stress" and arrays[label_names[r]] is None]
        if "stress" in require and arrays["virial"] is None:
            missing.append("stress (virial.npy)")
        if missing:
            raise DataError(f"{s}: no {', '.join(missing)} (.npy files); the data lack labels "
                            "you required")
        for k in range(nf):
            where = f"{s}:frame {k}"
            cell = None if nopbc else arrays["box"][k].reshape(3, 3) * l_f
            labels = {
                "energy": None if arrays["energy"] is None else arrays["energy"].reshape(nf)[k],
                "forces": None if arrays["force"] is None else arrays["force"].reshape(nf, n, 3)[k],
                "stress": None,
                "virial": None if arrays["virial"] is None else arrays["virial"].reshape(nf, 9)[k],
            }
            pbc = np.zeros(3, bool) if nopbc else np.ones(3, bool)
            data = _make(coord.reshape(nf, n, 3)[k] * l_f, numbers,
                         np.zeros((3, 3)) if cell is None else cell, pbc, labels, e_f, l_f, where)
            out.append(_finish(data, tm, where, min_distance))
    return out


def read_info(path: str, key: str, format: Optional[str] = None,
              setting: str = "data.split_key") -> List[str]:
    """A label per frame of ``path`` for splits (``setting``, named in errors): ``info[key]`` of
    each frame of an ASE format (every frame must have it), or, for DeePMD npy data with key
    "system", the system folder of each frame (in the order ``read`` returns the frames)."""
    import ase.io

    if format == "deepmd" or (format is None and os.path.isdir(path)):
        if key != "system":
            raise DataError(f"{path}: DeePMD data have no per-frame info; split by 'system' "
                            f"({setting}: system), not {key!r}")
        labels: List[str] = []
        for system in find_deepmd_systems(path):
            for s in sorted(glob.glob(os.path.join(system, "set.*"))):
                coord = _load_npy(os.path.join(s, "coord.npy"))
                labels.extend([os.path.relpath(system, path)] * coord.shape[0])
        return labels
    labels = []
    for k, atoms in enumerate(ase.io.iread(path, index=":", format=format)):
        value = atoms.info.get(key)
        if value is None:
            raise DataError(f"{path}:frame {k}: no info key {key!r} to split by; give every "
                            f"frame one, or change or remove {setting}")
        labels.append(str(value))
    return labels


def read(path: str, format: Optional[str] = None, **kwargs) -> List[AtomicData]:
    """Read structures and labels from ``path``: DeePMD npy data when ``format='deepmd'`` or the
    path is a folder holding type.raw, otherwise anything ``ase.io.read`` reads."""
    if format == "deepmd" or (format is None and os.path.isdir(path)):
        ase_only = sorted(set(kwargs) & {"index", "energy_key", "forces_key", "stress_key",
                                         "virial_key", "energy_weight_key",
                                         "forces_weight_key", "atomic_energies_key",
                                         "hessian_key"})
        if ase_only:
            raise DataError(f"{path}: {ase_only} apply to ASE formats, not to DeePMD npy data "
                            "(whose labels are energy.npy, force.npy, virial.npy)")
        return read_deepmd(path, **kwargs)
    return read_ase(path, format=format, **kwargs)
