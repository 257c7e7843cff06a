"""The model families: a registry that other packages can extend, and one builder.

``build_model(name, type_map=[...], cutoff=..., dtype=..., **hparams)`` returns a ``Potential``;
its ``config`` rebuilds it (``from_config``), so checkpoints and exported files never need the
user to repeat hyperparameters. ``available()`` lists the families: the built-in ``MODELS``
(dp_se_e2_a, egnn, nequip) and every family that an installed package registers in the
entry-point group ``mlpot.models``, for example in its pyproject.toml::

    [project.entry-points."mlpot.models"]
    my_model = "my_package.network:MyNetwork"

The entry point loads the network class; a built-in name cannot be taken over.

Any family may carry a short-range repulsion prior (``repulsion="zbl"``, ``model.repulsion: zbl``:
the ZBL wall of ``mlpot.nn.zbl``, switched off between ``repulsion_radii`` fractions of each
pair's covalent-radius sum); the config then records ``repulsion`` and the resolved
``repulsion_radii``, so ``from_config`` rebuilds it. Without it the config has neither key.

The contract of a family (what ``Potential``, the trainer, export and the tests rely on):

- The network is a ``torch.nn.Module`` class with a class attribute ``DEFAULT_CUTOFF`` (A, > 0),
  the cutoff when the config gives none.
- Its constructor is ``__init__(self, num_types, cutoff, **hparams)``: every hyperparameter is a
  keyword parameter with a default, declared there and nowhere else (``hparam_defaults`` reads
  the signature; a config stores all of them, so a later change of a default cannot change a
  saved model). Values must be JSON-friendly (numbers, bools, strings, None, lists).
- It may check values in a classmethod ``validate_hparams(cutoff, hparams)`` that raises
  ``ValueError`` with one line (key, value, what is allowed); ``build_model`` and the training
  config run it before any data are read. Deriving from ``mlpot.models.Network`` runs the same
  checks (and the check of unknown keys) when the class is constructed directly.
- ``forward(atom_types [N] int64, edge_index [2, P] int64, edge_vectors [P, 3]) -> [N]``: one
  energy (eV, before ``Potential``'s scale and reference energies) per atom, TorchScript-able.
  ``edge_index`` is the full neighbor list of ``Potential`` (row 0: centre i, row 1: neighbor j,
  both (i, j) and (j, i), every pair closer than the cutoff, periodic images included) and
  ``edge_vectors`` the pair vectors x_j - x_i + S @ cell (``mlpot.neighbors.pair_vectors``).
  Use only these vectors, never positions; let every pair term vanish smoothly (with its first
  derivatives) at the cutoff, so that forces stay continuous. Forces and stress are taken by
  ``Potential`` by autograd.
- Optional: ``fit_statistics(samples)`` (a ``@torch.jit.unused`` method; samples are
  (atom_types, edge_index, edge_vectors) of training structures) for data-dependent
  normalisation, following the one convention of ``mlpot.models.family`` for neighbor sums;
  ``centre_energies(...)`` for local (one-layer) models, evaluated in chunks (see
  ``Potential``); ``TEST_HPARAMS``, small hyperparameters under which
  tests/test_model_contract.py runs the physics checks of ``mlpot.testing`` on the family.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
from typing import Any, Dict, List, Optional

from torch import nn

from ..dtypes import NAMES as DTYPE_NAMES
from ..dtypes import dtype_of
from ..nn.zbl import ZBLRepulsion, check_repulsion
from .family import Network, check_cutoff, hparam_defaults, resolve_hparams
from .potential import Potential, script
from .statistics import atomic_reference_energies, fit_reference_energies, force_rms

ENTRY_POINT_GROUP = "mlpot.models"

# built-in families: name -> (module, class, paper)
MODELS = {
    "dp_se_e2_a": ("mlpot.models.deeppot", "DeepPotSeA",
                   "Zhang et al., NeurIPS 2018 (DeepPot-SE); Zhang et al., PRL 2018"),
    "egnn": ("mlpot.models.egnn", "EGNN", "Satorras, Hoogeboom, Welling, ICML 2021"),
    "nequip": ("mlpot.models.nequip", "NequIP",
               "Batzner et al., Nat. Commun. 2022; MACE option: Batatia et al., NeurIPS 2022"),
}


def _entry_points() -> Dict[str, Any]:
    """Families registered by installed packages (not loaded yet); built-in names win."""
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep for ep in found if ep.name not in MODELS}


def available() -> List[str]:
    """Names of every model family: built-in and registered through entry points."""
    return sorted(set(MODELS) | set(_entry_points()))


def _check_contract(name: str, cls, where: str):
    """``cls`` if it is a network class that follows the contract (module doc), else ValueError."""
    def broken(why: str) -> ValueError:
        return ValueError(f"model family '{name}' ({where}) does not follow mlpot's model "
                          f"contract: {why}; see the docstring of mlpot.models")

    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise broken(f"{cls!r} is not a torch.nn.Module class")
    try:
        check_cutoff(getattr(cls, "DEFAULT_CUTOFF", None))
    except ValueError:
        raise broken("it has no DEFAULT_CUTOFF > 0") from None
    first = list(inspect.signature(cls.__init__).parameters)[1:3]
    if first != ["num_types", "cutoff"]:
        raise broken(f"its constructor starts with {first}, not (num_types, cutoff)")
    try:
        hparam_defaults(cls)
    except TypeError as err:
        raise broken(str(err)) from None
    return cls


def network_class(name: str):
    """The network class of a model family (built-in or from an entry point)."""
    if name in MODELS:
        module, cls, _ = MODELS[name]
        return getattr(importlib.import_module(module), cls)
    eps = _entry_points()
    if name not in eps:
        names = sorted(set(MODELS) | set(eps))
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown model '{name}'; available: {names}.{hint}")
    ep = eps[name]
    where = f"entry point '{ep.value}' of group {ENTRY_POINT_GROUP}"
    try:
        cls = ep.load()
    except Exception as err:  # noqa: BLE001 - any import failure of a plugin: say which
        raise ValueError(f"model family '{name}' ({where}) could not be loaded: "
                         f"{type(err).__name__}: {err}") from err
    return _check_contract(name, cls, where)


def check_hparams(name: str, hparams: Dict, cutoff: Optional[float] = None) -> Dict:
    """The family's defaults updated by ``hparams``, checked: an unknown key is an error naming
    the closest valid one, a bad value (or cutoff) a one-line ValueError."""
    return resolve_hparams(network_class(name), hparams, cutoff, family=name)


def validate_model_config(name: str, hparams: Dict, cutoff: Optional[float] = None,
                          dtype: str = "float32") -> Dict:
    """Every check of ``build_model`` that needs no data (family, dtype, cutoff, hyperparameter
    keys and values); the complete hyperparameters. ValueError with one line otherwise."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype = {dtype!r}: must be one of {list(DTYPE_NAMES)}")
    return check_hparams(name, hparams, cutoff)


def build_model(name: str, type_map: List[str], cutoff: Optional[float] = None,
                dtype: str = "float32", repulsion: Optional[str] = None,
                repulsion_radii: Optional[List[float]] = None, **hparams) -> Potential:
    """A new (untrained) Potential of the named family, with the short-range prior
    ``repulsion`` ("zbl" or None; ``repulsion_radii``: [f_inner, f_outer], see mlpot.nn.zbl)."""
    hp = validate_model_config(name, hparams, cutoff, dtype)
    radii = check_repulsion(repulsion, repulsion_radii)
    cls = network_class(name)
    cutoff = check_cutoff(cutoff if cutoff is not None else cls.DEFAULT_CUTOFF)
    prior = ZBLRepulsion(list(type_map), cutoff, radii) if radii is not None else None
    net = cls(num_types=len(type_map), cutoff=cutoff, **hp)
    config = {"model": name, "type_map": list(type_map), "cutoff": cutoff, "dtype": dtype,
              "hparams": hp}
    if prior is not None:
        config.update(repulsion=repulsion, repulsion_radii=list(radii))
    return Potential(net, type_map, cutoff, config, dtype=dtype_of(dtype), repulsion=prior)


def from_config(config: Dict) -> Potential:
    """Rebuild a Potential, a committee of them or a Potential with a variance network
    (``mlpot.models.mve``), with untrained weights, from its ``config``."""
    if config.get("model") == "committee":
        from .committee import committee_from_config

        return committee_from_config(config)
    if config.get("model") == "mve":
        from .mve import mve_from_config

        return mve_from_config(config)
    return build_model(config["model"], config["type_map"], config["cutoff"], config["dtype"],
                       repulsion=config.get("repulsion"),
                       repulsion_radii=config.get("repulsion_radii"), **config["hparams"])


def with_repulsion(model: Potential, repulsion: str = "zbl",
                   repulsion_radii: Optional[List[float]] = None) -> Potential:
    """The trained ``model`` with the short-range prior ``repulsion`` added, every weight and
    statistic the same. It is the model that training with the prior would have given when the
    prior is zero on every training frame (``Potential.prior_energies``: the trainer then fits
    the same reference energies and every loss term is unchanged); check that first."""
    if not isinstance(model, Potential) or model.config.get("model") in ("committee", "mve"):
        raise ValueError("with_repulsion takes a single Potential (not a committee or a model "
                         "with a variance network)")
    if model.repulsion is not None:
        raise ValueError(f"the model has a {model.config.get('repulsion')} prior already")
    config = {k: v for k, v in model.config.items() if k not in ("repulsion", "repulsion_radii")}
    config.update(repulsion=repulsion, repulsion_radii=repulsion_radii)
    new = from_config(config)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("repulsion.") for k in missing):
        raise ValueError(f"the weights do not fit the rebuilt model (missing {missing}, "
                         f"unexpected {unexpected})")
    return new.to(next(model.buffers()).device).train(model.training)


__all__ = ["MODELS", "with_repulsion", "ENTRY_POINT_GROUP", "Network", "Potential", "available", "build_model",
           "from_config", "script", "fit_reference_energies", "atomic_reference_energies",
           "force_rms", "check_hparams",
           "hparam_defaults", "network_class", "validate_model_config"]
