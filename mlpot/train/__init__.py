"""Training from DFT data: config, trainer, losses, metrics, plots."""
from .config import Config, ConfigError, config_from_dict, load_config
from .trainer import Trainer, train

__all__ = ["Config", "ConfigError", "Trainer", "config_from_dict", "load_config", "train"]
