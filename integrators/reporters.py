"""Reporters: what a run writes every ``interval`` steps.

- ``ThermoCSV``: step, time, kinetic/potential/conserved energy, temperature, pressure, volume per
  replica, one CSV row per replica and report.
  With a committee model, also ``max_force_dev`` and ``energy_dev`` (and ``virial_dev`` when
  the stress is computed): ``UNCERTAINTY_COLUMNS``.
- ``ModelDeviFile``: DP-GEN's ``model_devi.out`` (DeePMD-kit's columns) of a committee.
- ``ProgressBar``: a one-line progress bar on stderr (steps, steps/s, time left, mean T).
- ``TrajectoryReporter``: frames through mdtraj (.dcd, .xtc, .h5 with a topology) or ASE (.traj,
  with velocities, energy, forces and stress).

Each reporter has ``open(state, integrator)``, ``report(state, integrator)`` and ``close()``.
When a run is resumed (``state.step > 0`` and the file exists), files are cut back to what was
written up to that step and continued, so a resumed run leaves the same files as an
uninterrupted one (trajectories: the resumed run must use the same interval). A kill at any
moment of a resume loses nothing that was written up to that step:

- the CSV is cut in place (``truncate``) at the byte offset of the first row after the step
  (or of a half-written last line), then appended to;
- a trajectory is copied frame by frame (in chunks, never whole in memory) up to the step into a
  temporary file beside it, which is fsync'd and moved over the old one with ``os.replace``; the
  writer then goes on writing into the moved file. A kill before the move leaves the old file
  (and a ``.NAME.*.tmp`` that the next resume removes), after it the copy.
"""
from __future__ import annotations

import csv
import math
import os
import sys
import time
from typing import Dict, Optional

import numpy as np
import torch

from mlpot import units
from mlpot.files import remove_stale_temporaries

from .base import Integrator
from .state import MDState, kinetic_energy, pressure_bar, temperature_K

THERMO_COLUMNS = ("step", "time_fs", "replica", "kinetic_eV", "potential_eV", "conserved_eV",
                  "temperature_K", "pressure_bar", "volume_A3")


#: A committee's deviations in the thermo CSV (raw, DeePMD-kit's definitions; eV/A, eV/atom).
UNCERTAINTY_COLUMNS = ("max_force_dev", "energy_dev", "virial_dev")


def running_replicas(state: MDState):
    """The replicas not stopped by a per-replica rule (``MDState.active``)."""
    if state.active is None:
        return range(state.n_replicas)
    return [r for r, a in enumerate(state.active.tolist()) if a]


def thermo(state: MDState, integrator: Integrator) -> Dict[str, torch.Tensor]:
    """The thermodynamic quantities of each replica  # each [R] float64

    The pressure is NaN when the state has no stress (see ``Integrator.compute_stress``).
    """
    return {
        "kinetic_eV": kinetic_energy(state.velocities, state.masses),
        "potential_eV": state.energy,
        "conserved_eV": integrator.conserved_energy(state),
        "temperature_K": temperature_K(state),
        "pressure_bar": pressure_bar(state),
        "volume_A3": state.volume(),
    }


class Reporter:
    """Base class: report every ``interval`` steps."""

    def __init__(self, interval: int):
        if int(interval) < 1:
            raise ValueError(f"a reporter interval must be >= 1 step, got {interval}")
        self.interval = int(interval)

    def open(self, state: MDState, integrator: Integrator) -> None:
        pass

    def report(self, state: MDState, integrator: Integrator) -> None:
        pass

    def close(self) -> None:
        pass


class ThermoCSV(Reporter):
    """Thermodynamic log as CSV (columns ``THERMO_COLUMNS``; energies eV, T in K, P in bar).

    When the state carries a committee's deviations at ``open`` (``MDState.outputs``), the
    columns of ``UNCERTAINTY_COLUMNS`` it has follow (a resumed file keeps its header's
    columns). Replicas stopped by the uncertainty stop get no more rows.
    """

    def __init__(self, path: str, interval: int = 100):
        super().__init__(interval)
        self.path = path
        self._fh = None
        self._writer = None
        self.columns = THERMO_COLUMNS

    def open(self, state: MDState, integrator: Integrator) -> None:
        if state.step > 0 and os.path.exists(self.path) and cut_csv(self.path, state.step):
            with open(self.path, newline="") as fh:
                self.columns = tuple(next(csv.reader(fh)))
            self._fh = open(self.path, "a", newline="")
            self._writer = csv.writer(self._fh)
            return
        self.columns = THERMO_COLUMNS + tuple(c for c in UNCERTAINTY_COLUMNS
                                              if c in state.outputs)
        self._fh = open(self.path, "w", newline="")
        self._writer = csv.writer(self._fh)
        self._writer.writerow(self.columns)
        self._fh.flush()

    def report(self, state: MDState, integrator: Integrator) -> None:
        q = {k: v.detach().cpu().tolist() for k, v in thermo(state, integrator).items()}
        for c in self.columns[len(THERMO_COLUMNS):]:
            v = state.outputs.get(c)
            q[c] = [math.nan] * state.n_replicas if v is None else \
                v.detach().double().reshape(-1).cpu().tolist()
        for r in running_replicas(state):
            self._writer.writerow([state.step, f"{state.time_fs:.6g}", r]
                                  + [f"{q[c][r]:.10g}" for c in self.columns[3:]])
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def cut_csv(path: str, step: int) -> bool:
    """Cut a thermo CSV in place after the rows of ``step`` and earlier: at the first row with a
    later step, or at a half-written (unterminated or unreadable) line. Reads the file line by
    line; returns False when it has no header (then it is rewritten from scratch)."""
    with open(path, "rb+") as fh:
        header = fh.readline()
        if not header.endswith(b"\n") or not header.startswith(b"step,"):
            return False
        offset = fh.tell()
        for line in iter(fh.readline, b""):
            try:
                complete = line.endswith(b"\n")
                later = int(line.split(b",", 1)[0]) > step
            except ValueError:
                complete = later = False
            if not complete or later:
                break
            offset += len(line)
        fh.truncate(offset)
        fh.flush()
        os.fsync(fh.fileno())
    return True


class ModelDeviFile(Reporter):
    """DP-GEN's ``model_devi.out`` of a committee, one row per report and running replica.

    The columns are DeePMD-kit's (``dp model-devi`` and the LAMMPS ``pair_style deepmd``
    ``out_file``; definitions in deepmd-kit ``doc/test/model-deviation.md``), with population
    standard deviations over the K members::

        step max_devi_v min_devi_v avg_devi_v max_devi_f min_devi_f avg_devi_f devi_e

    ``*_devi_f``: max/min/mean over atoms of ``forces_dev`` (eV/A); ``*_devi_v``: max/min/mean
    over the nine components of the standard deviation of the virial divided by the number of
    atoms (eV/atom), written as 0 when the run computes no stress (non-periodic cells, as
    DeePMD-kit does without a virial); ``devi_e``: ``energy_dev``, the standard deviation of
    the total energy per atom (eV/atom; the eighth column of newer DeePMD-kit versions). With
    several replicas each has its own file, ``NAME.rK.EXT``, as trajectories do.
    """

    HEADER = ("#" + "".join(f"{c:>19}" if i else f"{c:>11}" for i, c in enumerate(
        ("step", "max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f", "min_devi_f",
         "avg_devi_f", "devi_e"))))

    def __init__(self, path: str, interval: int = 100):
        super().__init__(interval)
        self.path = path
        self._files: Dict[int, object] = {}

    def _paths(self, n_replicas: int) -> Dict[int, str]:
        if n_replicas == 1:
            return {0: self.path}
        stem, ext = os.path.splitext(self.path)
        return {r: f"{stem}.r{r}{ext}" for r in range(n_replicas)}

    def open(self, state: MDState, integrator: Integrator) -> None:
        from .health import NoDeviation

        if "forces_dev" not in state.outputs and state.step == 0:
            raise NoDeviation("--model-devi needs a committee model (one returning forces_dev); "
                              "this model returns none: export a committee or drop --model-devi")
        for r, path in self._paths(state.n_replicas).items():
            if state.step > 0 and os.path.exists(path):
                _cut_rows(path, state.step)
                self._files[r] = open(path, "a")
            else:
                self._files[r] = open(path, "w")
                self._files[r].write(self.HEADER + "\n")
                self._files[r].flush()

    @staticmethod
    def rows(state: MDState) -> Dict[int, list]:
        """The eight numbers of each running replica."""
        out = state.outputs
        fdev = out["forces_dev"].detach().double().reshape(state.n_replicas, -1).cpu()
        edev = out["energy_dev"].detach().double().reshape(-1).cpu()
        vm = out.get("virial_members")  # [R, K, 3, 3]
        rows = {}
        for r in running_replicas(state):
            if vm is not None:
                v = vm[r].detach().double()
                v = (v - v.mean(0)).pow(2).mean(0).sqrt().reshape(9).cpu() / state.n_atoms
                dv = [float(v.max()), float(v.min()), float(v.mean())]
            else:
                dv = [0.0, 0.0, 0.0]
            f = fdev[r]
            rows[r] = dv + [float(f.max()), float(f.min()), float(f.mean()), float(edev[r])]
        return rows

    def report(self, state: MDState, integrator: Integrator) -> None:
        for r, values in self.rows(state).items():
            fh = self._files[r]
            fh.write(f"{state.step:12d}" + "".join(f"{v:19.6e}" for v in values) + "\n")
            fh.flush()

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files = {}


def _cut_rows(path: str, step: int) -> None:
    """Cut a whitespace-separated table after the rows of ``step`` and earlier (kept: comment
    lines; cut at the first later or half-written row)."""
    with open(path, "rb+") as fh:
        offset = 0
        for line in iter(fh.readline, b""):
            if line.startswith(b"#") and line.endswith(b"\n"):
                offset += len(line)
                continue
            try:
                ok = line.endswith(b"\n") and int(line.split()[0]) <= step
            except (ValueError, IndexError):
                ok = False
            if not ok:
                break
            offset += len(line)
        fh.truncate(offset)


class ProgressBar(Reporter):
    """``step 500/1000 [#####     ] 50% 123.4 steps/s, 4 s left, T 301.2 K`` on one line."""

    def __init__(self, total_steps: int, interval: int = 10, stream=None, width: int = 30):
        super().__init__(interval)
        self.total, self.width = int(total_steps), width
        self.stream = stream if stream is not None else sys.stderr
        self._t0 = self._s0 = None

    def open(self, state: MDState, integrator: Integrator) -> None:
        self._t0, self._s0 = time.perf_counter(), state.step
        self.end = state.step + self.total if self.total else state.step

    def report(self, state: MDState, integrator: Integrator) -> None:
        done = state.step - self._s0
        frac = min(1.0, done / max(self.total, 1))
        rate = done / max(time.perf_counter() - self._t0, 1e-9)
        left = (self.end - state.step) / rate if rate > 0 else float("inf")
        bar = "#" * int(frac * self.width)
        t = float(temperature_K(state).mean())
        self.stream.write(f"\rstep {state.step}/{self.end} [{bar:<{self.width}}] "
                          f"{100 * frac:3.0f}% {rate:.1f} steps/s, {left:.0f} s left, T {t:.1f} K")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


# ------------------------------------------------------------------------------ trajectories
def cell_lengths_angles(cell: np.ndarray):
    """(a, b, c) and (alpha, beta, gamma) in degrees of [F, 3, 3] cells (rows)."""
    lengths = np.linalg.norm(cell, axis=-1)

    def angle(i, j):
        c = (cell[:, i] * cell[:, j]).sum(-1) / np.maximum(lengths[:, i] * lengths[:, j], 1e-12)
        return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))

    return lengths, np.stack([angle(1, 2), angle(0, 2), angle(0, 1)], -1)


def mdtraj_topology(atomic_numbers):
    """An mdtraj Topology with one residue per atom (named after its element)."""
    import mdtraj

    top = mdtraj.Topology()
    chain = top.add_chain()
    for z in np.asarray(atomic_numbers).tolist():
        el = mdtraj.element.Element.getByAtomicNumber(int(z)) if z > 0 else mdtraj.element.virtual
        top.add_atom(el.symbol, el, top.add_residue(el.symbol, chain))
    return top


#: Frames copied at a time when a trajectory is cut back on resume.
COPY_CHUNK_FRAMES = 256


def _resume_copy(path: str, open_new, copy) -> object:
    """Cut ``path`` back by copying into a temporary file beside it and moving that over it.

    ``open_new(tmp)`` opens a writer on the temporary file; ``copy(writer)`` copies the frames to
    keep into it; the writer is flushed, the file fsync'd and moved onto ``path`` with
    ``os.replace``, and the writer (still open, now writing ``path``) is returned.
    """
    remove_stale_temporaries(path)
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.resume.tmp")
    writer = open_new(tmp)
    try:
        copy(writer)
        flush = getattr(writer, "flush", None)
        if flush is not None:
            flush()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(folder)
    return writer


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _MDTrajWriter:
    """One replica's frames in a DCD, XTC or HDF5 file (units converted here: A -> nm, fs -> ps)."""

    def __init__(self, path: str, kind: str, topology):
        self.path, self.kind, self.topology = path, kind, topology
        self._fh = None

    def _cls(self):
        import mdtraj

        return {"dcd": mdtraj.formats.DCDTrajectoryFile, "xtc": mdtraj.formats.XTCTrajectoryFile,
                "h5": mdtraj.formats.HDF5TrajectoryFile}[self.kind]

    def _new(self, path: str):
        fh = self._cls()(path, "w", force_overwrite=True)
        if self.kind == "h5":
            fh.topology = self.topology
        return fh

    def open(self, keep_frames: Optional[int]) -> None:
        if keep_frames is None or not os.path.exists(self.path):
            self._fh = self._new(self.path)
            return
        self._fh = _resume_copy(self.path, self._new, lambda w: self._copy(w, keep_frames))

    def _copy(self, writer, keep: int) -> None:
        """The first ``keep`` frames of the file into ``writer``, as stored (no unit change)."""
        done = 0
        with self._cls()(self.path, "r") as old:
            while done < keep:
                chunk = old.read(n_frames=min(COPY_CHUNK_FRAMES, keep - done))
                n = len(chunk[0])
                if n == 0:
                    break
                if self.kind == "dcd":  # xyz (A), cell lengths, cell angles
                    writer.write(chunk[0], chunk[1], chunk[2])
                elif self.kind == "xtc":  # xyz (nm), time (ps), step, box (nm)
                    writer.write(chunk[0], time=chunk[1], step=chunk[2], box=chunk[3])
                else:
                    writer.write(coordinates=chunk.coordinates, time=chunk.time,
                                 cell_lengths=chunk.cell_lengths, cell_angles=chunk.cell_angles)
                done += n

    def write(self, x: np.ndarray, cell: np.ndarray, time_fs: float) -> None:
        self._write(x[None], cell[None], np.array([time_fs]))

    def _write(self, x: np.ndarray, cell: np.ndarray, time_fs: np.ndarray) -> None:
        lengths, angles = cell_lengths_angles(cell)
        nm = units.ANGSTROM_TO_NM
        if self.kind == "dcd":  # written unbuffered by mdtraj
            self._fh.write(x.astype(np.float32), lengths.astype(np.float32),
                           angles.astype(np.float32))
        elif self.kind == "xtc":
            steps = np.zeros(len(x), dtype=np.int32)
            self._fh.write((x * nm).astype(np.float32), time=(time_fs * units.FS_TO_PS).astype(
                np.float32), step=steps, box=(cell * nm).astype(np.float32))
            self._fh.flush()  # a kill loses no reported frame
        else:
            self._fh.write(coordinates=(x * nm).astype(np.float32), time=time_fs * units.FS_TO_PS,
                           cell_lengths=lengths * nm, cell_angles=angles)
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class _ASEWriter:
    """One replica's frames in an ASE trajectory, with momenta, energy, forces and stress."""

    def __init__(self, path: str):
        self.path = path
        self._traj = None

    def open(self, keep_frames: Optional[int]) -> None:
        from ase.io.trajectory import Trajectory

        if keep_frames is None or not os.path.exists(self.path):
            self._traj = Trajectory(self.path, "w")
            return

        def copy(writer) -> None:
            old = Trajectory(self.path, "r")
            try:
                for k in range(min(keep_frames, len(old))):  # one frame in memory at a time
                    writer.write(old[k])
            finally:
                old.close()

        def new(tmp):
            return Trajectory(tmp, "w")

        # ASE writes a frame's data and its index together: close the copy, then append
        _resume_copy(self.path, new, copy).close()
        self._traj = Trajectory(self.path, "a")

    def write(self, state: MDState, r: int) -> None:
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator
        from ase.stress import full_3x3_to_voigt_6_stress

        masses = state.masses.double().cpu().numpy()
        atoms = Atoms(numbers=state.atomic_numbers.cpu().numpy(),
                      positions=state.positions[r].double().cpu().numpy(),
                      cell=state.cell[r].double().cpu().numpy(), pbc=state.pbc.cpu().numpy(),
                      masses=masses)
        v = state.velocities[r].double().cpu().numpy() * units.A_PER_FS_TO_ASE_VELOCITY
        atoms.set_velocities(v)
        atoms.info.update(step=int(state.step), time_fs=float(state.time_fs))
        res = {"energy": float(state.energy[r]), "forces": state.forces[r].double().cpu().numpy()}
        if state.stress is not None:
            res["stress"] = full_3x3_to_voigt_6_stress(state.stress[r].double().cpu().numpy())
        atoms.calc = SinglePointCalculator(atoms, **res)
        self._traj.write(atoms)

    def close(self) -> None:
        if self._traj is not None:
            self._traj.close()
            self._traj = None


class TrajectoryReporter(Reporter):
    """Frames every ``interval`` steps; the format follows the extension.

    ``.dcd`` (Angstrom), ``.xtc`` (nm, ps), ``.h5``/``.hdf5`` (mdtraj HDF5, nm, ps, with a
    topology; needs PyTables) through mdtraj; ``.traj`` through ASE (velocities, energy, forces,
    stress). ``replica``: which replica to write, or None for all of them, each in its own file
    ``NAME.rK.EXT``. ``topology``: an mdtraj Topology (default: one residue per atom).
    """

    def __init__(self, path: str, interval: int = 100, replica: Optional[int] = 0, topology=None):
        super().__init__(interval)
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        self.kind = {"hdf5": "h5"}.get(ext, ext)
        if self.kind not in ("dcd", "xtc", "h5", "traj"):
            raise ValueError(f"unknown trajectory format {ext!r} in {path}: "
                             "use .dcd, .xtc, .h5 or .traj")
        self.path, self.replica, self.topology = path, replica, topology
        self._writers: Dict[int, object] = {}

    def _paths(self, n_replicas: int) -> Dict[int, str]:
        if self.replica is not None:
            if not 0 <= self.replica < n_replicas:
                raise ValueError(f"replica {self.replica} out of range ({n_replicas} replicas)")
            return {self.replica: self.path}
        stem, ext = os.path.splitext(self.path)
        return {r: f"{stem}.r{r}{ext}" for r in range(n_replicas)}

    def open(self, state: MDState, integrator: Integrator) -> None:
        keep = state.step // self.interval + 1 if state.step > 0 else None
        top = self.topology
        if self.kind == "h5" and top is None:
            top = mdtraj_topology(state.atomic_numbers.cpu().numpy())
        for r, path in self._paths(state.n_replicas).items():
            w = _ASEWriter(path) if self.kind == "traj" else _MDTrajWriter(path, self.kind, top)
            w.open(keep)
            self._writers[r] = w

    def report(self, state: MDState, integrator: Integrator) -> None:
        if self.kind == "traj":
            for r, w in self._writers.items():
                w.write(state, r)
            return
        x = state.positions.detach().double().cpu().numpy()
        cell = state.cell.detach().double().cpu().numpy()
        for r, w in self._writers.items():
            w.write(x[r], cell[r], state.time_fs)

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers = {}
