"""One function that builds the OpenMM force of an mlpot model with either backend.

* ``"torch"``: openmm-torch's ``TorchForce`` running the scripted ``OpenMMWrapper`` in C++ (no
  Python in the MD loop; the model follows the platform's device, e.g. CUDA).
* ``"python"``: OpenMM's ``PythonForce`` (OpenMM >= 8.5) calling the same wrapper from Python on
  the device you choose; works whatever torch version is installed.

``backend="auto"`` takes TorchForce where openmm-torch is installed for the installed torch
(``torchforce_combination``: the openmmtorch 1.5 wheels on PyPI are built against torch 2.9 and
crash with later ones; Acellera's ``acellera-openmmtorch-*`` 1.10 wheels declare torch >= 2.10,
< 2.13), else PythonForce, and says so once.
"""
from __future__ import annotations

import io
import logging
import os
import re
import tempfile
import warnings
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import jit
from ..errors import UserError
from ..export import ExportedModel, as_exported, register_neighbor_op
from .wrapper import OpenMMWrapper

__all__ = ["create_force", "backend_status", "select_backend", "repair_torch_plugins", "BACKENDS",
           "OpenMMSetupError"]

BACKENDS = ("torch", "python")
_ALIASES = {"torch": "torch", "torchforce": "torch", "openmmtorch": "torch",
            "python": "python", "pythonforce": "python"}
_WARNED = set()
logger = logging.getLogger("mlpot")


# ---------------------------------------------------------------------------- availability
def _release(version: str) -> Tuple[int, ...]:
    """The leading release numbers: "2.10.0+cpu" -> (2, 10, 0), "2.11.0rc1" -> (2, 11, 0)."""
    return tuple(int(re.match(r"\d*", part).group() or 0)
                 for part in version.split("+")[0].split(".")[:3])


def _satisfies(version: str, spec: str) -> bool:
    """``version`` within a simple specifier such as ``>=2.10,<2.13`` (release numbers only)."""
    v = _release(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op = next(o for o in ("==", ">=", "<=", "!=", ">", "<", "~=") if clause.startswith(o))
        ref = clause[len(op):].strip()
        if op == "==" and ref.endswith(".*"):
            ok = v[:len(_release(ref[:-2]))] == _release(ref[:-2])
        else:
            r = _release(ref)
            w = v[:len(r)] if op in ("==", "!=") else v + (0,) * (len(r) - len(v))
            ok = {"==": w == r, "!=": w != r, ">=": v >= r, "<=": v <= r, ">": v > r,
                  "<": v < r, "~=": v >= r and v[:len(r) - 1] == r[:-1]}[op]
        if not ok:
            return False
    return True


# openmm-torch's wheels on PyPI and the torch each is built for. PyPI's openmmtorch 1.5 declares
# no torch requirement, but is built against torch 2.9 (openmm-torch issue 175); Acellera's
# wheels declare theirs (read from their metadata when installed).
_TORCHFORCE_WHEELS = {"openmmtorch": "==2.9.*"}
TORCHFORCE_ADVICE = (
    "for TorchForce: torch 2.9 with `pip install -e \".[torchforce]\"` (openmmtorch 1.5 from "
    "PyPI), or with torch 2.10-2.12 Acellera's `pip install acellera-openmmtorch-cpu==1.10` "
    "(or -cu12/-cu13; not checked here), or openmm-torch built from source or from conda-forge "
    "for your torch; without it OpenMM uses PythonForce, which needs no openmm-torch")


def torchforce_combination() -> Tuple[Optional[bool], str]:
    """(True: the installed openmm-torch distribution is built for the installed torch; False:
    it is not; None: no openmm-torch distribution is installed, or one whose torch is unknown
    (built from source, conda: trusted)), and a line naming the combination."""
    from importlib import metadata

    tv = torch.__version__
    try:
        dists = metadata.packages_distributions().get("openmmtorch", [])
    except Exception:  # noqa: BLE001 - odd environments: fall back to the import check
        dists = []
    if not dists:
        return None, f"torch {tv}; no openmm-torch distribution found"
    name = dists[0]
    version = metadata.version(name)
    spec = _TORCHFORCE_WHEELS.get(name.lower())
    for req in metadata.requires(name) or []:
        head = req.split(";")[0].replace(" ", "")
        if head.lower().startswith("torch") and head[5:6] in "<>=!~(" and head[5:6]:
            spec = head[5:].strip("()")
    what = f"torch {tv} with {name} {version}"
    if spec is None:
        return None, what + " (torch requirement unknown: assumed to match)"
    if _satisfies(tv, spec):
        return True, what + f" (built for torch {spec})"
    return False, what + f", which is built for torch {spec}"


def backend_status(backend: str) -> Tuple[bool, str]:
    """(usable, reason if not) for 'torch' or 'python'; imports only, no calculation (``mlpot
    doctor`` runs real ones)."""
    backend = _ALIASES.get(backend.lower(), backend)
    if backend == "torch":
        match, combination = torchforce_combination()
        if match is False:
            return False, (f"{combination}: it crashes with this torch; {TORCHFORCE_ADVICE}")
        try:
            import openmmtorch  # noqa: F401 - torch is imported first (it loads CUDA libraries)
        except Exception as err:  # noqa: BLE001
            return False, f"openmmtorch cannot be imported ({type(err).__name__}: {err})"
        return True, ""
    if backend == "python":
        import openmm

        if not hasattr(openmm, "PythonForce"):
            return False, f"OpenMM {openmm.__version__} has no PythonForce (needs OpenMM >= 8.5)"
        return True, ""
    raise ValueError(f"unknown backend '{backend}'; choose one of {BACKENDS} or 'auto'")


def select_backend(backend: str = "auto") -> str:
    """The backend to use: ``backend`` itself (checked), or for 'auto' TorchForce where it works
    and PythonForce otherwise (with one warning saying why)."""
    name = _ALIASES.get(backend.lower(), backend.lower())
    if name != "auto":
        ok, why = backend_status(name)
        if not ok:
            raise RuntimeError(f"mlpot.openmm: the '{name}' backend is not usable: {why}. "
                               "Run `mlpot doctor` for a diagnosis")
        return name
    ok, why = backend_status("torch")
    if ok:
        return "torch"
    ok_py, why_py = backend_status("python")
    if not ok_py:
        raise RuntimeError(f"mlpot.openmm: no OpenMM backend is usable: TorchForce: {why}; "
                           f"PythonForce: {why_py}. Run `mlpot doctor` for a diagnosis")
    if "fallback" not in _WARNED:
        _WARNED.add("fallback")
        warnings.warn(f"mlpot.openmm: using OpenMM's PythonForce because TorchForce is not "
                      f"usable: {why}", RuntimeWarning, stacklevel=3)
    return "python"


# ---------------------------------------------------------------------------- PythonForce
class PythonComputation:
    """The function a PythonForce calls: State -> (energy kJ/mol, forces kJ/mol/nm).

    Picklable (the scripted wrapper travels as bytes), so a System holding it can be saved with
    ``XmlSerializer``.
    """

    def __init__(self, wrapper: torch.jit.ScriptModule, periodic: bool, device: str = "cpu"):
        self.device = torch.device(device)
        self.wrapper = wrapper.to(self.device)
        self.periodic = periodic

    def __call__(self, state):
        from openmm import unit

        pos = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        problem = self.wrapper.particle_count_error(len(pos))
        if problem:  # here rather than in the wrapper: one line, no TorchScript traceback
            raise OpenMMSetupError(problem)
        pos = torch.from_numpy(np.ascontiguousarray(pos)).to(self.device)
        box = None
        if self.periodic:
            box = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer)
            box = torch.from_numpy(np.ascontiguousarray(box)).to(self.device)
        with torch.jit.optimized_execution(False):  # as ExportedModel (and openmm-torch) do
            energy, forces = self.wrapper(pos, box)
        return float(energy.detach()), forces.detach().cpu().numpy()

    def __getstate__(self) -> Dict:
        if not isinstance(self.wrapper, torch.jit.ScriptModule):  # a .pt2 model: by its path
            return {"aoti": self.wrapper.model.path, "periodic": self.periodic,
                    "atom_types": self.wrapper.atom_types.tolist(), "device": str(self.device)}
        buffer = io.BytesIO()
        with jit.quiet():
            torch.jit.save(self.wrapper.cpu(), buffer)
        self.wrapper.to(self.device)
        return {"wrapper": buffer.getvalue(), "periodic": self.periodic,
                "device": str(self.device)}

    def __setstate__(self, state: Dict) -> None:
        if "aoti" in state:
            from ..export import load

            model = load(state["aoti"])
            wrapper = OpenMMWrapper(model, torch.tensor(state["atom_types"]), None,
                                    state["periodic"], model.dtype)
            self.__init__(wrapper, state["periodic"], state["device"])
            return
        register_neighbor_op()
        with jit.quiet():
            wrapper = torch.jit.load(io.BytesIO(state["wrapper"]), map_location="cpu")
        self.__init__(wrapper, state["periodic"], state["device"])


# ---------------------------------------------------------------------------- the builder
class OpenMMSetupError(UserError, ValueError):
    """The atoms given to ``create_force`` do not fit the System (exit code 2)."""


def check_atom_count(numbers: np.ndarray, subset: Optional[np.ndarray],
                     n_particles: Optional[int] = None) -> np.ndarray:
    """The atomic numbers of the ML atoms, after checking the atoms given to ``create_force``
    against each other and, when known, against the System's particle count."""
    n = len(numbers)
    if subset is None:
        if n_particles is not None and n != n_particles:
            raise OpenMMSetupError(
                f"mlpot.openmm: the force is for {n} atoms (one per atomic number given) but the "
                f"System has {n_particles} particles; give one atomic number per particle, or "
                "atoms=[...] with the indices of the ML atoms")
        return numbers
    if len(set(subset.tolist())) != len(subset):
        raise OpenMMSetupError("mlpot.openmm: the ML atom indices contain duplicates")
    if len(subset) and subset.min() < 0:
        raise OpenMMSetupError(f"mlpot.openmm: ML atom index {int(subset.min())} is negative; "
                               "indices count the System's particles from 0")
    if n_particles is not None and len(subset) and subset.max() >= n_particles:
        raise OpenMMSetupError(
            f"mlpot.openmm: ML atom index {int(subset.max())} is outside the System's "
            f"{n_particles} particles (indices 0..{n_particles - 1})")
    if n == len(subset):
        return numbers
    if (n_particles is not None and n != n_particles) or (len(subset) and subset.max() >= n):
        of_system = f" and {n_particles} particles" if n_particles is not None else ""
        raise OpenMMSetupError(
            f"mlpot.openmm: {n} atomic numbers for {len(subset)} ML atoms{of_system}; give one "
            "atomic number per ML atom, or one per particle of the System")
    return numbers[subset]


def atom_types_of(model: ExportedModel, atomic_numbers: Sequence[int],
                  where: str = "mlpot.openmm") -> torch.Tensor:
    """Type indices of atoms given by atomic number (a clear error for unknown elements)."""
    return model.atom_types(atomic_numbers, where=where)


def create_force(model, atomic_numbers: Sequence[int], atoms: Optional[Sequence[int]] = None,
                 periodic: bool = False, backend: str = "auto", device: str = "cpu",
                 force_group: int = 0, jit_optimize: bool = False, system=None):
    """An OpenMM ``Force`` computing the model's energy on (a subset of) a System's atoms.

    The atom count is checked against ``system`` here when it is given (``OpenMMSetupError``
    naming both counts); without it, a force added to a System of another size stops at its
    first evaluation with the same message (the ML atom indices of a PythonForce can only be
    checked here).

    Args:
        model: an exported model file, an ``ExportedModel`` or a ``Potential``.
        atomic_numbers: atomic number of every particle of the System (or of the ML atoms
            only, when ``atoms`` is given and has the same length).
        atoms: indices of the ML atoms; None for all.
        periodic: pass the box vectors to the model (periodic System).
        backend: 'torch' (TorchForce), 'python' (PythonForce) or 'auto'.
        device: torch device for the PythonForce backend (TorchForce follows the platform).
        force_group: the OpenMM force group of the new force.
        jit_optimize: TorchForce only. openmm-torch calls the model in the thread that steps
            the integrator, under TorchScript's optimizing executor, whose differentiable
            subgraphs make these models 1.2-1.5x slower on CPU. With False (default) mlpot
            switches that executor off for the calling thread (TorchScript modules called from
            this thread then run unoptimized, as ``mlpot.load``'s calls always do); True
            leaves the thread as it is.
        system: the ``openmm.System`` the force is for (not modified: add the force yourself);
            its particle count is checked against the atoms now.
    """
    numbers = np.asarray(atomic_numbers, dtype=np.int64).reshape(-1)
    subset = None if atoms is None else np.asarray(list(atoms), dtype=np.int64).reshape(-1)
    n_particles = None if system is None else int(system.getNumParticles())
    numbers = check_atom_count(numbers, subset, n_particles)
    model = as_exported(model)
    compiled = model.format == "aoti"  # a .pt2: native code, called from Python (PythonForce)
    if compiled and backend == "torch":
        raise OpenMMSetupError("mlpot.openmm: TorchForce runs TorchScript files; a .pt2 model "
                               "runs with backend='python' (PythonForce) or 'auto'")
    name = select_backend("python" if compiled else backend)
    types_ = atom_types_of(model, numbers)
    if name == "torch":
        indices = None if subset is None else torch.from_numpy(subset)
        # a fresh copy of the model, wrapped and saved with the optimizer on: a module already
        # run by the unoptimized executor (mlpot.load's calls), or scripted under it, leaves
        # openmm-torch's copy without its submodules' methods
        with torch.jit.optimized_execution(True), jit.quiet():
            buffer = io.BytesIO()
            torch.jit.save(model.module, buffer)
            buffer.seek(0)
            wrapper = torch.jit.script(OpenMMWrapper(torch.jit.load(buffer), types_, indices,
                                                     periodic, model.dtype))
            force = _torch_force(wrapper, periodic, force_group)
        if not jit_optimize:
            _no_jit_optimization_in_this_thread()
        return force
    wrapper = OpenMMWrapper(model if compiled else model.module, types_, None, periodic,
                            model.dtype)
    if not compiled:
        with jit.quiet():
            wrapper = torch.jit.script(wrapper)
    return _python_force(wrapper, subset, periodic, device, force_group)


def _no_jit_optimization_in_this_thread() -> None:
    if torch._C._get_graph_executor_optimize():
        torch._C._set_graph_executor_optimize(False)
        logger.info("mlpot.openmm: TorchScript's optimizing executor switched off in this thread "
                    "(faster TorchForce on CPU; create_force(..., jit_optimize=True) keeps it)")


def repair_torch_plugins() -> list:
    """Load openmm-torch's OpenMM plugins that failed to load because ``openmm`` was imported
    before ``torch`` (they need the CUDA libraries torch brings, e.g. libnvrtc). Returns the
    libraries loaded now."""
    import re

    import openmm

    repaired = []
    for failure in openmm.Platform.getPluginLoadFailures():
        m = re.match(r"Error loading library (\S+): (.*)", failure)
        if not m or "Torch" not in m.group(1) or m.group(1) in _REPAIRED:
            continue
        try:
            openmm.Platform.loadPluginLibrary(m.group(1))
        except Exception:  # noqa: BLE001 - e.g. OpenCL plugin without libOpenCL: not ours
            continue
        _REPAIRED.add(m.group(1))
        repaired.append(m.group(1))
    return repaired


_REPAIRED = set()


def _torch_force(wrapper, periodic: bool, force_group: int):
    import openmmtorch

    repair_torch_plugins()
    register_neighbor_op()  # openmm-torch loads the module in C++: the op must be registered here
    # Submodule calls inlined into forward, and the force made from a file (and, in create_force,
    # scripted with the optimizer on): without any one of the three, openmm-torch's module fails
    # under the unoptimized executor ("Couldn't find method: 'forward' on class ...
    # NeighborListOp"). Parameters stay attributes, so .to(device) still moves them.
    torch._C._jit_pass_inline(wrapper.graph)
    with tempfile.TemporaryDirectory(prefix="mlpot-torchforce-") as tmp:
        path = os.path.join(tmp, "wrapper.pt")
        wrapper.save(path)
        force = openmmtorch.TorchForce(path)
    force.setOutputsForces(True)
    force.setUsesPeriodicBoundaryConditions(bool(periodic))
    force.setForceGroup(force_group)
    force.setName("mlpot")
    return force


def _python_force(wrapper, subset, periodic: bool, device: str, force_group: int):
    import openmm

    force = openmm.PythonForce(PythonComputation(wrapper, periodic, device))
    if subset is not None:
        force.setParticles([int(i) for i in subset])
    force.setUsesPeriodicBoundaryConditions(bool(periodic))
    force.setForceGroup(force_group)
    force.setName("mlpot")
    return force
