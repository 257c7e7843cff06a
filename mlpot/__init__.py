"""mlpot: machine-learned interatomic potentials for molecular dynamics.

Train on DFT data, export one TorchScript file, run MD in ASE, OpenMM or mlpot's integrators.
Internal units: eV, Angstrom, fs, amu (see ``mlpot.units``).
"""
__version__ = "0.1.0"

import warnings  # noqa: E402

# torch >= 2.11 warns at every torch.jit.script/save/load that TorchScript is deprecated. The
# TorchScript file is mlpot's portable format by design (openmm-torch, LAMMPS, C++ read it; the
# AOTInductor .pt2 export is the path beside it), so these calls are intended: say it once here
# (README, "torch versions") rather than at every model load in an MD script.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.(script|save|load|trace)` is deprecated",
                        category=FutureWarning)

from .neighbors import neighbor_list, neighbor_list_batch, pair_vectors  # noqa: E402
from . import export  # noqa: E402  (the module is callable: mlpot.export(model, "model.pt"))
from .export import load  # noqa: E402

__all__ = ["__version__", "neighbor_list", "neighbor_list_batch", "pair_vectors", "export",
           "load"]
