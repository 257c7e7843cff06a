"""OpenMM forces and Systems from mlpot models.

>>> import mlpot.openmm as mo
>>> system = mo.create_system("model.pt", topology)                       # all ML
>>> system = mo.create_mixed_system("model.pt", topology, mm_system, ml)  # ML/MM
>>> force = mo.create_force("model.pt", atomic_numbers, atoms=ml, periodic=True,
...                         system=system)  # checks the atoms against the System

Every builder takes ``backend``: ``"torch"`` (openmm-torch's ``TorchForce``, the model runs in
C++ on the platform's device), ``"python"`` (OpenMM's ``PythonForce``, OpenMM >= 8.5, the model
runs from Python on ``device``) or ``"auto"`` (TorchForce where openmm-torch works, else
PythonForce, with one warning). Positions and energies are converted at the boundary (nm ->
Angstrom, eV -> kJ/mol) by the factors of ``mlpot.units``.
"""
import torch  # noqa: F401 - first: openmmtorch needs the CUDA libraries torch loads

from .forces import (BACKENDS, OpenMMSetupError, backend_status, create_force,
                     repair_torch_plugins, select_backend)
from .systems import (atomic_numbers_of, create_mixed_system, create_system, ml_atoms_of,
                      topology_from_ase)
from .uncertainty import UncertaintyReporter
from .wrapper import OpenMMWrapper

__all__ = ["create_force", "create_system", "create_mixed_system", "backend_status",
           "select_backend", "repair_torch_plugins", "atomic_numbers_of", "ml_atoms_of",
           "topology_from_ase", "OpenMMWrapper", "OpenMMSetupError", "BACKENDS",
           "UncertaintyReporter"]
