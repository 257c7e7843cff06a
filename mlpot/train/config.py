"""The training configuration: dataclasses loaded from YAML and checked on load.

An unknown key is an error that names the closest valid key, so a typo never silently falls back
to a default. Every field has a default except the training data.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration error; the message names the key and says what to do."""


@dataclass
class DataConfig:
    train: Union[str, List[str]] = ""           # file(s) or DeePMD folder(s)
    validation: Optional[Union[str, List[str]]] = None  # separate validation data, or ...
    validation_fraction: float = 0.1            # ... this fraction of train, held out by seed
    test: Optional[Union[str, List[str]]] = None
    format: Optional[str] = None                # None: deepmd for folders, else ase.io guesses
    type_map: Optional[List[str]] = None        # default: the elements of the training data
    energy_key: Optional[str] = None
    forces_key: Optional[str] = None
    stress_key: Optional[str] = None
    virial_key: Optional[str] = None
    energy_unit: str = "eV"
    length_unit: str = "A"
    min_distance: Optional[float] = 0.5         # Angstrom; closer atoms are an input error
    max_frames: Optional[int] = None            # use only the first frames of train (quick runs)


@dataclass
class ModelConfig:
    name: str = "dp_se_e2_a"                    # dp_se_e2_a | egnn | nequip
    cutoff: Optional[float] = None              # Angstrom; default: the model's
    dtype: str = "float32"                      # float32 | float64 (network precision)
    hparams: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    """Weights of the per-atom energy, force and stress mean squared errors.

    With ``*_start`` set, a weight moves from its start value to the final one in proportion to
    the learning rate (DeePMD-kit's prefactor schedule): w(t) = w + (w_start - w) * lr(t) / lr0.
    """
    energy: float = 1.0
    forces: float = 10.0
    stress: float = 0.0
    energy_start: Optional[float] = None
    forces_start: Optional[float] = None
    stress_start: Optional[float] = None


@dataclass
class OptimConfig:
    optimizer: str = "adam"                     # adam | adamw
    lr: float = 2e-3
    weight_decay: float = 0.0
    scheduler: str = "exponential"              # exponential | plateau | cosine | none
    lr_final: float = 1e-5                      # exponential and cosine: lr at the end
    plateau_patience: int = 10                  # plateau: epochs without improvement
    plateau_factor: float = 0.5
    ema_decay: float = 0.99                     # 0 disables the weight EMA
    grad_clip: Optional[float] = 10.0           # max gradient norm; None disables


@dataclass
class TrainingConfig:
    batch_size: int = 4
    max_epochs: int = 100
    max_time_min: Optional[float] = None        # wall-clock limit for the whole run
    early_stopping_patience: Optional[int] = None  # epochs without a better validation loss
    seed: int = 0
    device: str = "cpu"
    threads: Optional[int] = None               # torch intra-op threads
    out_dir: str = "mlpot-run"
    eval_every: int = 1                         # epochs between validations
    progress: bool = True
    tensorboard: bool = False                   # also log to out_dir/tensorboard (needs tensorboard)


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
        valid = {f.name for f in dataclasses.fields(cls)}
        for key in value:
            if key not in valid:
                raise _unknown(key, valid, f"{where}: {name}")
        sections[name] = cls(**value)
    cfg = Config(**sections)
    check_config(cfg, where)
    return cfg


def load_config(path: str) -> Config:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    return config_from_dict(raw or {}, where=path)


def _choice(value, options, key):
    if value not in options:
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{key} = '{value}' is not one of {options}.{hint}")


def check_config(cfg: Config, where: str = "config") -> None:
    """Value checks that need no data (the data are checked when read)."""
    from ..models import MODELS, check_hparams

    if not cfg.data.train:
        raise ConfigError(f"{where}: data.train is required (a file or folder of training data)")
    if not 0.0 <= cfg.data.validation_fraction < 1.0:
        raise ConfigError(f"data.validation_fraction must be in [0, 1), got "
                          f"{cfg.data.validation_fraction}")
    _choice(cfg.model.name, sorted(MODELS), "model.name")
    _choice(cfg.model.dtype, ["float32", "float64"], "model.dtype")
    try:
        check_hparams(cfg.model.name, cfg.model.hparams)
    except ValueError as err:
        raise ConfigError(f"{where}: model.hparams: {err}") from None
    _choice(cfg.optim.optimizer, ["adam", "adamw"], "optim.optimizer")
    _choice(cfg.optim.scheduler, ["exponential", "plateau", "cosine", "none"], "optim.scheduler")
    for key in ("energy", "forces", "stress"):
        if getattr(cfg.loss, key) < 0:
            raise ConfigError(f"loss.{key} must be >= 0")
    if cfg.loss.energy == 0 and cfg.loss.forces == 0 and cfg.loss.stress == 0:
        raise ConfigError("loss: all weights are zero; nothing to train")
    if cfg.optim.lr <= 0:
        raise ConfigError("optim.lr must be positive")
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        raise ConfigError("optim.ema_decay must be in [0, 1)")
    if cfg.training.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("training.tensorboard: the tensorboard package is not installed; "
                              "pip install tensorboard, or set training.tensorboard: false "
                              "(log.csv has the same numbers)") from None
    if cfg.training.batch_size < 1 or cfg.training.max_epochs < 1:
        raise ConfigError("training.batch_size and training.max_epochs must be >= 1")
