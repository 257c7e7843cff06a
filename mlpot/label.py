"""``mlpot label FILE -o OUT.xyz``: label structures with a reference method.

Reads every frame of ``FILE`` (any format ASE reads), computes its energy, forces and, for a
periodic cell (pbc on all three axes), its virial with a labeller, and writes extxyz with
``REF_energy`` (eV, in ``info``), ``REF_forces`` (eV/A, per atom) and ``REF_virial`` (eV, 3x3
in ``info``, ``virial = -stress * volume`` with ASE's stress sign), the keys
``mlpot.data.read`` (and so ``mlpot train``) reads first.

Labellers (:class:`LabellerSpec`):

- ``pyscf``: molecules with PySCF (the ``dft`` extra). ``method`` is ``hf`` (Hartree-Fock) or
  any functional PySCF's libxc knows (``pbe``, ``b3lyp``, ...; restricted Kohn-Sham for spin 0,
  unrestricted otherwise), ``basis`` any basis PySCF knows, ``charge`` and ``spin`` (2S, PySCF's
  convention). Energies in Hartree and gradients in Hartree/Bohr are converted with
  ``mlpot.units``; a frame whose SCF does not converge fails (recorded, skipped).
- ``ase``: any ASE calculator by import path ``module:Class`` with JSON keyword arguments.
- ``model``: an exported mlpot model (``mlpot.ase.MLPotCalculator``), for distillation.

Before any labelling, whatever can be checked is checked (one line, exit code 2): the
labeller imports; PySCF's functional and basis exist, the charge and spin fit, every element
has basis functions (a Mole is built once per composition) and no frame is periodic; EMT's
and a model's element lists; for any other ASE calculator, the first frame of each
composition is labelled before the batch (a dry run: an error there stops the run).

The run is resumable: every finished frame is appended to ``OUT.partial.jsonl`` (flushed and
fsynced) with its index and labels; the same command after a kill skips those frames. At the
end ``OUT`` is written atomically, in input order, and the progress file is removed. A frame
that fails is recorded with its reason in ``OUT.failed.csv`` (next to ``OUT``, its extension
replaced) and skipped; it is not retried on resume. The run's exit code is 0 when it
completed, failed frames included (the summary line counts them).
"""
from __future__ import annotations

import csv
import importlib
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import UserError
from .files import atomic_write, sha256

PROGRESS_FORMAT = 1


class LabelError(UserError):
    """Bad input to ``mlpot label`` (exit code 2)."""


class WorkersDied(UserError):
    """A worker process died (killed, out of memory, a crash inside the labeller): the finished
    frames are saved; the same command resumes. Exit code 2 with one line."""


class FrameFailed(Exception):
    """One frame could not be labelled (SCF not converged, a calculator error): recorded in the
    failed-frames file and skipped."""


@dataclass
class LabellerSpec:
    """What labels the frames; picklable, so that each worker process builds its own.

    kind: ``"pyscf"``, ``"ase"`` or ``"model"``.
    """

    kind: str
    method: str = "pbe"
    basis: str = "def2-svp"
    charge: int = 0
    spin: int = 0
    max_cycle: int = 100
    conv_tol: float = 1e-9
    calculator: Optional[str] = None
    calc_kwargs: Dict[str, Any] = field(default_factory=dict)
    model: Optional[str] = None
    device: str = "cpu"
    # Hessian rows by central differences of the labeller's forces (mlpot.hessian): for this
    # many atoms of each frame (0: none, -1: all; the atoms drawn with hessian_seed and the
    # frame's index), displacements of hessian_delta A; 6 force calls per atom
    hessian_atoms: int = 0
    hessian_delta: float = 0.01
    hessian_seed: int = 0

    def describe(self) -> str:
        if self.kind == "pyscf":
            return (f"PySCF {self.method}/{self.basis} (charge {self.charge}, spin {self.spin})")
        if self.kind == "ase":
            kw = f" {json.dumps(self.calc_kwargs, sort_keys=True)}" if self.calc_kwargs else ""
            return f"ASE calculator {self.calculator}{kw}"
        return f"mlpot model {self.model}"

    def signature(self) -> Dict[str, Any]:
        """What must match for a progress file to be reused."""
        d = asdict(self)
        if self.kind == "model" and self.model:
            d["model_sha256"] = sha256(self.model)
        return d


@dataclass
class Labels:
    energy: float  # eV
    forces: np.ndarray  # [N, 3] eV/A
    virial: Optional[np.ndarray] = None  # [3, 3] eV, periodic cells only
    # a labeller with an uncertainty (an mlpot committee or variance-network model)
    forces_dev: Optional[np.ndarray] = None  # [N] eV/A
    energy_dev: Optional[float] = None  # eV/atom
    # an mlpot model's per-atom energies (their sum is the energy): distillation targets
    atomic_energies: Optional[np.ndarray] = None  # [N] eV
    # Hessian rows of these atoms (LabellerSpec.hessian_atoms): [3k, 3N] eV/A^2, row 3m + c
    # for coordinate c of hessian_atoms[m]
    hessian_atoms: Optional[List[int]] = None
    hessian_rows: Optional[np.ndarray] = None

    def to_json(self) -> Dict[str, Any]:
        d = {"energy": float(self.energy), "forces": np.asarray(self.forces).tolist(),
             "virial": None if self.virial is None else np.asarray(self.virial).tolist()}
        if self.forces_dev is not None:
            d["forces_dev"] = np.asarray(self.forces_dev).tolist()
            d["energy_dev"] = self.energy_dev
        if self.atomic_energies is not None:
            d["atomic_energies"] = np.asarray(self.atomic_energies).tolist()
        if self.hessian_rows is not None:
            d["hessian_atoms"] = [int(a) for a in self.hessian_atoms]
            d["hessian_rows"] = np.asarray(self.hessian_rows).tolist()
        return d

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Labels":
        virial, fdev, atomic = d.get("virial"), d.get("forces_dev"), d.get("atomic_energies")
        rows = d.get("hessian_rows")
        return cls(float(d["energy"]), np.asarray(d["forces"], dtype=np.float64),
                   None if virial is None else np.asarray(virial, dtype=np.float64),
                   None if fdev is None else np.asarray(fdev, dtype=np.float64),
                   None if d.get("energy_dev") is None else float(d["energy_dev"]),
                   None if atomic is None else np.asarray(atomic, dtype=np.float64),
                   None if rows is None else [int(a) for a in d["hessian_atoms"]],
                   None if rows is None else np.asarray(rows, dtype=np.float64))


def _fully_periodic(atoms) -> bool:
    return bool(np.all(atoms.pbc)) and abs(atoms.cell.volume) > 0


def composition(atoms) -> str:
    """'H2O'-like key of the elements of a frame (its chemical formula)."""
    return atoms.get_chemical_formula(mode="hill")


# --------------------------------------------------------------------------- labellers
class PySCFLabeller:
    """Molecules with PySCF: HF or Kohn-Sham DFT; restricted for spin 0, else unrestricted."""

    def __init__(self, spec: LabellerSpec):
        self.spec = spec
        try:
            import pyscf  # noqa: F401
        except ImportError as err:
            raise LabelError("--labeller pyscf needs PySCF: pip install 'mlpot[dft]' (or "
                             "pip install 'pyscf>=2.6')") from err
        self.is_hf = spec.method.lower() in ("hf", "rhf", "uhf", "scf")
        if not self.is_hf:
            from pyscf.dft import libxc

            try:
                libxc.parse_xc(spec.method)
            except Exception as err:  # noqa: BLE001 - KeyError and friends from libxc
                raise LabelError(f"--method {spec.method}: PySCF does not know this functional; "
                                 "use hf or a libxc name such as pbe, b3lyp, wb97x") from err

    def mole(self, atoms):
        from pyscf import gto

        from . import units

        bohr = np.asarray(atoms.positions, dtype=np.float64) / units.BOHR_TO_ANGSTROM
        mol = gto.Mole()
        mol.atom = [(s, tuple(p)) for s, p in zip(atoms.get_chemical_symbols(), bohr)]
        mol.unit = "Bohr"
        mol.basis = self.spec.basis
        mol.charge = self.spec.charge
        mol.spin = self.spec.spin
        mol.verbose = 0
        mol.build()
        return mol

    def check(self, atoms, where: str) -> None:
        """Raise LabelError if this frame's composition cannot be labelled (built once per
        composition before the batch: the basis has every element, charge and spin fit)."""
        if np.any(atoms.pbc):
            raise LabelError(f"{where} is periodic (pbc={atoms.pbc.tolist()}): the PySCF labeller "
                             "handles molecules only; use --ase-calculator with a periodic code "
                             "(e.g. GPAW, CP2K, VASP) for cells")
        try:
            self.mole(atoms)
        except Exception as err:  # noqa: BLE001 - BasisNotFoundError, RuntimeError (spin)
            msg = " ".join(str(err).split())
            raise LabelError(f"{where} ({composition(atoms)}): PySCF cannot build the molecule "
                             f"with basis {self.spec.basis}, charge {self.spec.charge}, spin "
                             f"{self.spec.spin}: {msg}; choose a basis that has these elements "
                             "or fix --charge/--spin (spin is 2S = N_alpha - N_beta)") from err

    def label(self, atoms) -> Labels:
        from pyscf import dft, scf

        from . import units

        mol = self.mole(atoms)
        restricted = self.spec.spin == 0
        if self.is_hf:
            mf = scf.RHF(mol) if restricted else scf.UHF(mol)
        else:
            mf = dft.RKS(mol) if restricted else dft.UKS(mol)
            mf.xc = self.spec.method
        mf.max_cycle = self.spec.max_cycle
        mf.conv_tol = self.spec.conv_tol
        energy = mf.kernel()
        if not mf.converged:
            raise FrameFailed(f"SCF not converged in {self.spec.max_cycle} cycles "
                              f"(last energy {energy:.8f} Ha)")
        grad = mf.nuc_grad_method().kernel()  # Hartree/Bohr
        return Labels(float(energy) * units.HARTREE_TO_EV,
                      -np.asarray(grad, dtype=np.float64) * units.HARTREE_PER_BOHR_TO_EV_PER_A)


def import_calculator(path: str):
    """The class (or factory) named ``module:Name``; LabelError if it cannot be imported."""
    if not path or ":" not in path:
        raise LabelError(f"--ase-calculator {path!r}: give module:Class, e.g. "
                         "ase.calculators.emt:EMT")
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - ImportError or an error inside the module
        raise LabelError(f"--ase-calculator {path}: cannot import {module_name} "
                         f"({type(err).__name__}: {err}); check the name and that its package "
                         "is installed") from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise LabelError(f"--ase-calculator {path}: {module_name} has no {attr}; check the "
                             "name after the colon")
        obj = getattr(obj, part)
    if not callable(obj):
        raise LabelError(f"--ase-calculator {path}: {attr} is not a class or function")
    return obj


def _emt_elements(factory) -> Optional[List[str]]:
    """EMT's elements when ``factory`` is ASE's EMT (or a subclass), else None."""
    try:
        from ase.calculators import emt
    except ImportError:
        return None
    if isinstance(factory, type) and issubclass(factory, emt.EMT):
        return sorted(emt.parameters)
    return None


class ASELabeller:
    """Any ASE calculator: energy, forces and, for periodic cells, the stress as a virial."""

    def __init__(self, spec: LabellerSpec):
        self.spec = spec
        factory = import_calculator(spec.calculator)
        self.elements = _emt_elements(factory)
        try:
            self.calc = factory(**spec.calc_kwargs)
        except Exception as err:  # noqa: BLE001 - a bad keyword argument and the like
            raise LabelError(f"--ase-calculator {spec.calculator}: could not create it with "
                             f"--calc-kwargs {json.dumps(spec.calc_kwargs)} "
                             f"({type(err).__name__}: {err})") from err
        self.needs_dry_run = self.elements is None

    def check(self, atoms, where: str) -> None:
        if self.elements is not None:
            missing = sorted(set(atoms.get_chemical_symbols()) - set(self.elements))
            if missing:
                raise LabelError(f"{where}: {self.spec.calculator} has no parameters for "
                                 f"{', '.join(missing)} (it knows {', '.join(self.elements)}); "
                                 "use another labeller for these frames")

    def label(self, atoms) -> Labels:
        from ase.calculators.calculator import PropertyNotImplementedError

        atoms = atoms.copy()
        atoms.calc = self.calc
        try:
            try:  # the free energy where there is one: with smearing, forces derive from it
                energy = float(atoms.get_potential_energy(force_consistent=True))
            except PropertyNotImplementedError:
                energy = float(atoms.get_potential_energy())
            forces = np.array(atoms.get_forces(), dtype=np.float64)
        except Exception as err:  # noqa: BLE001 - whatever the calculator raises
            raise FrameFailed(f"{type(err).__name__}: {err}") from err
        virial = None
        if _fully_periodic(atoms):
            try:
                stress = np.array(atoms.get_stress(voigt=False), dtype=np.float64)
            except PropertyNotImplementedError:
                stress = None
            except Exception as err:  # noqa: BLE001
                raise FrameFailed(f"stress: {type(err).__name__}: {err}") from err
            if stress is not None:
                virial = -stress * atoms.get_volume()
        return Labels(energy, forces, virial)


class ModelLabeller(ASELabeller):
    """An exported mlpot model through ``mlpot.ase.MLPotCalculator`` (distillation)."""

    def __init__(self, spec: LabellerSpec):
        self.spec = spec
        from .export import read_metadata

        if not spec.model or not os.path.isfile(spec.model):
            raise LabelError(f"--model {spec.model}: no such file; give a model written by "
                             "`mlpot export`")
        self.elements = list(read_metadata(spec.model)["type_map"])
        from .ase import MLPotCalculator

        self.calc = MLPotCalculator(spec.model, device=spec.device)
        self.needs_dry_run = False

    def label(self, atoms) -> Labels:
        """The model's energy, forces (virial), atomic energies and, for a model with an
        uncertainty, its ``forces_dev`` and ``energy_dev`` (raw, ``mlpot.uncertainty``)."""
        labels = super().label(atoms)
        results = self.calc.results
        if "energies" in results:
            labels.atomic_energies = np.asarray(results["energies"], dtype=np.float64).reshape(-1)
        if "forces_dev" in results:
            labels.forces_dev = np.asarray(results["forces_dev"], dtype=np.float64).reshape(-1)
            labels.energy_dev = float(results["energy_dev"])
        return labels

    def forces_many(self, frames) -> List[np.ndarray]:
        """The forces of frames of one system (the same atoms and cell: the displaced copies
        of a Hessian by differences), as batches of replicas in one model call each."""
        import torch

        from .inputs import read_outputs, replica_inputs

        model, out = self.calc.model, []
        first = frames[0]
        types = model.atom_types(first.numbers, where="the model labeller")
        cell = torch.as_tensor(np.asarray(first.cell.array), dtype=model.dtype)
        pbc = torch.as_tensor(np.asarray(first.pbc, dtype=bool))
        for k in range(0, len(frames), 64):
            chunk = frames[k:k + 64]
            pos = torch.as_tensor(np.stack([a.positions for a in chunk]), dtype=model.dtype)
            data = replica_inputs(pos, types, cell.expand(len(chunk), 3, 3), pbc)
            forces = read_outputs(model(data, True, False), len(chunk))["forces"]
            out.extend(f.to(torch.float64).numpy() for f in forces)
        return out

    def check(self, atoms, where: str) -> None:
        missing = sorted(set(atoms.get_chemical_symbols()) - set(self.elements))
        if missing:
            raise LabelError(f"{where}: the model {self.spec.model} has no type for "
                             f"{', '.join(missing)} (its type map: {', '.join(self.elements)})")


def make_labeller(spec: LabellerSpec):
    if spec.kind == "pyscf":
        return PySCFLabeller(spec)
    if spec.kind == "ase":
        return ASELabeller(spec)
    if spec.kind == "model":
        return ModelLabeller(spec)
    raise LabelError(f"unknown labeller {spec.kind!r}; use pyscf, ase or model")


# --------------------------------------------------------------------------- workers
_WORKER_LABELLER = None


def _init_worker(spec: LabellerSpec, threads: Optional[int]) -> None:
    """Build the worker's labeller once; with ``threads``, limit torch's and PySCF's threads
    so that N workers do not oversubscribe the cores."""
    global _WORKER_LABELLER
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
        if spec.kind == "pyscf":
            try:
                from pyscf import lib
            except ImportError:
                pass
            else:
                lib.num_threads(threads)
    _WORKER_LABELLER = make_labeller(spec)


def _forces_many(labeller, frames) -> List[np.ndarray]:
    """Forces of several frames: the labeller's batched ``forces_many`` where it has one."""
    if hasattr(labeller, "forces_many"):
        return labeller.forces_many(frames)
    return [labeller.label(a).forces for a in frames]


def _with_hessian(labeller, index: int, atoms, labels: Labels) -> Labels:
    """``labels`` with the Hessian rows the spec asks for (mlpot.hessian)."""
    from .hessian import choose_atoms, finite_difference_rows

    spec = labeller.spec
    rng = np.random.default_rng([spec.hessian_seed, index])
    chosen = choose_atoms(len(atoms), spec.hessian_atoms, rng)
    labels.hessian_atoms = [int(a) for a in chosen]
    labels.hessian_rows = finite_difference_rows(lambda fr: _forces_many(labeller, fr), atoms,
                                                 chosen, spec.hessian_delta)
    return labels


def _label_one(labeller, index: int, atoms) -> Tuple[int, Optional[Dict], Optional[str]]:
    try:
        labels = labeller.label(atoms)
        if labeller.spec.hessian_atoms:
            labels = _with_hessian(labeller, index, atoms, labels)
        return index, labels.to_json(), None
    except FrameFailed as err:
        return index, None, " ".join(str(err).split())
    except Exception as err:  # noqa: BLE001 - one frame's failure never stops the batch
        return index, None, " ".join(f"{type(err).__name__}: {err}".split())


def _worker_task(index: int, atoms):
    return _label_one(_WORKER_LABELLER, index, atoms)


class _Runner:
    """Labels frames in this process (workers=1) or in a spawn-started process pool."""

    def __init__(self, spec: LabellerSpec, workers: int, local_labeller):
        self.workers = workers
        self.local = local_labeller
        self.pool = None
        if workers > 1:
            method = "forkserver" if sys.platform.startswith("linux") else "spawn"
            # without OMP_NUM_THREADS, each worker gets its share of the cores
            threads = (None if os.environ.get("OMP_NUM_THREADS")
                       else max(1, (os.cpu_count() or 1) // workers))
            ctx = get_context(method)
            if method == "forkserver":  # workers fork from a server that has imported mlpot
                ctx.set_forkserver_preload([__name__])
            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                            initializer=_init_worker, initargs=(spec, threads))

    def run(self, jobs: Sequence[Tuple[int, Any]]):
        """Yield (index, labels-json or None, failure reason or None) as frames finish."""
        if self.pool is None:
            for index, atoms in jobs:
                yield _label_one(self.local, index, atoms)
            return
        pending = set()
        it = iter(jobs)
        for index, atoms in it:  # keep at most 2 tasks per worker queued
            pending.add(self.pool.submit(_worker_task, index, atoms))
            if len(pending) >= 2 * self.workers:
                break
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                try:
                    result = fut.result()
                except BrokenProcessPool as err:
                    raise WorkersDied(
                        "a worker process died (killed, out of memory, or a crash inside the "
                        "labeller); the finished frames are saved: run the same command again "
                        "to resume (with fewer --workers if memory ran out)") from err
                yield result
                nxt = next(it, None)
                if nxt is not None:
                    pending.add(self.pool.submit(_worker_task, *nxt))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- progress
def side_files(output: str) -> Tuple[str, str]:
    """(progress file, failed-frames file) of an output path."""
    root, _ = os.path.splitext(output)
    return output + ".partial.jsonl", root + ".failed.csv"


class Progress:
    """JSON lines: a header (the run's settings), then one line per finished frame:
    ``{"index": i, "labels": {...}}`` or ``{"index": i, "failed": reason}``. Each line is
    flushed and fsynced; a torn last line (a kill while writing) is ignored on reading."""

    def __init__(self, path: str, header: Dict[str, Any]):
        self.path = path
        self.done: Dict[int, Dict] = {}
        self.failed: Dict[int, str] = {}
        if os.path.exists(path):
            self._read(header)
            self.f = open(path, "a", encoding="utf-8")
        else:
            self.f = open(path, "w", encoding="utf-8")
            self._write({"header": header})

    def _read(self, header: Dict[str, Any]) -> None:
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        records = []
        for k, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if k >= len(lines) - 2:  # the torn last line of a killed run
                    continue
                raise LabelError(f"{self.path}: line {k + 1} is not JSON; delete the file to "
                                 "start the labelling again")
        if not records or "header" not in records[0]:
            raise LabelError(f"{self.path}: not a progress file of mlpot label; delete it")
        if records[0]["header"] != json.loads(json.dumps(header)):
            raise LabelError(f"{self.path} was written by a run with other input or settings; "
                             "rerun with the same input and options to resume, or delete it to "
                             "start again")
        for r in records[1:]:
            if "labels" in r:
                self.done[int(r["index"])] = r["labels"]
                self.failed.pop(int(r["index"]), None)
            elif "failed" in r:
                self.failed[int(r["index"])] = str(r["failed"])
        # a torn last line must not run into the next record
        with open(self.path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def _write(self, record: Dict[str, Any]) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def add(self, index: int, labels: Optional[Dict], reason: Optional[str]) -> None:
        if labels is not None:
            self.done[index] = labels
            self._write({"index": index, "labels": labels})
        else:
            self.failed[index] = reason or "unknown error"
            self._write({"index": index, "failed": self.failed[index]})

    def close(self) -> None:
        self.f.close()


# --------------------------------------------------------------------------- the command
def read_frames(path: str):
    import ase.io

    if not os.path.isfile(path):
        raise LabelError(f"{path}: no such file")
    try:
        frames = ase.io.read(path, index=":")
    except Exception as err:  # noqa: BLE001 - re-raised with the file's name
        raise LabelError(f"{path}: ASE could not read it ({type(err).__name__}: {err})") from err
    if not isinstance(frames, list):
        frames = [frames]
    if not frames:
        raise LabelError(f"{path}: no frames")
    return frames


def _output_atoms(atoms, labels: Labels, prefix: str = "REF_"):
    """The frame with its labels under ``<prefix>energy``, ``<prefix>forces`` (and
    ``<prefix>virial``, ``<prefix>forces_dev``, ``<prefix>energy_dev``,
    ``<prefix>atomic_energies``); older keys with the
    same prefix are dropped, other labels (e.g. REF_ under the prefix TEACHER_) are kept."""
    out = atoms.copy()
    out.calc = None
    for key in [k for k in out.info if k.startswith(prefix)]:
        del out.info[key]
    for key in [k for k in out.arrays if k.startswith(prefix)]:
        del out.arrays[key]
    out.info[prefix + "energy"] = labels.energy
    out.arrays[prefix + "forces"] = np.asarray(labels.forces, dtype=np.float64).reshape(len(out),
                                                                                        3)
    if labels.virial is not None:
        # 9 numbers, row-major (xx xy xz yx ...), as extxyz files usually hold a virial
        out.info[prefix + "virial"] = np.asarray(labels.virial, dtype=np.float64).reshape(9)
    if labels.forces_dev is not None:
        out.arrays[prefix + "forces_dev"] = np.asarray(labels.forces_dev, dtype=np.float64)
        out.info[prefix + "energy_dev"] = labels.energy_dev
    if labels.atomic_energies is not None:
        out.arrays[prefix + "atomic_energies"] = np.asarray(labels.atomic_energies,
                                                            dtype=np.float64)
    if labels.hessian_rows is not None:
        from .hessian import rows_to_array

        out.arrays[prefix + "hessian"] = rows_to_array(len(out), labels.hessian_atoms,
                                                       labels.hessian_rows)
    return out


def label_file(path: str, output: str, spec: LabellerSpec, workers: int = 1,
               log=print, prefix: str = "REF_") -> Dict[str, Any]:
    """Label every frame of ``path`` into ``output`` (extxyz); see the module docstring.
    ``prefix``: of the label keys (``REF_``; distillation writes ``TEACHER_``). Returns a
    summary: frames, labelled, failed, reused (from an earlier run), seconds."""
    import ase.io

    t0 = time.time()
    if workers < 1:
        raise LabelError(f"--workers {workers}: give 1 or more")
    if os.path.abspath(path) == os.path.abspath(output):
        raise LabelError(f"-o {output} is the input file; write the labels to another file")
    frames = read_frames(path)
    labeller = make_labeller(spec)  # import errors, unknown functional, ...: before any work
    # up-front checks, once per composition
    first_of: Dict[str, int] = {}
    for k, atoms in enumerate(frames):
        key = composition(atoms) + ("|pbc" if np.any(atoms.pbc) else "")
        if key not in first_of:
            first_of[key] = k
            labeller.check(atoms, f"{path}: frame {k}")
    progress_path, failed_path = side_files(output)
    header = {"format": PROGRESS_FORMAT, "input_sha256": sha256(path), "frames": len(frames),
              "labeller": spec.signature()}
    progress = Progress(progress_path, header)
    reused = len(progress.done) + len(progress.failed)
    todo = [k for k in range(len(frames)) if k not in progress.done and k not in progress.failed]
    if reused:
        log(f"resuming from {progress_path}: {reused} of {len(frames)} frames already done")
    runner = _Runner(spec, workers, labeller)
    try:
        # dry run: the first frame of each composition, for calculators whose elements
        # are not known up front; an error there is bad input, not a failed frame
        if getattr(labeller, "needs_dry_run", False):
            dry = [k for k in sorted(first_of.values()) if k in todo]
            for index, labels, reason in runner.run([(k, frames[k]) for k in dry]):
                if labels is None:
                    raise LabelError(
                        f"{path}: frame {index} ({composition(frames[index])}): the dry run of "
                        f"{spec.calculator} failed: {reason}; check that the calculator handles "
                        "these elements and settings")
                progress.add(index, labels, None)
            todo = [k for k in todo if k not in progress.done]
        n_done_before = len(progress.done) + len(progress.failed)
        for index, labels, reason in runner.run([(k, frames[k]) for k in todo]):
            progress.add(index, labels, reason)
            n = len(progress.done) + len(progress.failed)
            if n == len(frames) or n % 50 == 0 or n - n_done_before == 1:
                log(f"  {n}/{len(frames)} frames ({len(progress.failed)} failed)")
    finally:
        runner.close()
        progress.close()

    out_frames = [_output_atoms(frames[k], Labels.from_json(progress.done[k]), prefix)
                  for k in range(len(frames)) if k in progress.done]
    fmt_ext = "extxyz"
    atomic_write(output, lambda tmp: ase.io.write(tmp, out_frames, format=fmt_ext))
    if progress.failed:
        def write_failed(tmp):
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["index", "composition", "reason"])
                for k in sorted(progress.failed):
                    w.writerow([k, composition(frames[k]), progress.failed[k]])

        atomic_write(failed_path, write_failed)
    elif os.path.exists(failed_path):
        os.remove(failed_path)
    os.remove(progress_path)
    return {"frames": len(frames), "labelled": len(progress.done),
            "failed": len(progress.failed), "reused": reused, "seconds": time.time() - t0,
            "output": output, "failed_file": failed_path if progress.failed else None}


def spec_from_args(args) -> LabellerSpec:
    kind = args.labeller
    if kind is None:
        kind = "ase" if args.ase_calculator else "model" if args.model else None
    if kind is None:
        raise LabelError("no labeller: give --labeller pyscf, --ase-calculator module:Class or "
                         "--model model.pt")
    given = [n for n, v in (("--ase-calculator", args.ase_calculator), ("--model", args.model))
             if v]
    if (kind == "pyscf" and given) or len(given) > 1:
        raise LabelError(f"choose one labeller (got --labeller {kind} and {' and '.join(given)})")
    if kind == "ase" and not args.ase_calculator:
        raise LabelError("--labeller ase needs --ase-calculator module:Class")
    if kind == "model" and not args.model:
        raise LabelError("--labeller model needs --model model.pt")
    calc_kwargs: Dict[str, Any] = {}
    if args.calc_kwargs:
        if kind != "ase":
            raise LabelError("--calc-kwargs apply to --ase-calculator only")
        try:
            calc_kwargs = json.loads(args.calc_kwargs)
        except json.JSONDecodeError as err:
            raise LabelError(f"--calc-kwargs is not JSON ({err}); e.g. "
                             "--calc-kwargs '{\"asap_cutoff\": true}'") from err
        if not isinstance(calc_kwargs, dict):
            raise LabelError("--calc-kwargs must be a JSON object, e.g. '{\"xc\": \"PBE\"}'")
    if args.max_cycle < 1:
        raise LabelError(f"--max-cycle {args.max_cycle}: give 1 or more SCF iterations")
    if args.spin < 0:
        raise LabelError(f"--spin {args.spin}: give 2S >= 0 (N_alpha - N_beta)")
    check_hessian_options(args.hessian_atoms, args.hessian_delta, "--hessian-")
    return LabellerSpec(kind=kind, method=args.method, basis=args.basis, charge=args.charge,
                        spin=args.spin, max_cycle=args.max_cycle, calculator=args.ase_calculator,
                        calc_kwargs=calc_kwargs, model=args.model, device=args.device,
                        hessian_atoms=args.hessian_atoms, hessian_delta=args.hessian_delta)


def check_hessian_options(atoms: int, delta: float, where: str) -> None:
    """LabelError (one line) for a Hessian request that cannot be met."""
    if atoms < -1:
        raise LabelError(f"{where}atoms {atoms}: give a number of atoms >= 0, or -1 for all")
    if not delta > 0:
        raise LabelError(f"{where}delta {delta}: give a displacement > 0 (A), e.g. 0.01")


def run_label(args) -> int:
    spec = spec_from_args(args)
    prefix = args.prefix
    if not prefix or not prefix.replace("_", "a").isalnum():
        raise LabelError(f"--prefix {prefix!r}: give letters, digits and underscores, e.g. "
                         "REF_ or TEACHER_")
    s = label_file(args.file, args.output, spec, workers=args.workers, prefix=prefix)
    failed = (f"{s['failed']} failed (listed in {s['failed_file']})" if s["failed"]
              else "0 failed")
    reused = f", {s['reused']} from an earlier run" if s["reused"] else ""
    print(f"labelled {s['labelled']} of {s['frames']} frames with {spec.describe()}: {failed}"
          f"{reused}; wrote {s['output']} in {s['seconds']:.1f} s")
    return 0


def add_label_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "label", help="label structures with a reference (PySCF, any ASE calculator, a model)",
        description="Label every frame of FILE (any format ASE reads) and write extxyz with "
                    "REF_energy (eV), REF_forces (eV/A) and, for periodic cells, REF_virial "
                    "(eV). Resumable: the same command after a kill skips finished frames "
                    "(OUT.partial.jsonl). Failed frames (SCF not converged, calculator errors) "
                    "are listed with their reason in OUT's .failed.csv and skipped. Exit code 0 "
                    "when the run completed, failed frames included; 2 for bad input (checked "
                    "before any labelling).")
    p.add_argument("file", help="structures (extxyz, xyz, traj, POSCAR, ...)")
    p.add_argument("-o", "--output", required=True, help="output extxyz file")
    p.add_argument("--labeller", choices=["pyscf", "ase", "model"], default=None,
                   help="pyscf (molecules), ase (with --ase-calculator) or model (with --model); "
                        "default from the options given")
    p.add_argument("--method", default="pbe",
                   help="PySCF: hf or any libxc functional (default pbe)")
    p.add_argument("--basis", default="def2-svp", help="PySCF basis (default def2-svp)")
    p.add_argument("--charge", type=int, default=0, help="PySCF: total charge (default 0)")
    p.add_argument("--spin", type=int, default=0,
                   help="PySCF: 2S = N_alpha - N_beta (default 0: closed shell, restricted)")
    p.add_argument("--max-cycle", type=int, default=100,
                   help="PySCF: SCF iterations before a frame fails (default 100)")
    p.add_argument("--ase-calculator", default=None,
                   help="an ASE calculator as module:Class, e.g. ase.calculators.emt:EMT")
    p.add_argument("--calc-kwargs", default=None,
                   help="JSON object of keyword arguments for --ase-calculator")
    p.add_argument("--model", default=None, help="an exported mlpot model (distillation)")
    p.add_argument("--device", default="cpu", help="--model: torch device (default cpu)")
    p.add_argument("--prefix", default="REF_",
                   help="of the label keys (default REF_: REF_energy, REF_forces, REF_virial; "
                        "TEACHER_ for a teacher model's labels; a model also writes its "
                        "atomic energies, PREFIXatomic_energies, and a committee "
                        "PREFIXforces_dev and PREFIXenergy_dev)")
    p.add_argument("--hessian-atoms", type=int, default=0,
                   help="also the Hessian rows of this many atoms per frame (-1: all), by "
                        "central differences of the labeller's forces, 6 force calls per atom, "
                        "as PREFIXhessian (eV/A^2; Hessian distillation; default 0: none)")
    p.add_argument("--hessian-delta", type=float, default=0.01,
                   help="--hessian-atoms: the displacement, A (default 0.01)")
    p.add_argument("--workers", type=int, default=1,
                   help="parallel worker processes (default 1: in this process)")
    p.set_defaults(func=run_label)
