"""Exported models: one TorchScript file per model, with its metadata.

* ``export(model_or_checkpoint, path)`` scripts a ``Potential`` (or the model of a training
  checkpoint, see ``mlpot.checkpoint``) and writes one TorchScript file holding it and, as the
  extra file ``mlpot.json``, its metadata (``mlpot.checkpoint.model_metadata``): format version,
  versions, type map, cutoff (Angstrom), units (Angstrom, eV), dtype, config and the
  training-data hash. Written atomically (temporary file + ``os.replace``).
* ``load(path)`` reads one back as an ``ExportedModel``. The file kind is decided from its zip
  members before anything is loaded. A TorchScript archive is read by TorchScript's own loader,
  which rebuilds only TorchScript types and runs the model's TorchScript code in its interpreter,
  never arbitrary Python. It loads with ``torch.jit.load`` in a
  process that has torch and, when the model calls it, mlpot's neighbor-list op library
  (``torch.ops.load_library(mlpot.neighbors.library_path())``), and nothing else of mlpot.

The module itself is callable, so ``mlpot.export(model, "model.pt")`` works.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import types
import zipfile
from typing import Dict, Optional, Union

import numpy as np
import torch

from . import jit
from . import keys as K
from .checkpoint import file_kind, model_metadata, model_from_checkpoint, read_checkpoint
from .dtypes import DTYPES, dtype_name, dtype_of, usable_device
from .errors import UserError
from .files import atomic_write_archive
from .inputs import structure_inputs

__all__ = ["export", "load", "read_metadata", "ExportedModel", "ExportError", "FORMAT_VERSION",
           "METADATA_NAME", "register_neighbor_op"]

FORMAT_VERSION = 1  # bump when a file written now could be misread by an older mlpot
METADATA_NAME = "mlpot.json"


class ExportError(UserError, ValueError):
    """A file that is not an mlpot model, or one this mlpot cannot read."""


def register_neighbor_op() -> Optional[str]:
    """Register mlpot's neighbor-list op in this process when it is built (exported files call
    it by name); its library path, or None when the pure-PyTorch fallback is in use."""
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


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------- export
def _with_dtype(potential, dtype: Optional[str]):
    """``potential`` itself when it already runs in ``dtype``, else a converted copy (rebuilt from
    its config, or deep-copied for a network outside the registry); the original is untouched."""
    current = dtype_name(potential.model_dtype)
    if dtype is None or dtype == current:
        return potential, current
    dtype = dtype_name(dtype)
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
    model.net.to(dtype_of(dtype))
    model.model_dtype = dtype_of(dtype)
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
    data = structure_inputs(pos, types_)  # a molecule: no cell
    data[K.ATOMIC_NUMBERS] = torch.tensor([z_of[eager.type_map[t]] for t in types_.tolist()])
    a, b = eager(dict(data)), scripted(dict(data))
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    for key in (K.ENERGY, K.FORCES):
        err = float((a[key].detach() - b[key].detach()).abs().max())
        scale = 1.0 + float(a[key].detach().abs().max())
        if not err <= tol * scale:
            raise RuntimeError(f"export self-check: the scripted model's {key} differs from the "
                               f"Python model's by {err:.3e}; please report this as a bug")


FORMATS = ("torchscript", "aoti")


def committee_of(members, use_ema: bool = True):
    """One ``Committee`` of separately trained single models (checkpoint paths or Potentials),
    as DP-GEN users train their four models: the same outputs and deviations as a committee
    trained with ``training.ensemble``, with the calibration factor 1 (no common validation
    split to fit it on: the ``*_calibrated`` outputs equal the raw ones). Returns the committee
    and the members' training-data hash where they all share one (else None)."""
    from .models import Potential
    from .models.committee import Committee

    if len(members) < 2:
        raise ExportError(f"a committee needs at least 2 models, got {len(members)}; give one "
                          "checkpoint to export a single model")
    models, hashes = [], set()
    for k, m in enumerate(members):
        name = os.fspath(m) if isinstance(m, (str, os.PathLike)) else f"model {k}"
        if isinstance(m, (str, os.PathLike)):
            ckpt = read_checkpoint(name)
            hashes.add(ckpt.get("data_hash", ckpt.get("training_data_hash")))
            m = model_from_checkpoint(ckpt, use_ema)
        else:
            hashes.add(None)
        if not isinstance(m, Potential) or m.config.get("model") in ("committee", "mve"):
            raise ExportError(f"{name}: a committee is built from single models; this one is "
                              f"a {m.config.get('model', type(m).__name__)}: export it alone")
        first = models[0] if models else m
        if (list(m.type_map), float(m.cutoff), m.model_dtype) != \
                (list(first.type_map), float(first.cutoff), first.model_dtype):
            raise ExportError(
                f"{name}: type map {list(m.type_map)}, cutoff {float(m.cutoff)} A, "
                f"{dtype_name(m.model_dtype)} differ from the first model's "
                f"({list(first.type_map)}, {float(first.cutoff)} A, "
                f"{dtype_name(first.model_dtype)}); committee members must share all three")
        models.append(m)
    return Committee(models).eval(), (hashes.pop() if len(hashes) == 1 else None)


def format_of(path: str, format: Optional[str] = None) -> str:  # noqa: A002 - the CLI's name
    """The export format: ``format`` when given, else from the suffix (.pt2: 'aoti', else
    'torchscript')."""
    if format is None:
        return "aoti" if os.fspath(path).lower().endswith(".pt2") else "torchscript"
    if format not in FORMATS:
        raise ExportError(f"unknown export format '{format}'; choose one of {', '.join(FORMATS)}")
    return format


def export(model, path: str, dtype: Optional[str] = None,
           training_data_hash: Optional[str] = None, metadata: Optional[Dict] = None,
           use_ema: bool = True, check: bool = True,
           format: Optional[str] = None) -> str:  # noqa: A002 - the CLI's name
    """Write one file holding the model and its metadata: a TorchScript file, or with a name
    ending in .pt2 (or ``format="aoti"``) an AOTInductor package of compiled native code
    (``mlpot.aoti``; minutes of compilation).

    Args:
        model: a ``Potential`` or the path of a checkpoint (EMA weights preferred); or a list
            of two or more of them, written as one committee (``committee_of``).
        path: the file to write (written atomically).
        dtype: 'float32' or 'float64' for the network; None keeps the model's.
        training_data_hash: stored as metadata (default: the checkpoint's, if any).
        metadata: more JSON-able entries stored under ``"user"``.
        check: compare the exported model with the Python model on a small molecule.
        format: 'torchscript' or 'aoti'; None: from the suffix of ``path``.

    Returns:
        ``path``.
    """
    fmt = format_of(path, format)
    if isinstance(model, (list, tuple)):  # separately trained models: one committee
        model, hash_ = committee_of(model, use_ema)
        training_data_hash = training_data_hash if training_data_hash is not None else hash_
    elif isinstance(model, (str, os.PathLike)):
        ckpt = read_checkpoint(os.fspath(model))
        model = model_from_checkpoint(ckpt, use_ema)
        if training_data_hash is None:
            training_data_hash = ckpt.get("data_hash", ckpt.get("training_data_hash"))
    model, dtype = _with_dtype(model, dtype)
    if fmt == "aoti":
        from .aoti import export_aoti

        info = model_metadata(model, FORMAT_VERSION, training_data_hash, metadata)
        return export_aoti(model, path, info, check)
    scripted = _script(model)
    if check:
        _self_check(model, scripted, dtype_of(dtype))
    info = model_metadata(model, FORMAT_VERSION, training_data_hash, metadata)
    text = json.dumps(info, sort_keys=True, indent=1)
    with jit.quiet():
        atomic_write_archive(path, lambda buffer: torch.jit.save(
            scripted, buffer, _extra_files={METADATA_NAME: text}))
    return os.fspath(path)


# ---------------------------------------------------------------------------- load
def read_metadata(path: str) -> Dict:
    """The metadata of an exported model, without loading the model (so without the op)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such model file: {path}")
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/extra/" + METADATA_NAME)]
            text = z.read(names[0]).decode() if names else None
    except Exception as err:  # noqa: BLE001 - not a zip, or a truncated/damaged one
        raise ExportError(f"{path} is not an mlpot model (not a TorchScript file or .pt2 "
                          "package, or a truncated one). Export one with `mlpot export "
                          "CHECKPOINT -o model.pt`") from err
    if text is None:
        from .aoti import is_aoti_archive

        if is_aoti_archive(path):
            what = "an AOTInductor package but not an mlpot model"
        elif file_kind(path) == "torchscript":
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

    format = "torchscript"  # mlpot.aoti.CompiledModel: "aoti"

    def __init__(self, module: torch.jit.ScriptModule, metadata: Dict, path: str = "",
                 jit_optimize: bool = False):
        self.module = module
        self.jit_optimize = jit_optimize
        self.metadata = metadata
        self.path = path
        self.type_map = list(metadata["type_map"])
        self.committee = int(metadata.get("committee") or 0)  # members; 0: a single model
        # what gives max_force_dev & co.: "committee", "mve" or None (files before: committee)
        self.uncertainty = metadata.get("uncertainty") or ("committee" if self.committee else None)
        self._type_lookup = None
        self.cutoff = float(metadata["cutoff"])
        self.dtype = dtype_of(metadata["dtype"])
        self.device = torch.device("cpu")

    def atom_types(self, atomic_numbers, where: str = "") -> torch.Tensor:
        """[N] int64 type indices of atoms given by atomic number (on the CPU); a DataError
        naming ``where`` and the model's elements for an element the model does not know."""
        if self._type_lookup is None:
            from .data import TypeMap

            self._type_lookup = TypeMap(self.type_map)
        return self._type_lookup.types(np.asarray(atomic_numbers, dtype=np.int64), where=where)

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
    """Read an exported model (with a clear error for anything that is not one).

    A TorchScript file (``model.pt``) is read as data: TorchScript's loader rebuilds the model's
    TorchScript code and runs it in its interpreter, never arbitrary Python. A ``.pt2`` package
    holds compiled native code, and loading it runs that code: load only ``.pt2`` files you made
    or trust (checkpoints and TorchScript files need no such trust). Both give an
    ``ExportedModel`` with the same call (a ``.pt2`` runs on the CPU, in its one dtype).
    """
    path = os.fspath(path)
    info = read_metadata(path)
    if info.get("format") == "aoti":
        from .aoti import load_aoti

        return load_aoti(path, info, device)
    device = usable_device(device, path)
    register_neighbor_op()
    try:
        with jit.quiet():
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
        raise ExportError(f"{path}: not a loadable model file, it may be truncated "
                          f"(torch.jit.load: {msg.splitlines()[0]})") from err
    except Exception as err:  # noqa: BLE001 - a damaged archive fails in many ways
        raise ExportError(f"{path}: not a loadable model file, it may be truncated "
                          f"({type(err).__name__}: {str(err).splitlines()[0]})") from err
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
        info = model_metadata(model, FORMAT_VERSION)
        return ExportedModel(_script(model), info).to(device)
    raise TypeError(f"expected a model file path, an ExportedModel or a Potential, "
                    f"got {type(model).__name__}")


# ---------------------------------------------------------------------------- CLI
def add_export_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a training checkpoint as one model file (TorchScript or .pt2)",
        description="Write a checkpoint (EMA weights preferred) as one TorchScript file with "
                    "its metadata, for mlpot.load, the ASE calculator and OpenMM; several "
                    "checkpoints of models trained apart as one committee file.")
    p.add_argument("checkpoint", nargs="+",
                   help="checkpoint written by `mlpot train`; two or more (models trained "
                        "apart, e.g. with different seeds, sharing type map, cutoff and dtype) "
                        "are written as one committee with its deviations (calibration "
                        "factor 1)")
    p.add_argument("-o", "--output", default="model.pt",
                   help="output file (default model.pt); a name ending in .pt2 writes an "
                        "AOTInductor package (compiled native code, CPU; minutes to compile)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="torchscript or aoti (default: from the suffix of --output)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="network precision in the file (default: the checkpoint's)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    p.add_argument("--data-hash", default=None,
                   help="training-data hash to store (default: the checkpoint's)")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    """``mlpot export``; errors in the input reach ``mlpot.cli.main`` (one line, exit code 2)."""
    source = args.checkpoint[0] if len(args.checkpoint) == 1 else list(args.checkpoint)
    path = export(source, args.output, dtype=args.dtype,
                  training_data_hash=args.data_hash, use_ema=not args.no_ema,
                  format=getattr(args, "format", None))
    info = read_metadata(path)
    kind = "AOTInductor package" if info.get("format") == "aoti" else "TorchScript file"
    print(f"wrote {path} ({kind}): {info['config'].get('model', '?')} model, type map "
          f"{info['type_map']}, "
          f"cutoff {info['cutoff']} A, {info['dtype']}, {os.path.getsize(path) / 1e6:.1f} MB")
    return 0


class _CallableModule(types.ModuleType):
    """Makes ``mlpot.export(...)`` call ``export`` while ``mlpot.export.x`` stays the module."""

    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
