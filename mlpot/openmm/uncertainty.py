"""A committee's uncertainty during an OpenMM run: ``UncertaintyReporter``.

openmm-torch's ``TorchForce`` returns an energy and nothing else, so a committee's deviations
cannot come out of the force. This reporter evaluates the committee itself on the ML atoms every
``interval`` steps (positions from the OpenMM state, nm -> Angstrom by ``mlpot.units``; the box
as the cell when the System is periodic) and writes one CSV row per report::

    step,time_ps,max_force_dev,energy_dev[,virial_dev],max_force_dev_calibrated,...

(raw values with DeePMD-kit's definitions, ``mlpot.uncertainty``: eV/A and eV/atom; the
calibrated columns follow when the model has them; ``virial_dev`` for a periodic System, from a
stress evaluation). Given ``threshold`` (eV/A, compared with the raw ``max_force_dev``), the
first report above it writes the structure of the ML atoms that crossed it (extxyz, with step
and ``max_force_dev`` in its info) to ``last_path`` and raises
``integrators.health.UncertaintyStopped``: the health check's ``RunStopped`` (exit code 3 in a
command) with a one-line message, so ``simulation.step`` stops there.

    >>> rep = UncertaintyReporter("committee.pt", ml_atoms, "uncertainty.csv", 100, threshold=0.15)
    >>> simulation.reporters.append(rep)

The cost is one committee evaluation (energy and forces; with stress for periodic Systems) per
report, besides the force's own.
"""
from __future__ import annotations

import csv
import math
from typing import Optional, Sequence

import numpy as np
import torch

from .. import keys as K
from .. import units
from ..errors import UserError
from ..export import as_exported
from ..inputs import read_outputs, structure_inputs

__all__ = ["UncertaintyReporter"]

_DEVIATIONS = (K.MAX_FORCE_DEV, K.ENERGY_DEV, K.VIRIAL_DEV)


class UncertaintyReporter:
    """An OpenMM reporter writing a committee's deviations to CSV and, given ``threshold``,
    stopping the run when ``max_force_dev`` passes it.

    Args:
        model: a committee: exported file, ``ExportedModel`` or ``Committee`` module.
        atoms: indices of the ML atoms in the System; None for all atoms.
        file: the CSV path.
        interval: steps between reports (>= 1).
        threshold: eV/A on the raw ``max_force_dev``; None: only write the CSV.
        last_path: where the structure that crossed the threshold is written (extxyz).
        device: torch device of the evaluation.
    """

    def __init__(self, model, atoms: Optional[Sequence[int]], file: str, interval: int = 100,
                 threshold: Optional[float] = None, last_path: str = "md_uncertain.xyz",
                 device: str = "cpu"):
        if int(interval) != interval or interval < 1:
            raise UserError(f"UncertaintyReporter: interval must be a whole number of steps "
                            f">= 1, got {interval}")
        if threshold is not None and not (0 < threshold < math.inf):
            raise UserError(f"UncertaintyReporter: threshold must be a number of eV/A > 0 (a "
                            f"max_force_dev; DP-GEN's trust levels are 0.05-0.15), got "
                            f"{threshold}")
        self.model = as_exported(model, device)
        if not self.model.uncertainty:
            raise UserError("UncertaintyReporter needs a model with an uncertainty (one that "
                            "gives a max_force_dev); this is a single model without one: train "
                            "a committee (training.ensemble: K) or a model with a variance "
                            "network (model.uncertainty: mve) and export it")
        self.atoms = None if atoms is None else np.asarray(list(atoms), dtype=np.int64)
        self.file, self.interval = file, int(interval)
        self.threshold = None if threshold is None else float(threshold)
        self.last_path = last_path
        self.device = torch.device(device)
        self.last: Optional[dict] = None  # the outputs of the last report (one structure)
        self._types = self._numbers = None
        self._fh = self._writer = None
        self._columns = None

    def describeNextReport(self, simulation):
        steps = self.interval - simulation.currentStep % self.interval
        return {"steps": steps, "periodic": False, "include": ["positions"]}

    def _setup(self, simulation) -> None:
        numbers = np.asarray([a.element.atomic_number if a.element is not None else 0
                              for a in simulation.topology.atoms()], dtype=np.int64)
        if self.atoms is not None:
            if self.atoms.size and (self.atoms.min() < 0 or self.atoms.max() >= len(numbers)):
                raise UserError(f"UncertaintyReporter: ML atom indices must be in 0..."
                                f"{len(numbers) - 1} (the System's atoms)")
            numbers = numbers[self.atoms]
        self._numbers = numbers
        self._types = self.model.atom_types(numbers, where="UncertaintyReporter").to(self.device)
        self._periodic = bool(simulation.system.usesPeriodicBoundaryConditions())

    def evaluate(self, positions_A: np.ndarray, cell_A: Optional[np.ndarray]) -> dict:
        """The committee's outputs for one structure of the ML atoms (A; cell rows or None):
        ``read_outputs`` of one structure, with the stress (and ``virial_dev``) when periodic."""
        dtype = self.model.dtype
        pos = torch.as_tensor(positions_A, dtype=dtype, device=self.device)
        cell = pbc = None
        if cell_A is not None:
            cell = torch.as_tensor(cell_A, dtype=dtype, device=self.device)
            pbc = torch.ones(3, dtype=torch.bool, device=self.device)
        data = structure_inputs(pos, self._types, cell, pbc)
        periodic = cell_A is not None
        out = read_outputs(self.model(data, True, periodic), 1, periodic)
        if K.MAX_FORCE_DEV not in out:
            raise UserError("UncertaintyReporter: the model returned no max_force_dev; give a "
                            "committee")
        return out

    def report(self, simulation, state) -> None:
        from openmm import unit

        from integrators.health import UncertaintyStopped

        if self._types is None:
            self._setup(simulation)
        x = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
                       dtype=np.float64) * units.NM_TO_ANGSTROM
        if self.atoms is not None:
            x = x[self.atoms]
        cell = None
        if self._periodic:
            cell = np.asarray(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(
                unit.nanometer), dtype=np.float64) * units.NM_TO_ANGSTROM
        out = self.evaluate(x, cell)
        self.last = {k: v[0].cpu().numpy() for k, v in out.items()}
        step = int(simulation.currentStep)
        self._write(step, state.getTime().value_in_unit(unit.picosecond))
        dev = float(self.last[K.MAX_FORCE_DEV])
        if self.threshold is None or dev <= self.threshold:
            return
        saved = self._save(x, cell, step, dev)
        raise UncertaintyStopped(
            f"OpenMM run stopped by the uncertainty check at step {step}: the committee's "
            f"max_force_dev {dev:.4g} eV/A passed the threshold {self.threshold:g} eV/A{saved}. "
            "The model is extrapolating: label the saved structure and add it to the training "
            "data, or raise the threshold")

    def _write(self, step: int, time_ps: float) -> None:
        if self._fh is None:
            names = [k for k in _DEVIATIONS if k in self.last]
            names += [k + K.CALIBRATED_SUFFIX for k in names
                      if k + K.CALIBRATED_SUFFIX in self.last]
            self._columns = names
            self._fh = open(self.file, "w", newline="")
            self._writer = csv.writer(self._fh)
            self._writer.writerow(["step", "time_ps"] + names)
        self._writer.writerow([step, f"{time_ps:.6g}"]
                              + [f"{float(self.last[k]):.10g}" for k in self._columns])
        self._fh.flush()

    def _save(self, x: np.ndarray, cell: Optional[np.ndarray], step: int, dev: float) -> str:
        if not self.last_path:
            return ""
        try:
            from ase import Atoms

            atoms = Atoms(numbers=self._numbers, positions=x,
                          cell=np.zeros((3, 3)) if cell is None else cell, pbc=cell is not None)
            atoms.info.update(step=step, max_force_dev=dev)
            atoms.write(self.last_path, format="extxyz")
            return (f"; the structure of the ML atoms that crossed it (step {step}) was written "
                    f"to {self.last_path}")
        except Exception as err:  # noqa: BLE001 - the stop matters more than this error
            return f"; writing the structure to {self.last_path} failed: {err}"

    def close(self) -> None:
        """Close the CSV (also done when the reporter is garbage collected)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
