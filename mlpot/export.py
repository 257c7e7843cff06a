"""Checkpoints and exported models.

Two file kinds, both written atomically (temporary file + ``os.replace``):

* a **checkpoint** (``save_checkpoint`` / ``load_checkpoint``): a ``torch.save``'d dict with
  ``"config"`` (``Potential.config``, rebuilds the architecture), ``"model"`` (state dict) and
  optionally ``"ema"`` (state dict of the exponential moving average of the weights, preferred when
  present), ``"data_hash"`` (of the training data) and anything else the trainer keeps
  (optimizer state, epoch).
* an **exported model** (``export`` / ``load``): one TorchScript file holding the scripted
  ``Potential`` and, as the extra file ``mlpot.json``, its metadata: format version, mlpot version,
  type map, cutoff (Angstrom), units (Angstrom, eV), dtype, config and the training-data hash. It
  loads with ``torch.jit.load`` in a process that has torch and, when the model calls it, mlpot's
  neighbor-list op library (``torch.ops.load_library(mlpot.neighbors.library_path())``), and
  nothing else of mlpot.

The module itself is callable, so ``mlpot.export(model, "model.pt")`` works beside
``mlpot.export.load_checkpoint(...)``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import types
import zipfile
from typing import Dict, Iterable, Optional, Union

import torch

from .files import atomic_write

__all__ = ["export", "load", "read_metadata", "save_checkpoint", "load_checkpoint",
           "hash_files", "ExportedModel", "ExportError", "FORMAT_VERSION", "METADATA_NAME"]

FORMAT_VERSION = 1  # bump when a file written now could be misread by an older mlpot
METADATA_NAME = "mlpot.json"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ExportError(ValueError):
    """A file that is not an mlpot model, or one this mlpot cannot read."""


# ---------------------------------------------------------------------------- small helpers
def hash_files(paths: Iterable[str]) -> str:
    """sha256 over the contents of the given files (sorted by name): a training-data hash."""
    digest = hashlib.sha256()
    for p in sorted(os.fspath(p) for p in paths):
        digest.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def load_library() -> Optional[str]:
    """Load mlpot's neighbor-list op into this process (no-op when it is not built); its path."""
    try:
        from .neighbors import backend, library_path

        if backend() != "cpp":
            return None
        path = library_path()
    except Exception:  # noqa: BLE001 - a missing/broken op: the scripted fallback needs none
        return None
    if path:
        torch.ops.load_library(path)
    return path


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(potential, path: str, ema_state: Optional[Dict] = None,
                    training_data_hash: Optional[str] = None, **extra) -> str:
    """Write ``{"config", "model", ["ema"], ["data_hash"], **extra}`` atomically."""
    ckpt = {"config": potential.config, "model": potential.state_dict(),
            "mlpot_version": _version()}
    if ema_state is not None:
        ckpt["ema"] = ema_state
    if training_data_hash is not None:
        ckpt["data_hash"] = training_data_hash
    ckpt.update(extra)
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
    return os.fspath(path)


def _read_checkpoint(path: str) -> Dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if _is_torchscript(path):
        raise ExportError(f"{path} is an exported (TorchScript) model, not a training "
                          "checkpoint; load it with mlpot.load()")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"{path} is not an mlpot checkpoint ({type(err).__name__}: {err})") \
            from err
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise ExportError(f"{path} is not an mlpot checkpoint: expected a dict with 'config' "
                          "and 'model' (as written by mlpot.export.save_checkpoint)")
    return ckpt


def _potential_of(ckpt: Dict, use_ema: bool):
    from .models import from_config

    model = from_config(ckpt["config"])
    state = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    model.load_state_dict(state)
    return model.eval()


def load_checkpoint(path: str, use_ema: bool = True):
    """The ``Potential`` of a checkpoint, with the EMA weights when present and ``use_ema``."""
    return _potential_of(_read_checkpoint(path), use_ema)


# ---------------------------------------------------------------------------- export
def _version() -> str:
    from . import __version__

    return __version__


def _with_dtype(potential, dtype: Optional[str]):
    """``potential`` itself when it already runs in ``dtype``, else a converted copy (rebuilt from
    its config, or deep-copied for a network outside the registry); the original is untouched."""
    current = "float64" if potential.model_dtype == torch.float64 else "float32"
    if dtype is None or dtype == current:
        return potential, current
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64', not '{dtype}'")
    config = potential.config
    config["dtype"] = dtype
    try:
        from .models import from_config

        model = from_config(config)
        model.load_state_dict(potential.state_dict())
        return model, dtype
    except (KeyError, ValueError, TypeError):  # not a registered model family
        pass
    model = copy.deepcopy(potential)
    model.net.to(_DTYPES[dtype])
    model.model_dtype = _DTYPES[dtype]
    model.config_json = json.dumps(config, sort_keys=True)
    return model, dtype


def _script(potential) -> torch.jit.ScriptModule:
    """The scripted Potential in eval mode (scripting leaves the Python model as it is)."""
    from .models import script

    scripted = script(potential)
    scripted.eval()
    return scripted


def _self_check(eager, scripted, dtype: torch.dtype) -> None:
    """The scripted model gives the eager model's energy and forces on a small molecule."""
    from ase.data import atomic_numbers as z_of

    n_types = len(eager.type_map)
    g = torch.Generator().manual_seed(0)
    n = max(3, min(8, 2 * n_types))
    pos = (torch.rand(n, 3, generator=g, dtype=torch.float64) * 2.5).to(dtype)
    types_ = torch.arange(n) % n_types
    data = {"positions": pos, "atom_types": types_, "cell": torch.zeros(1, 3, 3, dtype=dtype),
            "pbc": torch.zeros(1, 3, dtype=torch.bool),
            "atomic_numbers": torch.tensor([z_of[eager.type_map[t]] for t in types_.tolist()])}
    a, b = eager(dict(data)), scripted(dict(data))
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    for key in ("energy", "forces"):
        err = float((a[key].detach() - b[key].detach()).abs().max())
        scale = 1.0 + float(a[key].detach().abs().max())
        if not err <= tol * scale:
            raise RuntimeError(f"export self-check: the scripted model's {key} differs from the "
                               f"Python model's by {err:.3e}; please report this as a bug")


def export(model, path: str, dtype: Optional[str] = None,
           training_data_hash: Optional[str] = None, metadata: Optional[Dict] = None,
           use_ema: bool = True, check: bool = True) -> str:
    """Write one TorchScript file holding the model and its metadata.

    Args:
        model: a ``Potential`` or the path of a checkpoint (EMA weights preferred).
        path: the file to write (written atomically).
        dtype: 'float32' or 'float64' for the network; None keeps the model's.
        training_data_hash: stored as metadata (default: the checkpoint's, if any).
        metadata: more JSON-able entries stored under ``"user"``.
        check: compare the scripted model with the Python model on a small molecule.

    Returns:
        ``path``.
    """
    if isinstance(model, (str, os.PathLike)):
        ckpt = _read_checkpoint(os.fspath(model))
        model = _potential_of(ckpt, use_ema)
        if training_data_hash is None:
            training_data_hash = ckpt.get("data_hash", ckpt.get("training_data_hash"))
    model, dtype = _with_dtype(model, dtype)
    scripted = _script(model)
    if check:
        _self_check(model, scripted, _DTYPES[dtype])
    info = {
        "format_version": FORMAT_VERSION,
        "mlpot_version": _version(),
        "torch_version": torch.__version__.split("+")[0],
        "type_map": list(model.type_map),
        "cutoff": float(model.cutoff),
        "units": {"length": "A", "energy": "eV"},
        "dtype": dtype,
        "config": model.config,
        "training_data_hash": training_data_hash,
        "neighbor_list": type(model.neighbor_list).__name__,
        "user": metadata or {},
    }
    text = json.dumps(info, sort_keys=True, indent=1)
    atomic_write(path, lambda tmp: torch.jit.save(scripted, tmp,
                                                   _extra_files={METADATA_NAME: text}))
    return os.fspath(path)


# ---------------------------------------------------------------------------- load
def _is_torchscript(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or n.endswith("/code/__torch__.py")
                       for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_metadata(path: str) -> Dict:
    """The metadata of an exported model, without loading the model (so without the op)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such model file: {path}")
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/extra/" + METADATA_NAME)]
            text = z.read(names[0]).decode() if names else None
    except zipfile.BadZipFile as err:
        raise ExportError(f"{path} is not an mlpot model (not a TorchScript/zip file). Export "
                          "one with `mlpot export CHECKPOINT -o model.pt`") from err
    if text is None:
        if _is_torchscript(path):
            what = "a TorchScript file but not an mlpot model"
        else:
            what = "not an mlpot model (a torch.save file: if it is a training checkpoint"
            what += ", export it first)"
        raise ExportError(f"{path} is {what}: it has no {METADATA_NAME} metadata. Export a "
                          "model with `mlpot export CHECKPOINT -o model.pt`")
    try:
        info = json.loads(text)
        version = int(info["format_version"])
    except (ValueError, KeyError, TypeError) as err:
        raise ExportError(f"{path}: unreadable mlpot metadata ({err})") from err
    if version > FORMAT_VERSION:
        raise ExportError(
            f"{path} was exported by mlpot {info.get('mlpot_version', '?')} in file format "
            f"{version}; this mlpot ({_version()}) reads formats up to {FORMAT_VERSION}. "
            "Upgrade mlpot (pip install -U mlpot) or export the checkpoint again with this one")
    return info


class ExportedModel:
    """An exported model read back: ``module`` (the TorchScript Potential), its ``metadata``,
    ``type_map``, ``cutoff`` (Angstrom) and ``dtype``; calling it calls the module.

    Calls run with TorchScript's graph optimizations off (``jit_optimize=False``): the profiling
    executor's differentiable subgraphs make energy+forces up to about 2x slower on CPU for these
    models (measured on EGNN and DeepPot-SE), and openmm-torch runs without them too. The choice is
    made at the first call, so set ``jit_optimize`` before it.
    """

    def __init__(self, module: torch.jit.ScriptModule, metadata: Dict, path: str = "",
                 jit_optimize: bool = False):
        self.module = module
        self.jit_optimize = jit_optimize
        self.metadata = metadata
        self.path = path
        self.type_map = list(metadata["type_map"])
        self.cutoff = float(metadata["cutoff"])
        self.dtype = _DTYPES[metadata["dtype"]]
        self.device = torch.device("cpu")

    def __call__(self, data: Dict[str, torch.Tensor], compute_forces: bool = True,
                 compute_stress: bool = False) -> Dict[str, torch.Tensor]:
        with torch.jit.optimized_execution(self.jit_optimize):
            return self.module(data, compute_forces, compute_stress)

    def to(self, device) -> "ExportedModel":
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    def __repr__(self) -> str:
        cfg = self.metadata.get("config", {})
        return (f"ExportedModel({cfg.get('model', '?')}, type_map={self.type_map}, "
                f"cutoff={self.cutoff} A, {self.metadata['dtype']}, path='{self.path}')")


def load(path: str, device: Union[str, torch.device] = "cpu") -> ExportedModel:
    """Read an exported model (with a clear error for anything that is not one)."""
    path = os.fspath(path)
    info = read_metadata(path)
    load_library()
    try:
        module = torch.jit.load(path, map_location=device)
    except RuntimeError as err:
        msg = str(err)
        if "mlpot::" in msg or "mlpot.neighbor_list" in msg:
            fix = ("unset MLPOT_NO_EXTENSION" if os.environ.get("MLPOT_NO_EXTENSION", "")
                   not in ("", "0") else "build it (`python -m mlpot.neighbors` says why not)")
            raise ExportError(
                f"{path} calls mlpot's compiled neighbor-list op, which is not available in this "
                f"process: {fix}, or export the model again with MLPOT_NO_EXTENSION=1 set so "
                "that it uses the pure-PyTorch neighbor list") from err
        raise ExportError(f"{path}: torch.jit.load failed ({msg.splitlines()[0]})") from err
    module.eval()
    model = ExportedModel(module, info, path)
    model.device = torch.device(device)
    return model


def as_exported(model, device: Optional[Union[str, torch.device]] = None) -> ExportedModel:
    """An ``ExportedModel`` from a path, an ``ExportedModel`` or a ``Potential`` (scripted on the
    fly): what the ASE and OpenMM interfaces accept. With ``device``, the model is moved there
    (in place for an ``ExportedModel``); without, a loaded model stays where it is and a new one
    goes to the CPU."""
    if isinstance(model, ExportedModel):
        if device is not None and torch.device(device) != model.device:
            model.to(device)
        return model
    device = "cpu" if device is None else device
    if isinstance(model, (str, os.PathLike)):
        return load(model, device)
    if isinstance(model, torch.nn.Module) and hasattr(model, "config_json"):
        dtype = "float64" if model.model_dtype == torch.float64 else "float32"
        info = {"format_version": FORMAT_VERSION, "mlpot_version": _version(),
                "type_map": list(model.type_map), "cutoff": float(model.cutoff),
                "units": {"length": "A", "energy": "eV"}, "dtype": dtype,
                "config": model.config, "training_data_hash": None, "user": {}}
        return ExportedModel(_script(model), info).to(device)
    raise TypeError(f"expected a model file path, an ExportedModel or a Potential, "
                    f"got {type(model).__name__}")


# ---------------------------------------------------------------------------- CLI
def add_export_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a training checkpoint as one TorchScript model file",
        description="Write a checkpoint (EMA weights preferred) as one TorchScript file with "
                    "its metadata, for mlpot.load, the ASE calculator and OpenMM.")
    p.add_argument("checkpoint", help="checkpoint written by `mlpot train`")
    p.add_argument("-o", "--output", default="model.pt", help="output file (default model.pt)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="network precision in the file (default: the checkpoint's)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    p.add_argument("--data-hash", default=None,
                   help="training-data hash to store (default: the checkpoint's)")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    try:
        path = export(args.checkpoint, args.output, dtype=args.dtype,
                      training_data_hash=args.data_hash, use_ema=not args.no_ema)
    except (ExportError, FileNotFoundError) as err:
        print(f"mlpot export: {err}", file=sys.stderr)
        return 1
    info = read_metadata(path)
    print(f"wrote {path}: {info['config'].get('model', '?')} model, type map {info['type_map']}, "
          f"cutoff {info['cutoff']} A, {info['dtype']}, {os.path.getsize(path) / 1e6:.1f} MB")
    return 0


class _CallableModule(types.ModuleType):
    """Makes ``mlpot.export(...)`` call ``export`` while ``mlpot.export.x`` stays the module."""

    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
