"""``mlpot doctor``: what is installed, what works, and what to do about what does not.

It prints the versions of the stack, whether the neighbor-list extension is built, and runs a
tiny real calculation (a small untrained model on a 3-atom molecule and a periodic box) through
the Python model, an exported file, the ASE calculator and every OpenMM platform with each force
backend (TorchForce, PythonForce), comparing each energy with the Python model's.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import sys
import tempfile
import time
import traceback
from typing import Callable, List, Optional, Tuple

_OK, _FAIL, _WARN = "ok", "FAIL", "warn"


class Report:
    def __init__(self, out=None):
        self.out = out if out is not None else sys.stdout
        self.advice: List[str] = []
        self.failed = 0
        self.warned = 0

    def line(self, status: str, what: str, detail: str = "") -> None:
        mark = {"ok": "[ ok ]", "FAIL": "[FAIL]", "warn": "[warn]", "info": "      "}[status]
        self.failed += status == _FAIL
        self.warned += status == _WARN
        print(f"  {mark} {what}{': ' + detail if detail else ''}", file=self.out, flush=True)

    def advise(self, text: str) -> None:
        if text not in self.advice:
            self.advice.append(text)


def _dist_version(name: str) -> Optional[str]:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------- advice
def advice_for(error: str) -> str:
    """Plain words for the failures seen most in this field."""
    import torch

    from .openmm.forces import TORCHFORCE_ADVICE

    tv = torch.__version__.split("+")[0]
    if "libnvrtc" in error or "libcudart" in error or "libc10" in error or "libtorch" in error:
        return ("openmm-torch could not find torch's libraries: import torch before openmm and "
                "openmmtorch in your scripts (mlpot.openmm does this itself, and reloads "
                "openmm-torch's plugins if openmm came first)")
    if "set_stride" in error or "undefined symbol" in error or "version mismatch" in error.lower():
        return (f"openmm-torch was built against another torch than the installed {tv}: this "
                f"is the torch/openmm-torch mismatch; {TORCHFORCE_ADVICE}")
    if "No module named 'openmmtorch'" in error:
        return f"openmm-torch is not installed; {TORCHFORCE_ADVICE}"
    if "PythonForce" in error:
        return "PythonForce needs OpenMM >= 8.5: `pip install -U openmm`"
    if "mlpot::neighbor_list" in error or "mlpot.neighbor_list" in error:
        return ("the model calls mlpot's compiled neighbor-list op, which this process did not "
                "load: call mlpot.load() (it loads the op), or rebuild it with "
                "`python -m mlpot.neighbors`")
    return ""


def _attempt(report: Report, what: str, fn: Callable[[], Tuple[str, str]]) -> bool:
    t0 = time.perf_counter()
    try:
        status, detail = fn()
    except Exception as err:  # noqa: BLE001 - the doctor reports every failure
        text = str(err).strip()
        msg = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
        report.line(_FAIL, what, msg)
        hint = advice_for(str(err) + traceback.format_exc())
        if hint:
            report.advise(hint)
        return False
    report.line(status, what, f"{detail} ({time.perf_counter() - t0:.1f} s)" if detail else "")
    return status != _FAIL


# ---------------------------------------------------------------------------- sections
def versions(report: Report) -> None:
    import torch

    print("versions:", file=report.out)
    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
    gpu = f", GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    report.line("info", f"python {sys.version.split()[0]}")
    report.line("info", f"torch {torch.__version__}{cuda}{gpu}")
    for dist in ("openmm", "openmmtorch", "e3nn", "ase", "numpy", "mdtraj", "openmmml"):
        v = _dist_version(dist) or _dist_version(dist.replace("openmm", "OpenMM"))
        report.line("info", f"{dist} {v or 'not installed'}")
    from . import __version__

    report.line("info", f"mlpot {__version__} ({os.path.dirname(os.path.abspath(__file__))})")
    try:
        from .openmm.forces import TORCHFORCE_ADVICE, torchforce_combination
    except Exception:  # noqa: BLE001 - OpenMM missing: its section says so
        return
    match, combination = torchforce_combination()
    if match is False:
        report.line(_WARN, "TorchForce combination", combination)
        report.advise(TORCHFORCE_ADVICE)
    elif match is None and _dist_version("openmmtorch") is None:
        report.line("info", f"TorchForce: {combination}; OpenMM uses PythonForce",
                    TORCHFORCE_ADVICE)
    else:
        report.line("info", f"TorchForce combination: {combination}")


def threads(report: Report) -> None:
    """How many threads torch uses against the cores other processes leave free."""
    import torch

    from .threads import free_core_threads

    n = torch.get_num_threads()
    found = free_core_threads()
    if found is None:  # not Linux: no per-core load to read
        report.line("info", f"threads: torch uses {n} on {os.cpu_count()} cores")
        return
    n_cores, busy, free = found
    detail = (f"torch uses {n} thread(s) on {n_cores} core(s); other processes keep {busy:.1f} "
              "core(s) busy")
    if free < n:
        report.line(_WARN, "threads", f"{detail}: the mlpot commands use {free} now")
        report.advise(f"other processes keep cores busy: from Python, call "
                      f"torch.set_num_threads({free}) (or set OMP_NUM_THREADS={free}); torch's "
                      "threads wait for each other where a core is taken, many times slower")
    else:
        report.line("info", f"threads: {detail}")


def extension(report: Report) -> None:
    import torch

    from . import neighbors

    print("neighbor-list extension:", file=report.out)
    try:
        backend = neighbors.backend()
    except Exception as err:  # noqa: BLE001
        report.line(_FAIL, "selecting the backend", f"{type(err).__name__}: {err}")
        report.advise("the neighbor-list module is broken; reinstall mlpot")
        return
    if backend == "cpp":
        report.line(_OK, f"compiled op loaded for torch {torch.__version__}",
                    neighbors.library_path() or "")
    else:
        reason = neighbors._STATE.get("reason", "")
        report.line("info", "pure-PyTorch fallback in use", reason)
        if "UnsafeCacheError" in reason:
            report.advise(reason.split("UnsafeCacheError: ", 1)[-1])  # why, and what to do
        elif "MLPOT_NO_EXTENSION" not in reason:
            report.advise("the compiled neighbor-list op is not built (models still work, with "
                          "the slower PyTorch neighbor list): run `python -m mlpot.neighbors` "
                          "to see why; it needs a C++ compiler and ninja")


def _tiny_model(path: str):
    """A small untrained float64 model, exported to ``path``."""
    from .export import export
    from .models import MODELS, build_model

    errors = []
    for name, hp in (("egnn", {"hidden": 8, "edge_hidden": 8, "num_layers": 1,
                               "readout_hidden": 8}),
                     ("dp_se_e2_a", {"embedding": [4, 8], "axis_neuron": 2, "fitting": [8]}),
                     ("nequip", {})):
        if name not in MODELS:
            continue
        try:
            model = build_model(name, ["H", "O"], cutoff=3.0, dtype="float64", **hp)
            export(model, path)
            return model, name
        except Exception as err:  # noqa: BLE001 - try the next family
            errors.append(f"{name}: {type(err).__name__}: {err}")
    raise RuntimeError("no model family could be built and exported: " + "; ".join(errors))


def calculations(report: Report, platforms: Optional[List[str]] = None) -> None:
    import numpy as np
    from ase import Atoms

    print("a tiny real calculation with each interface:", file=report.out)
    tmp = tempfile.mkdtemp(prefix="mlpot-doctor-")
    path = os.path.join(tmp, "model.pt")
    state = {}

    def build():
        state["model"], name = _tiny_model(path)
        return _OK, f"{name} model built and exported"

    if not _attempt(report, "build + export a model", build):
        return
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    box = Atoms("OH2OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0],
                                     [2.5, 2.5, 2.5], [3.4, 2.6, 2.5], [2.3, 3.4, 2.6]],
                cell=np.eye(3) * 5.0, pbc=True)

    def python_energy(atoms):
        from . import keys as K
        from . import testing

        data = testing.to_data(atoms, state["model"])
        return float(state["model"](data.as_dict())[K.ENERGY].detach()[0])

    ref = {k: python_energy(a) for k, a in (("molecule", water), ("box", box))}

    def check(value: float, key: str) -> Tuple[str, str]:
        err = abs(value - ref[key])
        if err > 1e-6 * (1 + abs(ref[key])):
            raise RuntimeError(f"energy {value:.8f} eV differs from the Python model's "
                               f"{ref[key]:.8f} eV")
        return _OK, f"|dE| = {err:.1e} eV"

    def exported():
        from .export import load

        state["exported"] = load(path)
        from .ase import MLPotCalculator

        atoms = box.copy()
        atoms.calc = MLPotCalculator(state["exported"])
        return check(atoms.get_potential_energy(), "box")

    _attempt(report, "exported file + ASE calculator", exported)
    if "exported" not in state:
        return
    _openmm_checks(report, state["exported"], water, box, check, platforms)


def _openmm_checks(report, model, water, box, check, platforms) -> None:
    try:
        import openmm
    except Exception as err:  # noqa: BLE001
        report.line(_FAIL, "import openmm", str(err))
        report.advise("install OpenMM: `pip install openmm`")
        return
    from .openmm import backend_status, repair_torch_plugins

    repaired = repair_torch_plugins()
    if repaired:
        report.line("info", "reloaded openmm-torch plugins that failed because openmm was "
                    "imported before torch", ", ".join(os.path.basename(p) for p in repaired))
    names = [openmm.Platform.getPlatform(i).getName()
             for i in range(openmm.Platform.getNumPlatforms())]
    if backend_status("torch")[0]:
        _torchforce_serialization(report)
    for backend in ("torch", "python"):
        ok, why = backend_status(backend)
        label = {"torch": "TorchForce", "python": "PythonForce"}[backend]
        if not ok and backend == "torch" and "No module named 'openmmtorch'" in why:
            report.line("info", "OpenMM TorchForce: openmm-torch is not installed (optional: "
                        "OpenMM runs mlpot through PythonForce)")
            continue
        if not ok and backend == "torch" and "it crashes with this torch" in why:
            report.line(_WARN, f"OpenMM {label}", why)  # auto takes PythonForce
            continue
        if not ok:
            report.line(_FAIL, f"OpenMM {label}", why)
            hint = advice_for(why)
            if hint:
                report.advise(hint)
            continue
        for platform in names:
            if platforms and platform not in platforms:
                continue
            for key, atoms in (("molecule", water), ("box", box)):
                _attempt(report, f"OpenMM {label} on {platform}, {key}",
                         lambda b=backend, p=platform, k=key, a=atoms:
                         check(_openmm_energy(model, a, b, p), k))


_SERIALIZE_TORCHFORCE = """
import torch, openmm, openmmtorch
class M(torch.nn.Module):
    def forward(self, positions):
        return (positions ** 2).sum()
force = openmmtorch.TorchForce(torch.jit.script(M()))
openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(force))
"""


def _torchforce_serialization(report: Report) -> None:
    """XmlSerializer round trip of a TorchForce, in a child process (some openmm-torch builds
    crash there)."""
    import subprocess

    script = os.path.join(tempfile.mkdtemp(prefix="mlpot-doctor-"), "serialize.py")
    with open(script, "w") as f:  # TorchScript needs the source in a file
        f.write(_SERIALIZE_TORCHFORCE)
    try:
        res = subprocess.run([sys.executable, script], capture_output=True, text=True,
                             timeout=120)
    except subprocess.TimeoutExpired:
        report.line(_WARN, "TorchForce XML serialization round trip", "timed out")
        return
    if res.returncode == 0:
        report.line(_OK, "TorchForce XML serialization round trip")
        return
    why = "segmentation fault" if res.returncode in (-11, 139) else (
        res.stderr.strip().splitlines() or ["exit code %d" % res.returncode])[-1]
    report.line(_WARN, "TorchForce XML serialization round trip", f"crashes ({why})")
    report.advise("this openmm-torch build crashes when it deserializes a TorchForce (System XML "
                  "files, copy.deepcopy of a System): rebuild Systems with mlpot.openmm instead of "
                  "saving them as XML, or use backend='python' (a PythonForce serializes)")


def _openmm_energy(model, atoms, backend: str, platform: str) -> float:
    import openmm
    from openmm import unit

    from . import units
    from .openmm import create_force

    system = openmm.System()
    for m in atoms.get_masses():
        system.addParticle(m)
    periodic = bool(atoms.pbc.all())
    if periodic:
        system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*(v * units.ANGSTROM_TO_NM))
                                              for v in atoms.cell.array])
    system.addForce(create_force(model, atoms.numbers, periodic=periodic, backend=backend))
    context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName(platform))
    context.setPositions(atoms.positions * units.ANGSTROM_TO_NM)
    energy = context.getState(getEnergy=True).getPotentialEnergy()
    return energy.value_in_unit(unit.kilojoule_per_mole) * units.KJ_PER_MOL_TO_EV


def run_doctor_checks(platforms: Optional[List[str]] = None, out=None) -> int:
    import torch  # noqa: F401 - first, before openmm and openmmtorch

    report = Report(out)
    out = report.out
    versions(report)
    threads(report)
    extension(report)
    calculations(report, platforms)
    print("", file=out)
    if report.advice:
        print("what to do:", file=out)
        for k, text in enumerate(report.advice, 1):
            print(f"  {k}. {text}", file=out)
    if report.failed:
        print(f"{report.failed} check(s) failed", file=out)
    elif report.warned:
        print("everything works, with the warning(s) above", file=out)
    else:
        print("everything works", file=out)
    return 1 if report.failed else 0


# ---------------------------------------------------------------------------- CLI
def add_doctor_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "doctor", help="versions, extension, and a real calculation through every interface",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--platform", action="append", dest="platforms", default=None,
                   help="only this OpenMM platform (repeatable; default: all)")
    p.set_defaults(func=run_doctor)


def run_doctor(args) -> int:
    return run_doctor_checks(platforms=getattr(args, "platforms", None))


if __name__ == "__main__":
    sys.exit(run_doctor_checks())
