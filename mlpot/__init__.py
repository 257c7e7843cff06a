"""mlpot: machine-learned interatomic potentials for molecular dynamics.

Train on DFT data, export one TorchScript file, run MD in ASE, OpenMM or mlpot's integrators.
Internal units: eV, Angstrom, fs, amu (see ``mlpot.units``).
"""
__version__ = "0.1.0"

from .neighbors import neighbor_list, neighbor_list_batch, pair_vectors  # noqa: E402
from . import export  # noqa: E402  (the module is callable: mlpot.export(model, "model.pt"))
from .export import load  # noqa: E402

__all__ = ["__version__", "neighbor_list", "neighbor_list_batch", "pair_vectors", "export",
           "load"]
