"""The training config: values converted to their declared types and checked against their
ranges when the file is read, model hyperparameters included, before any data are read
(issue 13, item 5). Every bad value is a ConfigError (exit code 2) of one line that names the
key, the value and what is allowed."""
from __future__ import annotations

import os

import pytest

from mlpot.cli import main as cli
from mlpot.errors import EXIT_BAD_INPUT, UserError, exit_code_of
from mlpot.train import ConfigError, config_from_dict, load_config

MISSING = "no-such-training-data.xyz"  # never read: every error below comes first


def raw(**sections):
    out = {"data": {"train": MISSING}}
    for name, values in sections.items():
        out.setdefault(name, {}).update(values)
    return out


def write(tmp_path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(f"data:\n  train: {MISSING}\n" + text)
    return str(path)


def test_numbers_written_as_yaml_1_1_strings_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-3 as the string '1e-3': it is the number 0.001."""
    path = write(tmp_path, "optim:\n  lr: 1e-3\n  lr_final: 1e-6\n"
                           "training:\n  max_epochs: 1e3\n  max_time_min: 2\n"
                           "model:\n  name: egnn\n  hparams: {avg_num_neighbors: 2e1}\n")
    cfg = load_config(path)
    assert cfg.model.hparams == {"avg_num_neighbors": "2e1"}  # as written; the model reads 20.0
    from mlpot.models import build_model

    net = build_model("egnn", ["O"], **cfg.model.hparams).net
    assert float(net.message_scale) == pytest.approx(1 / 20)
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.lr_final == 1e-6
    assert cfg.training.max_epochs == 1000 and isinstance(cfg.training.max_epochs, int)
    assert cfg.training.max_time_min == 2.0 and isinstance(cfg.training.max_time_min, float)


BAD = [
    # (section, key, value, what the one-line message must say)
    ("training", "eval_every", 0, "training.eval_every = 0: must be an integer >= 1"),
    ("optim", "plateau_patience", 0, "optim.plateau_patience = 0: must be an integer >= 1"),
    ("data", "max_frames", 0, "data.max_frames = 0: must be an integer >= 1"),
    ("training", "max_time_min", -1, "training.max_time_min = -1.0: must be a number > 0"),
    ("training", "max_time_min", 0, "training.max_time_min = 0.0: must be a number > 0"),
    ("model", "cutoff", 0, "model.cutoff = 0.0: must be a number > 0"),
    ("model", "cutoff", -3.0, "model.cutoff = -3.0: must be a number > 0"),
    ("training", "device", "gpu", "training.device = 'gpu': must be 'cpu', 'cuda' or 'cuda:N'"),
    ("training", "device", "cuda:x", "training.device = 'cuda:x': must be"),
    ("optim", "lr", "fast", "optim.lr = 'fast': must be a number"),
    ("optim", "lr", 0, "optim.lr = 0.0: must be a number > 0"),
    ("optim", "ema_decay", 1.0, "optim.ema_decay = 1.0: must be a number >= 0 and < 1"),
    ("optim", "plateau_factor", 1.5, "optim.plateau_factor = 1.5: must be a number > 0 and < 1"),
    ("optim", "grad_clip", -1, "optim.grad_clip = -1.0: must be a number > 0"),
    ("training", "batch_size", 2.5, "training.batch_size = 2.5: must be an integer"),
    ("training", "batch_size", 0, "training.batch_size = 0: must be an integer >= 1"),
    ("training", "seed", -1, "training.seed = -1: must be an integer >= 0"),
    ("training", "threads", 0, "training.threads = 0: must be an integer >= 1"),
    ("training", "early_stopping_patience", 0, "early_stopping_patience = 0: must be an integer"),
    ("training", "progress", "yes", "training.progress = 'yes': must be true or false"),
    ("loss", "forces", -1, "loss.forces = -1.0: must be a number >= 0"),
    ("data", "validation_fraction", 1.0, "data.validation_fraction = 1.0: must be a number >= 0"),
    ("data", "type_map", ["O", 1], "data.type_map = \\['O', 1\\]: must be a list of strings"),
    ("data", "energy_unit", "eV/atom", "data.energy_unit = 'eV/atom' is not one of"),
    ("data", "length_unit", "bohr", "data.length_unit = 'bohr' is not one of"),
    ("model", "dtype", "float16", "model.dtype = 'float16' is not one of"),
]


@pytest.mark.parametrize("section,key,value,message", BAD, ids=[f"{b[1]}={b[2]}" for b in BAD])
def test_each_bad_value_is_a_one_line_config_error(section, key, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        config_from_dict(raw(**{section: {key: value}}), where="run.yaml")
    text = str(err.value)
    assert text.startswith("run.yaml: ") and "\n" not in text


@pytest.mark.parametrize("model,message", [
    ({"name": "dp_se_e2_a", "cutoff": 0.4},
     "model.hparams: model 'dp_se_e2_a': hyperparameter rcut_smth = 0.5: must be below the "
     "cutoff \\(0.4 A\\)"),
    ({"name": "dp_se_e2_a", "cutoff": 4.0, "hparams": {"rcut_smth": 4.5}},
     "rcut_smth = 4.5: must be below the cutoff"),
    ({"name": "nequip", "hparams": {"l_max": -1}}, "l_max = -1: must be an integer >= 0"),
    ({"name": "egnn", "hparams": {"hidden": "64x"}}, "hidden = '64x': must be an integer"),
    ({"name": "egnn", "hparams": {"hiden": 8}}, "no hyperparameter 'hiden'.*Did you mean"),
    ({"name": "egnn", "hparams": None}, "model.hparams = None: must be a mapping"),
])
def test_bad_model_values_are_config_errors_before_the_data(model, message):
    with pytest.raises(ConfigError, match=message) as err:
        config_from_dict(raw(model=model))
    assert "\n" not in str(err.value)


def test_config_error_is_bad_input():
    err = ConfigError("x")
    assert isinstance(err, UserError) and isinstance(err, ValueError)
    assert exit_code_of(err) == EXIT_BAD_INPUT == 2


def test_good_values_pass_and_keep_their_types():
    cfg = config_from_dict(raw(training={"device": "cuda:1", "max_time_min": 0.5,
                                         "early_stopping_patience": None},
                               optim={"lr": 5e-4, "grad_clip": None},
                               model={"name": "dp_se_e2_a", "cutoff": 5, "dtype": "float64"}))
    assert cfg.training.device == "cuda:1" and cfg.optim.grad_clip is None
    assert cfg.model.cutoff == 5.0 and isinstance(cfg.model.cutoff, float)


def test_mlpot_train_stops_on_a_bad_value_before_reading_data(tmp_path, capsys):
    """The CLI: exit code 2, one line naming key and value, no run folder, no data read (the
    training file does not even exist)."""
    out_dir = tmp_path / "run"
    path = write(tmp_path, f"training:\n  eval_every: 0\n  out_dir: {out_dir}\n")
    assert cli(["train", path]) == 2
    err = capsys.readouterr().err.strip()
    assert "training.eval_every = 0: must be an integer >= 1" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not os.path.exists(out_dir)
