"""Training checkpoints: one format, one writer, one reader, one data hash, one metadata builder.

A checkpoint is a ``torch.save``'d dict (format ``"mlpot-checkpoint"``, ``"version"``) with:

* ``"config"``: ``Potential.config``, which rebuilds the architecture (``models.from_config``);
* ``"model"``: the raw weights; ``"ema"``: the exponential moving average of the weights or None
  (``model_from_checkpoint`` prefers it unless ``use_ema=False``);
* ``"data_hash"``: ``hash_data`` of the training files, or None;
* whatever the trainer keeps to resume exactly (optimizer, EMA state, epoch, step, RNG states,
  history, and ``best_step``: the step whose weights ``best.pt`` holds).

**Checkpoints are data, never code.** Every read goes through ``read_checkpoint``, which decides
the file kind from the zip members before anything is unpickled (a TorchScript archive has
``code/`` and ``constants.pkl``; a ``torch.save`` file has ``data.pkl``) and then unpickles with
``torch.load(weights_only=True)``: only tensors, numbers, strings, lists, tuples and dicts. The
writer stores nothing else (RNG states as tensors and lists). Checkpoints of version 1 (mlpot
before 2026-12-03) hold numpy's RNG state as a numpy array; for them exactly three numpy globals
are allowed (``numpy.ndarray``, ``numpy.dtype`` and numpy's array reconstructor), which rebuild
an array from bytes and run no other code.

Files are written atomically (``mlpot.files.atomic_save``): a kill leaves the previous file.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from typing import Any, Dict, Iterable, Optional, Union

import torch

from .dtypes import dtype_name
from .errors import UserError
from .files import atomic_save

__all__ = ["CheckpointError", "FORMAT", "VERSION", "file_kind", "read_checkpoint",
           "write_checkpoint", "checkpoint_dict", "save_checkpoint", "model_from_checkpoint",
           "weights_of", "hash_data", "model_metadata", "interaction_layers",
           "receptive_field"]

FORMAT = "mlpot-checkpoint"
VERSION = 2  # 1: mlpot before 2026-12-03 (numpy RNG state as an array, no "version" entry)


class CheckpointError(UserError, ValueError):
    """A file that is not an mlpot training checkpoint, or one that cannot be read safely."""


# ---------------------------------------------------------------------------- file kind
def file_kind(path: str) -> str:
    """What a file is, from its zip members alone (nothing is unpickled): ``"aoti"`` (a PT2
    archive holding an AOTInductor model), ``"torchscript"``, ``"checkpoint"`` (a
    ``torch.save`` archive), ``"missing"`` or ``"unknown"``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return "missing"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "unknown"
    if any("/data/aotinductor/" in n for n in names):
        return "aoti"
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("/data.pkl") for n in names):
        return "checkpoint"
    return "unknown"


def _legacy_numpy_globals():
    """The numpy globals a version-1 checkpoint needs (numpy's RNG state array), nothing more."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


# ---------------------------------------------------------------------------- read
def read_checkpoint(path: str) -> Dict[str, Any]:
    """The dict of an mlpot training checkpoint, read without running code from the file.

    Raises ``CheckpointError`` (one line, what to do) for anything else: a missing file, an
    exported TorchScript model, a truncated or foreign file, a pickle that asks for code.
    """
    path = os.fspath(path)
    kind = file_kind(path)
    if kind == "missing":
        raise CheckpointError(f"{path}: no such checkpoint")
    if kind in ("torchscript", "aoti"):
        what = "TorchScript" if kind == "torchscript" else "compiled .pt2"
        raise CheckpointError(f"{path} is an exported ({what}) model, not a training "
                              "checkpoint; use it as a model (mlpot.load, mlpot test, mlpot md), "
                              "or export from the best.pt that `mlpot train` wrote")
    if kind != "checkpoint":
        raise CheckpointError(f"{path} is not a readable mlpot checkpoint (not a torch.save "
                              "file, or a truncated one); give the best.pt or last.pt that "
                              "`mlpot train` wrote")
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} was refused: it asks to run code or build objects when loaded ({first}); "
            "mlpot reads checkpoints as data only. Use checkpoints written by mlpot from a "
            "source you trust") from None
    except Exception as err:  # noqa: BLE001 - truncated zip, bad tensor storage, ...
        raise CheckpointError(f"{path} is not a readable mlpot checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); it may be "
                              "truncated: use another copy or last.pt/best.pt") from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        what = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not an mlpot checkpoint: expected a dict with 'config' "
                              f"and 'model' entries, found {what}")
    version = int(state.get("version", 1))
    if version > VERSION:
        raise CheckpointError(f"{path} is a checkpoint of format version {version} (mlpot "
                              f"{state.get('mlpot_version', '?')}); this mlpot reads versions up "
                              f"to {VERSION}: upgrade mlpot (pip install -U mlpot)")
    return state


# ---------------------------------------------------------------------------- write
def _version() -> str:
    from . import __version__

    return __version__


def checkpoint_dict(model, ema: Optional[Dict] = None, data_hash: Optional[str] = None,
                    **extra) -> Dict[str, Any]:
    """The checkpoint of a ``Potential``: config, weights, EMA weights, data hash, and ``extra``
    entries (the trainer's resume state). Every entry must be plain data (tensors, numbers,
    strings, lists, tuples, dicts) so that it reads back with ``weights_only=True``."""
    state = {"format": FORMAT, "version": VERSION, "mlpot_version": _version(),
             "config": model.config, "model": model.state_dict(), "ema": ema,
             "data_hash": data_hash}
    state.update(extra)
    return state


def write_checkpoint(state: Dict[str, Any], path: str) -> str:
    """Write a checkpoint dict atomically (temporary file, fsync, rename)."""
    atomic_save(state, path)
    return os.fspath(path)


def save_checkpoint(model, path: str, ema: Optional[Dict] = None,
                    data_hash: Optional[str] = None, **extra) -> str:
    """``write_checkpoint(checkpoint_dict(model, ema, data_hash, **extra), path)``."""
    return write_checkpoint(checkpoint_dict(model, ema, data_hash, **extra), path)


# ---------------------------------------------------------------------------- model
def weights_of(state: Dict[str, Any], use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The weights a checkpoint stands for: the EMA's when present and ``use_ema``, else the
    raw ones. The one place where that choice is made."""
    ema = state.get("ema")
    return ema if use_ema and ema else state["model"]


def model_from_checkpoint(checkpoint: Union[str, Dict[str, Any]], use_ema: bool = True,
                          device: Union[str, torch.device] = "cpu"):
    """The ``Potential`` of a checkpoint (path or dict), in eval mode on ``device``."""
    from .models import from_config

    state = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) \
        else checkpoint
    try:
        model = from_config(state["config"])
        model.load_state_dict(weights_of(state, use_ema))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        where = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else "checkpoint"
        raise CheckpointError(f"{where}: its model cannot be rebuilt by this mlpot "
                              f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    return model.to(device).eval()


# ---------------------------------------------------------------------------- data hash
def hash_data(paths: Iterable[str]) -> str:
    """``"sha256:<hex>"`` over the training data: each file's name and bytes, files in sorted
    order, a folder standing for every file below it (DeePMD systems)."""
    files = []
    for p in (os.fspath(p) for p in paths):
        if os.path.isdir(p):
            files += [os.path.join(root, f) for root, _, fs in os.walk(p) for f in fs]
        else:
            files.append(p)
    digest = hashlib.sha256()
    for f in sorted(files):
        digest.update(os.path.basename(f).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


# ---------------------------------------------------------------------------- metadata
def uncertainty_kind(model) -> Optional[str]:
    """``"committee"``, ``"mve"`` (a variance network, ``mlpot.models.mve``) or None: what gives
    the model's ``max_force_dev`` and the other deviations."""
    kind = model.config.get("model")
    return kind if kind in ("committee", "mve") else None


def repulsion_of(config: Dict[str, Any]) -> Any:
    """The short-range prior of a model config ("zbl" or None; mlpot.nn.zbl): a committee's
    when its members share it (else the list of theirs), a variance-network model's mean's."""
    if config.get("model") == "committee":
        kinds = [repulsion_of(c) for c in config.get("members", [])]
        return kinds[0] if kinds and all(k == kinds[0] for k in kinds) else kinds
    if config.get("model") == "mve":
        return repulsion_of(config.get("potential", {}))
    return config.get("repulsion")


def interaction_layers(config: Dict[str, Any]) -> int:
    """How many interaction (message-passing) layers a model config has: 1 for a local model
    (the Deep Potential), the family's ``num_layers`` hyperparameter for message-passing ones (a
    family may instead define a classmethod ``interaction_layers(hparams)``); for a committee the
    most of its members, for a variance-network model the most of its two networks."""
    kind = config.get("model")
    if kind == "committee":
        return max(interaction_layers(c) for c in config.get("members", [{}]))
    if kind == "mve":
        sigma = dict(config.get("sigma_net") or {})
        return max(interaction_layers(config.get("potential", {})),
                   interaction_layers({"model": sigma.get("name"),
                                       "hparams": sigma.get("hparams") or {}}))
    hparams = dict(config.get("hparams") or {})
    try:
        from .models import network_class

        cls = network_class(kind)
        if hasattr(cls, "interaction_layers"):
            return max(1, int(cls.interaction_layers(hparams)))
    except (KeyError, ValueError, TypeError):  # not a registered family: its hparams decide
        pass
    return max(1, int(hparams.get("num_layers", 1)))


def receptive_field(model) -> float:
    """How far (Angstrom) the energy of an atom sees: interaction layers x cutoff. A domain
    decomposition (LAMMPS) needs ghost atoms this far around its local atoms."""
    return interaction_layers(model.config) * float(model.cutoff)


def model_metadata(model, format_version: int, data_hash: Optional[str] = None,
                   user: Optional[Dict] = None) -> Dict[str, Any]:
    """The metadata every exported file of ``model`` carries (TorchScript today; the same dict
    for the formats to come): versions, type map, cutoff, units, dtype, config, data hash and
    the neighbor-list implementation; for a committee its size; for a model with an uncertainty
    (committee or variance network) its kind and calibration factor."""
    return {
        "format_version": format_version,
        "mlpot_version": _version(),
        "torch_version": torch.__version__.split("+")[0],
        "type_map": list(model.type_map),
        "cutoff": float(model.cutoff),
        "interaction_layers": interaction_layers(model.config),
        "receptive_field": receptive_field(model),
        "units": {"length": "A", "energy": "eV"},
        "dtype": dtype_name(model.model_dtype),
        "config": model.config,
        "training_data_hash": data_hash,
        "repulsion": repulsion_of(model.config),
        "neighbor_list": type(model.neighbor_list).__name__,
        "committee": int(getattr(model, "num_members", 0)) or None,
        "uncertainty": uncertainty_kind(model),
        "calibration": float(model.calibration) if uncertainty_kind(model) else None,
        "user": dict(user or {}),
    }
