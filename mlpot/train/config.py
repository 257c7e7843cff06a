"""The training configuration: dataclasses loaded from YAML and checked on load.

An unknown key is an error that names the closest valid key, so a typo never silently falls back
to a default. Every field has a default except the training data. Each value is converted to its
declared type when the file is read (``lr: 1e-3``, a string to YAML 1.1, is the number 0.001) and
checked against its declared range (``_spec``), the model's hyperparameters with it: a bad value
is a ``ConfigError`` (exit code 2) whose one line names the key, the value and what is allowed,
before any data are read.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import yaml

from ..errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration error (exit code 2); the message names the key and says what to do."""


def _spec(default: Any, *, gt: Optional[float] = None, ge: Optional[float] = None,
          lt: Optional[float] = None, choices: Optional[List[str]] = None) -> Any:
    """A field with its allowed range (gt/ge/lt: bounds of a number; choices: allowed values)."""
    return field(default=default, metadata={"gt": gt, "ge": ge, "lt": lt, "choices": choices})


@dataclass
class DataConfig:
    train: Union[str, List[str]] = ""           # file(s) or DeePMD folder(s)
    validation: Optional[Union[str, List[str]]] = None  # separate validation data, or ...
    validation_fraction: float = _spec(0.1, ge=0.0, lt=1.0)  # ... this fraction of train, by seed
    test: Optional[Union[str, List[str]]] = None
    # ... or this fraction of train, held out from training and checkpoint selection alike
    test_fraction: float = _spec(0.0, ge=0.0, lt=1.0)
    # stratify the validation_fraction/test_fraction split by this info key (e.g. config_type;
    # ASE formats) or, for DeePMD data, by system folder ("system"); None: one random split
    split_key: Optional[str] = None
    # frames with the same value of this info key (ASE formats) are one structure and land in
    # the same part of the split (e.g. a structure with two sets of labels); None: copies are
    # found by data.train.equivalence_key when a new split is made
    copy_key: Optional[str] = None
    format: Optional[str] = None                # None: deepmd for folders, else ase.io guesses
    type_map: Optional[List[str]] = None        # default: the elements of the training data
    energy_key: Optional[str] = None
    forces_key: Optional[str] = None
    stress_key: Optional[str] = None
    virial_key: Optional[str] = None
    # per-frame loss weights (info keys, numbers >= 0; distillation writes them)
    energy_weight_key: Optional[str] = None
    forces_weight_key: Optional[str] = None
    # per-atom energies of a teacher (an array key of ASE formats; distillation writes
    # DISTILL_atomic_energies), the labels of loss.atomic_energies
    atomic_energies_key: Optional[str] = None
    # Hessian rows of a teacher (a per-atom array of 9N numbers; mlpot distill writes
    # DISTILL_hessian; mlpot.hessian), the labels of loss.hessian
    hessian_key: Optional[str] = None
    energy_unit: str = "eV"                     # a key of readers.ENERGY_UNITS_TO_EV
    length_unit: str = "A"                      # a key of readers.LENGTH_UNITS_TO_ANGSTROM
    min_distance: Optional[float] = _spec(0.5, ge=0.0)  # Angstrom; closer atoms: an input error
    max_frames: Optional[int] = _spec(None, ge=1)  # use only the first frames of train


@dataclass
class ModelConfig:
    name: str = "dp_se_e2_a"                    # dp_se_e2_a | egnn | nequip | a plugin's
    cutoff: Optional[float] = _spec(None, gt=0.0)  # Angstrom; default: the model's
    dtype: str = _spec("float32", choices=["float32", "float64"])  # network precision
    hparams: Dict[str, Any] = field(default_factory=dict)
    # cheap single-model uncertainty (mlpot.models.mve): None | mve; uncertainty_net: the
    # variance network {name: family, hparams: {...}} (default: a small dp_se_e2_a)
    uncertainty: Optional[str] = _spec(None, choices=["mve"])
    uncertainty_net: Optional[Dict[str, Any]] = None
    # short-range prior (mlpot.nn.zbl): None | zbl, the ZBL wall switched off between
    # repulsion_radii = [f_inner, f_outer] (default [0.4, 0.6]) of each pair's covalent-radius sum
    repulsion: Optional[str] = _spec(None, choices=["zbl"])
    repulsion_radii: Optional[List[float]] = None

    def __post_init__(self):
        from ..nn.zbl import check_repulsion

        try:
            check_repulsion(self.repulsion, self.repulsion_radii)
        except ValueError as err:
            raise ConfigError(str(err)) from None


@dataclass
class LossConfig:
    """Weights of the per-atom energy, force and stress mean squared errors.

    With ``*_start`` set, a weight moves from its start value to the final one in proportion to
    the learning rate (DeePMD-kit's prefactor schedule): w(t) = w + (w_start - w) * lr(t) / lr0.
    """
    energy: float = _spec(1.0, ge=0.0)
    forces: float = _spec(10.0, ge=0.0)
    stress: float = _spec(0.0, ge=0.0)
    energy_start: Optional[float] = _spec(None, ge=0.0)
    forces_start: Optional[float] = _spec(None, ge=0.0)
    stress_start: Optional[float] = _spec(None, ge=0.0)
    # a teacher's per-atom energies (data.atomic_energies_key; eV^-2 on the per-atom squared
    # error): in distillation, N labels per structure where the energy gives one
    atomic_energies: float = _spec(0.0, ge=0.0)
    atomic_energies_start: Optional[float] = _spec(None, ge=0.0)
    # a teacher's Hessian rows (data.hessian_key; (eV/A^2)^-2 on the squared error of an entry):
    # Hessian distillation; each step compares hessian_rows random labelled rows per structure,
    # one extra backward pass through the forces per row (mlpot.hessian)
    hessian: float = _spec(0.0, ge=0.0)
    hessian_start: Optional[float] = _spec(None, ge=0.0)
    hessian_rows: int = _spec(1, ge=1)
    # model.uncertainty: mve: weight of the variance network's Gaussian negative log-likelihood
    nll: float = _spec(1.0, ge=0.0)


@dataclass
class OptimConfig:
    optimizer: str = _spec("adam", choices=["adam", "adamw"])
    lr: float = _spec(2e-3, gt=0.0)
    weight_decay: float = _spec(0.0, ge=0.0)
    scheduler: str = _spec("exponential", choices=["exponential", "plateau", "cosine", "none"])
    lr_final: float = _spec(1e-5, ge=0.0)       # exponential and cosine: lr at the end
    plateau_patience: int = _spec(10, ge=1)     # plateau: epochs without improvement
    plateau_factor: float = _spec(0.5, gt=0.0, lt=1.0)
    ema_decay: float = _spec(0.99, ge=0.0, lt=1.0)  # 0 disables the weight EMA
    grad_clip: Optional[float] = _spec(10.0, gt=0.0)  # max gradient norm; None disables


@dataclass
class TrainingConfig:
    batch_size: int = _spec(4, ge=1)
    max_epochs: int = _spec(100, ge=1)
    # optimizer steps for the whole run (None: max_epochs decides); with max_steps the learning-
    # rate schedule follows the steps, so a slow machine gives the same model, only later
    max_steps: Optional[int] = _spec(None, ge=1)
    max_time_min: Optional[float] = _spec(None, gt=0.0)  # wall-clock limit for the whole run
    early_stopping_patience: Optional[int] = _spec(None, ge=1)  # epochs without a better loss
    seed: int = _spec(0, ge=0)
    device: str = "cpu"                         # cpu | cuda | cuda:N
    threads: Optional[int] = _spec(None, ge=1)  # torch intra-op threads
    out_dir: str = "mlpot-run"
    eval_every: int = _spec(1, ge=1)            # epochs between validations
    progress: bool = True
    tensorboard: bool = False                   # also log to out_dir/tensorboard (needs tensorboard)
    # after training: refit the per-element reference energies to the best model's residuals
    # on the training split (a constant offset the energy loss learns slowly is removed)
    energy_shift: bool = True
    ensemble: int = _spec(1, ge=1)              # 1: a single model; K >= 2: a committee of K
    bootstrap: bool = False                     # committee: each member fits a bootstrap resample
    # fine-tuning: start from this checkpoint's weights (its EMA's when it has them), same model
    # config; optimizer, schedule and step count start afresh (`Trainer.init_weights`)
    init_from: Optional[str] = None


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "optim": OptimConfig,
             "training": TrainingConfig}


def _unknown(key: str, valid, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'.{hint} Valid keys: {sorted(valid)}")


def dataclass_from_dict(cls, raw: Any, where: str, error=ConfigError,
                        sections: Optional[Dict[str, Any]] = None):
    """``cls(**raw)`` with every value converted to its field's type and checked against its
    ``_spec`` (the config files of `mlpot learn` and `mlpot distill`); ``sections``: keys whose
    values are such dataclasses themselves. Anything wrong is one line of ``error``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise error(f"{where} must be a mapping, not {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise error(str(_unknown(key, fields, where)))
        if sections and key in sections:
            kwargs[key] = dataclass_from_dict(sections[key], value, f"{where}: {key}", error)
            continue
        try:
            kwargs[key] = _checked(value, hints[key], fields[key].metadata, f"{where}.{key}")
        except ConfigError as err:
            raise error(str(err)) from None
    return cls(**kwargs)


def config_from_dict(raw: Dict[str, Any], where: str = "config") -> Config:
    """A checked Config from a plain dict (as read from YAML)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections {sorted(_SECTIONS)}")
    sections = {}
    for name, value in raw.items():
        if name not in _SECTIONS:
            raise _unknown(name, _SECTIONS, where)
        cls = _SECTIONS[name]
        value = value or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: section '{name}' must be a mapping, not {value!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for key in value:
            if key not in fields:
                raise _unknown(key, fields, f"{where}: {name}")
        sections[name] = cls(**{key: _checked(v, hints[key], fields[key].metadata,
                                              f"{where}: {name}.{key}")
                                for key, v in value.items()})
    cfg = Config(**sections)
    check_config(cfg, where)
    return cfg


def read_yaml(path: str, error=None) -> Dict[str, Any]:
    """The mapping in a YAML config file ({} for an empty file); ``error`` (default ConfigError)
    with one line for a missing file, invalid YAML or a top level that is not a mapping."""
    error = error or ConfigError
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise error(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise error(f"{path}: expected sections (a YAML mapping) at the top level, found "
                    f"{type(raw).__name__}")
    return raw


def load_config(path: str) -> Config:
    return config_from_dict(read_yaml(path), where=path)


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, List):
        plural = {str: "strings", int: "integers", float: "numbers", bool: "bools"}
        return f"a list of {plural.get(args[0], 'values')}" if args else "a list"
    if origin in (dict, Dict):
        return "a mapping"
    return _TYPE_NAMES.get(tp, str(tp))


def _convert(value: Any, tp) -> Any:
    """``value`` as type ``tp`` (a number written as a string, such as YAML 1.1's '1e-3', is a
    number; an integral float an int); TypeError when it is not one."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _convert(value, arg)
                except TypeError:
                    pass
        raise TypeError
    if origin in (list, List):
        if not isinstance(value, list):
            raise TypeError
        return [_convert(v, args[0]) for v in value] if args else value
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise TypeError
        return value
    if tp is bool or tp is str:
        if not isinstance(value, tp):
            raise TypeError
        return value
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise TypeError from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError
    if tp is int:
        if value != int(value):
            raise TypeError
        return int(value)
    return float(value)


def _checked(value: Any, tp, spec, key: str) -> Any:
    """``value`` converted to ``tp`` and checked against the field's ``_spec``; ConfigError."""
    try:
        value = _convert(value, tp)
    except TypeError:
        raise ConfigError(f"{key} = {value!r}: must be {_type_name(tp)}") from None
    if value is None:
        return value
    choices = spec.get("choices")
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{key} = {value!r} is not one of {choices}.{hint}")
    gt, ge, lt = spec.get("gt"), spec.get("ge"), spec.get("lt")
    if (gt is not None and not value > gt) or (ge is not None and not value >= ge) \
            or (lt is not None and not value < lt):
        bounds = [f"> {gt:g}" if gt is not None else "", f">= {ge:g}" if ge is not None else "",
                  f"< {lt:g}" if lt is not None else ""]
        kind = "an integer" if tp is int or int in typing.get_args(tp) else "a number"
        raise ConfigError(f"{key} = {value!r}: must be {kind} "
                          f"{' and '.join(b for b in bounds if b)}")
    return value


def _choice(value, options, key):
    if value not in options:
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{key} = '{value}' is not one of {options}.{hint}")


_DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")


def check_config(cfg: Config, where: str = "config") -> None:
    """Value checks that need no data (the data are checked when read); the types and ranges
    declared on the fields are checked by ``config_from_dict``, and again here."""
    from ..data.readers import ENERGY_UNITS_TO_EV, LENGTH_UNITS_TO_ANGSTROM
    from ..models import available, validate_model_config

    for name, section in (("data", cfg.data), ("model", cfg.model), ("loss", cfg.loss),
                          ("optim", cfg.optim), ("training", cfg.training)):
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            setattr(section, f.name, _checked(getattr(section, f.name), hints[f.name],
                                              f.metadata, f"{where}: {name}.{f.name}"))
    if not cfg.data.train:
        raise ConfigError(f"{where}: data.train is required (a file or folder of training data)")
    if cfg.data.test and cfg.data.test_fraction > 0:
        raise ConfigError(f"{where}: data.test and data.test_fraction are both set; give one "
                          "(a test file, or the fraction of data.train to hold out)")
    if (0 if cfg.data.validation else cfg.data.validation_fraction) + cfg.data.test_fraction >= 1:
        raise ConfigError(f"{where}: data.validation_fraction + data.test_fraction must be < 1 "
                          "(frames must be left to train on)")
    _choice(cfg.data.energy_unit, sorted(ENERGY_UNITS_TO_EV), f"{where}: data.energy_unit")
    _choice(cfg.data.length_unit, sorted(LENGTH_UNITS_TO_ANGSTROM), f"{where}: data.length_unit")
    _choice(cfg.model.name, available(), f"{where}: model.name")
    try:
        validate_model_config(cfg.model.name, cfg.model.hparams, cfg.model.cutoff,
                              cfg.model.dtype)
    except ValueError as err:
        raise ConfigError(f"{where}: model.hparams: {err}") from None
    if cfg.model.uncertainty == "mve":
        from ..models.mve import resolved_sigma_spec

        try:
            resolved_sigma_spec(cfg.model.uncertainty_net)
        except ValueError as err:
            raise ConfigError(f"{where}: model.uncertainty_net: {err}") from None
        if cfg.training.ensemble > 1:
            raise ConfigError(f"{where}: model.uncertainty: mve and training.ensemble = "
                              f"{cfg.training.ensemble}: choose one (the committee's deviation, "
                              "or the single model's variance network)")
    elif cfg.model.uncertainty_net is not None:
        raise ConfigError(f"{where}: model.uncertainty_net is set but model.uncertainty is not; "
                          "set model.uncertainty: mve, or remove model.uncertainty_net")
    if cfg.loss.energy == 0 and cfg.loss.forces == 0 and cfg.loss.stress == 0:
        raise ConfigError(f"{where}: loss: all weights are zero; nothing to train")
    if not _DEVICE.fullmatch(cfg.training.device):
        raise ConfigError(f"{where}: training.device = {cfg.training.device!r}: must be 'cpu', "
                          "'cuda' or 'cuda:N' (N: the GPU's index)")
    if not cfg.training.out_dir:
        raise ConfigError(f"{where}: training.out_dir = '': must name a folder for the run")
    if cfg.training.init_from:
        from ..checkpoint import file_kind

        kind = file_kind(cfg.training.init_from)
        if kind != "checkpoint":
            what = {"missing": "no such file", "torchscript": "an exported model",
                    "aoti": "an exported model"}.get(kind, "not an mlpot training checkpoint")
            raise ConfigError(f"{where}: training.init_from = {cfg.training.init_from!r}: {what}; "
                              "give the best.pt (or last.pt) of the run to start from")
    if cfg.training.bootstrap and cfg.training.ensemble < 2:
        raise ConfigError(f"{where}: training.bootstrap = true needs a committee: set "
                          "training.ensemble to the number of members (2 or more), or remove "
                          "training.bootstrap (a committee of one has nothing to resample for)")
    if cfg.training.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("training.tensorboard: the tensorboard package is not installed; "
                              "pip install tensorboard, or set training.tensorboard: false "
                              "(log.csv has the same numbers)") from None
