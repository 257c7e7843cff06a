"""The model families, behind one builder.

``build_model("dp_se_e2_a" | "egnn" | "nequip", type_map=[...], cutoff=..., dtype=..., **hparams)``
returns a ``Potential``; its ``config`` rebuilds it (``from_config``), so checkpoints and exported
files never need the user to repeat hyperparameters.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Dict, List, Optional

import torch

from .potential import Potential, script
from .statistics import fit_reference_energies, force_rms

# name -> (module, class, paper)
MODELS = {
    "dp_se_e2_a": ("mlpot.models.deeppot", "DeepPotSeA",
                   "Zhang et al., NeurIPS 2018 (DeepPot-SE); Zhang et al., PRL 2018"),
    "egnn": ("mlpot.models.egnn", "EGNN", "Satorras, Hoogeboom, Welling, ICML 2021"),
    "nequip": ("mlpot.models.nequip", "NequIP",
               "Batzner et al., Nat. Commun. 2022; MACE option: Batatia et al., NeurIPS 2022"),
}

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def network_class(name: str):
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown model '{name}'; available: {sorted(MODELS)}.{hint}")
    module, cls, _ = MODELS[name]
    return getattr(importlib.import_module(module), cls)


def check_hparams(name: str, hparams: Dict) -> Dict:
    """The network's defaults updated by ``hparams``; an unknown key is an error naming the
    closest valid one."""
    defaults = dict(network_class(name).DEFAULTS)
    for key in hparams:
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"model '{name}' has no hyperparameter '{key}'.{hint} "
                             f"Valid: {sorted(defaults)}")
    defaults.update(hparams)
    return defaults


def build_model(name: str, type_map: List[str], cutoff: Optional[float] = None,
                dtype: str = "float32", **hparams) -> Potential:
    """A new (untrained) Potential of the named family."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64', not '{dtype}'")
    cls = network_class(name)
    hp = check_hparams(name, hparams)
    cutoff = float(cutoff if cutoff is not None else cls.DEFAULT_CUTOFF)
    if cutoff <= 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    net = cls(num_types=len(type_map), cutoff=cutoff, **hp)
    config = {"model": name, "type_map": list(type_map), "cutoff": cutoff, "dtype": dtype,
              "hparams": hp}
    return Potential(net, type_map, cutoff, config, dtype=_DTYPES[dtype])


def from_config(config: Dict) -> Potential:
    """Rebuild a Potential (untrained weights) from its ``config``."""
    return build_model(config["model"], config["type_map"], config["cutoff"], config["dtype"],
                       **config["hparams"])


__all__ = ["MODELS", "Potential", "build_model", "from_config", "script",
           "fit_reference_energies", "force_rms", "check_hparams", "network_class"]
