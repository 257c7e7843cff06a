"""mlpot as an openmm-ml potential: ``MLPotential("mlpot", modelPath="model.pt")``.

openmm-ml finds it through the ``openmmml.potentials`` entry point (``mlpot =
"mlpot.openmmml_plugin:MLPotImplFactory"`` in mlpot's package metadata); ``register()`` does the
same by hand where mlpot is not installed as a package.

Extra arguments: ``createSystem``/``createMixedSystem`` accept ``backend`` ('auto', 'torch',
'python') and ``device`` (for the PythonForce backend), passed on to ``mlpot.openmm``.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch  # noqa: F401 - before openmm-torch (CUDA libraries)
from openmmml.mlpotential import MLPotential, MLPotentialImpl, MLPotentialImplFactory

__all__ = ["MLPotImplFactory", "MLPotImpl", "register"]


class MLPotImplFactory(MLPotentialImplFactory):
    """Creates the openmm-ml implementation of an exported mlpot model."""

    # openmm-ml's camelCase names
    def createImpl(self, name: str, modelPath: Optional[str] = None,  # noqa: N802,N803
                   **args) -> "MLPotImpl":
        if modelPath is None:
            raise ValueError("MLPotential('mlpot') needs modelPath='model.pt' (a file written "
                             "by `mlpot export`)")
        if args:
            raise TypeError(f"MLPotential('mlpot'): unexpected arguments {sorted(args)}; "
                            "only modelPath is accepted here (backend and device go to "
                            "createSystem)")
        return MLPotImpl(modelPath)


class MLPotImpl(MLPotentialImpl):
    """Adds mlpot's OpenMM force (``mlpot.openmm.create_force``) to a System."""

    def __init__(self, model_path: str):
        from .export import read_metadata

        read_metadata(model_path)  # a clear error now for a file that is not an mlpot model
        self.model_path = model_path

    def addForces(self, topology, system, atoms: Optional[Iterable[int]],  # noqa: N802
                  forceGroup: int, backend: str = "auto", device: str = "cpu",  # noqa: N803
                  **args) -> None:
        from .openmm import atomic_numbers_of, create_force

        if args:
            raise TypeError(f"mlpot: unexpected arguments {sorted(args)}; accepted: backend, "
                            "device")
        numbers = atomic_numbers_of(topology)
        subset = None if atoms is None else list(atoms)
        if subset is not None:
            numbers = [numbers[i] for i in subset]
        periodic = (topology.getPeriodicBoxVectors() is not None
                    or system.usesPeriodicBoundaryConditions())
        system.addForce(create_force(self.model_path, numbers, atoms=subset, periodic=periodic,
                                     backend=backend, device=device, force_group=forceGroup,
                                     system=system))

    def getMLLongRange(self) -> bool:  # noqa: N802
        """mlpot models are short-ranged (a cutoff, no long-range electrostatics)."""
        return False


def register() -> None:
    """Register 'mlpot' with openmm-ml (done automatically through the entry point)."""
    if "mlpot" not in MLPotential._implFactories:
        MLPotential.registerImplFactory("mlpot", MLPotImplFactory())
