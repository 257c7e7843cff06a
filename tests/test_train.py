"""Training: config checks, data checks before training, outputs, exact resume, atomic
checkpoints, the CLI."""
import csv
import json
import os
import warnings

import numpy as np
import pytest
import torch
from ase.io import write

from _fitting import labelled_cu_cells, write_frames
from mlpot.cli import main as cli
from mlpot.data import DataError
from mlpot.train import ConfigError, Trainer, config_from_dict, load_config
from mlpot import checkpoint as ckpt
from mlpot.train import train

TINY = {"name": "egnn", "cutoff": 3.6, "hparams": {"hidden": 16, "num_layers": 2}}


def cu_frames(n=12):
    return labelled_cu_cells(n, seed=0, stress=True)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_frames(tmp_path_factory, cu_frames())


def cfg_dict(data_file, out_dir, epochs=3, **over):
    d = {"data": {"train": data_file, "validation_fraction": 0.25},
         "model": dict(TINY),
         "loss": {"energy": 1.0, "forces": 10.0, "stress": 1.0},
         "optim": {"lr": 5e-3},
         "training": {"batch_size": 3, "max_epochs": epochs, "out_dir": str(out_dir),
                      "progress": False, "seed": 3}}
    for section, values in over.items():
        d[section].update(values)
    return d


def test_unknown_keys_name_the_closest_valid_one(data_file):
    with pytest.raises(ConfigError, match="unknown key 'batchsize'.*Did you mean 'batch_size'"):
        config_from_dict({"data": {"train": data_file}, "training": {"batchsize": 2}})
    with pytest.raises(ConfigError, match="unknown key 'modle'.*Did you mean 'model'"):
        config_from_dict({"data": {"train": data_file}, "modle": {}})
    with pytest.raises(ConfigError, match="'egn' is not one of.*Did you mean 'egnn'"):
        config_from_dict({"data": {"train": data_file}, "model": {"name": "egn"}})
    with pytest.raises(ConfigError, match="no hyperparameter 'hiden'.*Did you mean 'hidden'"):
        config_from_dict({"data": {"train": data_file}, "model": {"name": "egnn",
                                                                  "hparams": {"hiden": 3}}})
    with pytest.raises(ConfigError, match="data.train is required"):
        config_from_dict({"model": {"name": "egnn"}})
    with pytest.raises(ConfigError, match="all weights are zero"):
        config_from_dict({"data": {"train": data_file},
                          "loss": {"energy": 0, "forces": 0, "stress": 0}})


def test_bad_data_stops_before_training(tmp_path, data_file):
    frames = cu_frames(4)
    frames[2].arrays["REF_forces"][0, 0] = np.nan
    bad = tmp_path / "bad.xyz"
    write(bad, frames, format="extxyz")
    with pytest.raises(DataError, match="bad.xyz:frame 2: forces contain NaN"):
        Trainer(config_from_dict(cfg_dict(str(bad), tmp_path / "r")))
    with pytest.raises(DataError, match=r"element\(s\) \['Cu'\] not in the type map"):
        Trainer(config_from_dict(cfg_dict(data_file, tmp_path / "r", data={"type_map": ["Al"]})))
    one = tmp_path / "one.xyz"
    write(one, frames[:1], format="extxyz")
    with pytest.raises(DataError, match="split is empty"):
        Trainer(config_from_dict(cfg_dict(str(one), tmp_path / "r")))
    del frames[1].info["REF_energy"]
    write(bad, frames, format="extxyz")
    with pytest.raises(DataError, match="frame 1: no energy found"):
        Trainer(config_from_dict(cfg_dict(str(bad), tmp_path / "r")))


def test_training_writes_outputs_and_learns(tmp_path, data_file):
    cfg = config_from_dict(cfg_dict(data_file, tmp_path / "run", epochs=6))
    results = train(cfg)
    out = tmp_path / "run"
    for name in ("best.pt", "last.pt", "log.csv", "metrics.json", "parity.png",
                 "learning_curve.png", "config.yaml"):
        assert (out / name).exists(), name
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    first, best = float(rows[0]["val_forces_rmse_meV_per_A"]), min(
        float(r["val_forces_rmse_meV_per_A"]) for r in rows)
    assert best < first  # it learns
    m = json.load(open(out / "metrics.json"))
    assert np.isfinite(m["validation"]["forces_rmse_meV_per_A"])
    assert results["validation"]["frames"] == 3
    # the written config reloads to the same run
    assert load_config(str(out / "config.yaml")).model.name == "egnn"
    # a second run into the same folder is refused (no silent overwrite)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg)


def test_resume_continues_exactly(tmp_path, data_file):
    full = Trainer(config_from_dict(cfg_dict(data_file, tmp_path / "full", epochs=4)))
    full.fit()
    part = Trainer(config_from_dict(cfg_dict(data_file, tmp_path / "part", epochs=4)))
    part.done = lambda: part.epoch >= 2  # the run is killed after its second checkpoint
    part.fit()
    resumed = Trainer(config_from_dict(cfg_dict(data_file, tmp_path / "part", epochs=4)))
    resumed.fit(resume=True)
    assert resumed.epoch == 4
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    for (k, a), b in zip(full.ema.state_dict().items(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b), k
    rows_full = list(csv.DictReader(open(tmp_path / "full" / "log.csv")))
    rows_res = list(csv.DictReader(open(tmp_path / "part" / "log.csv")))
    assert [r["val_loss"] for r in rows_full] == [r["val_loss"] for r in rows_res]


def test_resume_with_an_optimizer_state_of_other_weights_says_what_to_do(tmp_path, data_file):
    """A last.pt whose optimizer holds another parameter list (an older mlpot's model layout,
    e.g. nequip before its layers were trimmed) is a one-line error naming training.init_from,
    and the checkpoint is left as it was."""
    part = Trainer(config_from_dict(cfg_dict(data_file, tmp_path / "run", epochs=3)))
    part.done = lambda: part.epoch >= 1
    part.fit()
    last = str(tmp_path / "run" / "last.pt")
    state = ckpt.read_checkpoint(last)
    group = state["optimizer"]["param_groups"][0]
    group["params"] = list(group["params"]) + [max(group["params"]) + 1]
    ckpt.write_checkpoint(state, last)
    before = open(last, "rb").read()
    resumed = Trainer(config_from_dict(cfg_dict(data_file, tmp_path / "run", epochs=3)))
    with pytest.raises(ConfigError, match="training.init_from") as err:
        resumed.fit(resume=True)
    assert "\n" not in str(err.value)
    assert open(last, "rb").read() == before


def test_checkpoints_are_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    ckpt.write_checkpoint({"config": {"a": 1}, "model": {}}, path)

    def dies_halfway(obj, f, *a, **k):  # killed while torch writes (to a buffer or a file)
        if hasattr(f, "write"):
            f.write(b"partial garbage")
        else:
            with open(f, "wb") as fh:
                fh.write(b"partial garbage")
        raise KeyboardInterrupt("killed")

    def dies_before_the_rename(fd):  # killed after the temporary file is written
        raise KeyboardInterrupt("killed")

    for target, fake in ((torch, "save"), (os, "fsync")):
        monkeypatch.setattr(target, fake, dies_halfway if fake == "save"
                            else dies_before_the_rename)
        with pytest.raises(KeyboardInterrupt):
            ckpt.write_checkpoint({"config": {"a": 2}, "model": {}}, path)
        monkeypatch.undo()
        assert ckpt.read_checkpoint(path)["config"] == {"a": 1}
        assert os.listdir(tmp_path) == ["last.pt"]  # no temp file left behind
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable mlpot checkpoint"):
        ckpt.read_checkpoint(str(tmp_path / "junk.pt"))


def test_cli_train_and_test(tmp_path, data_file, capsys):
    import yaml

    cfg = cfg_dict(data_file, tmp_path / "cli", epochs=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(tmp_path / "c.yaml")]) == 0
    assert cli(["test", str(tmp_path / "cli" / "best.pt"), "--data", data_file, "--json",
                "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(out[out.index("{"): out.rindex("}") + 1])
    assert metrics["frames"] == 12 and np.isfinite(metrics["forces_rmse_meV_per_A"])
    assert (tmp_path / "t" / "parity.png").exists()
    (tmp_path / "typo.yaml").write_text("data:\n  train: x.xyz\ntraining:\n  epochs: 3\n")
    assert cli(["train", str(tmp_path / "typo.yaml")]) == 2
    assert "unknown key 'epochs'" in capsys.readouterr().err


SMALL_MODELS = {
    "dp_se_e2_a": {"cutoff": 3.6, "hparams": {"embedding": [4, 8], "axis_neuron": 2,
                                              "fitting": [8]}},
    "egnn": {"cutoff": 3.6, "hparams": {"hidden": 8, "num_layers": 1}},
    "nequip": {"cutoff": 3.6, "hparams": {"num_features": 4, "l_max": 3, "feature_l_max": 1,
                                          "correlation": 3, "num_layers": 2}},
}


@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_every_model_family_trains_with_ema(data_file, tmp_path, name):
    """The weight EMA copies the model (e3nn's spherical harmonics cannot be deep-copied as they
    are), and the EMA copy predicts what the trained weights it holds predict."""
    cfg = config_from_dict(cfg_dict(data_file, tmp_path / "run", epochs=1,
                                    model={"name": name, **SMALL_MODELS[name]},
                                    optim={"lr": 5e-3, "ema_decay": 0.99}))
    trainer = Trainer(cfg)
    trainer.fit()
    copy_ = __import__("copy").deepcopy(trainer.ema.module)
    batch = next(iter(trainer.val_set.loader(2))).as_dict()
    a = trainer.ema.module.eval()(dict(batch))
    b = copy_.eval()(dict(batch))
    assert torch.equal(a["energy"], b["energy"]) and torch.equal(a["forces"], b["forces"])
    assert np.isfinite(trainer.history[-1]["val_loss"])
    # integer buffers (nequip's index tables) are never averaged: an average of equal integers
    # in floating point can round down and silently break the EMA model
    for (name, buf), ema_buf in zip(trainer.model.named_buffers(),
                                    trainer.ema.module.buffers()):
        if not buf.is_floating_point():
            assert torch.equal(buf, ema_buf), name
    from mlpot.train.trainer import _ema_avg_fn

    index = torch.arange(8)  # 3 * 0.9 + 3 * 0.1 is 2.9999998 in float32
    assert torch.equal(_ema_avg_fn(0.9)(index.clone(), index, torch.tensor(1000)), index)
    # and the EMA model stays close to the trained one after many updates at high decay
    model = trainer.model.eval()
    for _ in range(300):
        trainer.ema.update_parameters(model)
    c = trainer.ema.module.eval()(dict(batch))
    d = model(dict(batch))
    assert torch.allclose(c["forces"], d["forces"], atol=1e-4)


def test_tensorboard_logging(data_file, tmp_path):
    """training.tensorboard writes event files beside log.csv, or, without the tensorboard
    package, stops before training with what to do."""
    raw = cfg_dict(data_file, tmp_path / "tb", epochs=1, training={"tensorboard": True})
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            config_from_dict(raw)
        return
    train(config_from_dict(raw))
    assert any(name.startswith("events.out.tfevents")
               for name in os.listdir(tmp_path / "tb" / "tensorboard"))


def test_max_steps_stops_mid_epoch_and_sets_the_schedule(tmp_path, data_file):
    """9 training frames, batch 3: 3 steps per epoch; max_steps 5 ends in epoch 2, validated,
    and the learning rate reaches lr_final at step 5 whatever max_epochs says."""
    cfg = config_from_dict(cfg_dict(data_file, tmp_path / "run", epochs=50,
                                    training={"max_steps": 5},
                                    optim={"lr": 5e-3, "lr_final": 5e-5}))
    t = Trainer(cfg)
    t.fit()
    assert t.step == 5 and t.epoch == 2
    assert t.progress() == pytest.approx(1.0)
    assert t.lr() == pytest.approx(5e-5)
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [int(r["step"]) for r in rows] == [3, 5]
    with pytest.raises(ConfigError, match="max_steps"):
        config_from_dict(cfg_dict(data_file, tmp_path / "bad", training={"max_steps": 0}))


def test_energy_shift_removes_the_offset_on_fixed_composition(tmp_path, data_file):
    """Every frame has the same composition (8 Cu): with a tiny energy weight the network
    leaves a constant offset; the refit of the reference energies after training removes
    it on the training split (mean signed error ~0), and best.pt holds the shifted values."""
    from mlpot.train.metrics import MetricAccumulator

    def run(name, shift):
        cfg = config_from_dict(cfg_dict(data_file, tmp_path / name, epochs=2,
                                        loss={"energy": 1e-4, "forces": 10.0, "stress": 0.0},
                                        training={"energy_shift": shift}))
        t = Trainer(cfg)
        t.fit()
        from mlpot.train.trainer import finalize

        results = finalize(t)
        acc = MetricAccumulator()
        model = t.eval_model()
        for batch in t.train_set.loader(4):
            acc.add(model(batch.as_dict(), compute_forces=False), batch)
        return results, acc.result()["energy_mean_error_meV_per_atom"], t

    results, bias, t = run("shifted", True)
    _, bias_off, t_off = run("plain", False)
    assert abs(bias_off) > 1.0  # meV/atom: the offset the shift is there for
    assert abs(bias) < 1e-3, bias
    held = ckpt.read_checkpoint(str(tmp_path / "shifted" / "best.pt"))
    assert held["energy_shift_done"] is True
    shift = torch.tensor(results["energy_shift_eV"], dtype=torch.float64)
    plain = ckpt.read_checkpoint(str(tmp_path / "plain" / "best.pt"))
    for key in ("model", "ema"):
        np.testing.assert_allclose(held[key]["reference_energies"].numpy(),
                                   (plain[key]["reference_energies"] + shift).numpy(),
                                   rtol=1e-12)
    assert "energy_mean_error_meV_per_atom" in results["validation"]


def test_energy_slope_measures_a_compressed_parity_plot():
    from types import SimpleNamespace

    from mlpot.train.metrics import MetricAccumulator

    n = torch.tensor([8, 8, 16, 16, 32], dtype=torch.long)
    per_atom = torch.tensor([-5.4, -5.2, -4.7, -5.3, -5.0], dtype=torch.float64)
    ref = per_atom * n
    batch = SimpleNamespace(energy=ref, forces=None, stress=None, num_atoms=n,
                            num_structures=5)
    acc = MetricAccumulator()
    acc.add({"energy": (0.8 * per_atom + 0.3) * n}, batch)  # scale 0.8 and an offset
    m = acc.result()
    assert m["energy_slope"] == pytest.approx(0.8, rel=1e-12)
    acc = MetricAccumulator()
    acc.add({"energy": ref + 0.01 * n}, batch)  # an offset alone: slope 1
    assert acc.result()["energy_slope"] == pytest.approx(1.0, rel=1e-12)


def test_energy_only_training_in_small_batches_warns(tmp_path, data_file):
    """Energies alone in batches below 16 structures: a warning that recommends batch 32; none
    with batch 16, and none when forces are learned in small batches."""
    def fit(name, batch, forces):
        cfg = config_from_dict(cfg_dict(data_file, tmp_path / name, epochs=1,
                                        loss={"energy": 1.0, "forces": forces, "stress": 0.0},
                                        training={"batch_size": batch, "max_steps": 1}))
        Trainer(cfg).fit()

    with pytest.warns(UserWarning, match=r"energies alone in batches of 3 .*batch_size 32"):
        fit("small", 3, 0.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*energies alone")
        fit("large", 16, 0.0)
        fit("forces", 3, 10.0)


def test_energy_only_model_at_the_mean_energy_warns(tmp_path, data_file):
    """A model trained on energies alone that ends with a validation parity slope below 0.3 (one
    step: still at the mean) draws a warning that says what helps; a model that learns forces
    does not, whatever its energy slope."""
    def run(name, forces):
        cfg = config_from_dict(cfg_dict(data_file, tmp_path / name, epochs=1,
                                        loss={"energy": 1.0, "forces": forces, "stress": 0.0},
                                        training={"batch_size": 16, "max_steps": 1}))
        return train(cfg)

    with pytest.warns(UserWarning, match=r"stayed near the mean energy \(validation parity "
                                         r"slope -?\d\.\d\d.*shorter model.cutoff"):
        m = run("energies", 0.0)
    assert m["validation"]["energy_slope"] < 0.3
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*mean energy")
        run("forces", 10.0)


def test_init_from_starts_from_a_checkpoints_weights(tmp_path, data_file):
    """training.init_from (fine-tuning): before the first step the model and its EMA hold the
    checkpoint's (EMA) weights, while the step count and schedule start afresh; a fine-tuned
    run starts at the first run's validation loss, not a fresh model's; a checkpoint of another
    model or a missing file is one ConfigError before any training; --resume keeps the run's
    own weights (last.pt), not the checkpoint's."""
    first = tmp_path / "first"
    train(config_from_dict(cfg_dict(data_file, first, epochs=25, optim={"lr": 1e-2,
                                                                      "ema_decay": 0.9})))
    held = ckpt.weights_of(ckpt.read_checkpoint(str(first / "best.pt")))
    over = {"optim": {"lr": 1e-3, "ema_decay": 0.9},
            "training": {"init_from": str(first / "best.pt"), "max_steps": 3}}
    t = Trainer(config_from_dict(cfg_dict(data_file, tmp_path / "ft", **over)))
    fresh = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.init_weights(str(first / "best.pt"))
    got = t.model.state_dict()
    assert all(torch.equal(got[k], held[k]) for k in held)
    assert any(not torch.equal(fresh[k], held[k]) for k in held if held[k].is_floating_point())
    ema = t.emas[0].module.state_dict()
    assert all(torch.equal(ema[k], held[k]) for k in held)
    assert t.step == 0
    # through fit(): the first validation is near the first run's best, far below a fresh start
    best_first = json.loads((first / "metrics.json").read_text())["validation"]["loss"]
    ft = Trainer(config_from_dict(cfg_dict(data_file, tmp_path / "ft2", **over)))
    ft.fit()
    scratch = Trainer(config_from_dict(cfg_dict(data_file, tmp_path / "scratch",
                                                **{**over, "training": {"max_steps": 3}})))
    scratch.fit()
    assert ft.step == 3
    assert ft.best_val < 2 * best_first < 0.2 * scratch.best_val, (ft.best_val, best_first,
                                                                scratch.best_val)
    # resume: last.pt's weights, not the checkpoint's again
    again = Trainer(config_from_dict(cfg_dict(data_file, tmp_path / "ft2", **{
        **over, "training": {**over["training"], "max_steps": 4}})))

    def not_again(*a, **k):
        raise AssertionError("init_from applied on --resume")

    again.init_weights = not_again
    again.fit(resume=True)
    assert again.step == 4
    # another model: one line, before training
    other = cfg_dict(data_file, tmp_path / "other", **over)
    other["model"] = {**TINY, "cutoff": 3.0}
    with pytest.raises(ConfigError, match=r"init_from .*best\.pt: its model differs .*cutoff"):
        Trainer(config_from_dict(other)).fit()
    assert not (tmp_path / "other" / "last.pt").exists()
    with pytest.raises(ConfigError, match=r"training\.init_from = .*nothere\.pt.*no such file"):
        config_from_dict(cfg_dict(data_file, tmp_path / "x",
                                  training={"init_from": str(tmp_path / "nothere.pt")}))
    from mlpot.export import export

    export(str(first / "best.pt"), str(tmp_path / "model.pt"))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for name, what in (("model.pt", "an exported model"),
                       ("notes.txt", "not an mlpot training checkpoint")):
        with pytest.raises(ConfigError, match=rf"init_from = .*{name}': {what}; give the best"):
            config_from_dict(cfg_dict(data_file, tmp_path / "x",
                                      training={"init_from": str(tmp_path / name)}))


def test_a_run_whose_forces_died_stops_with_what_to_do(tmp_path, data_file):
    """A Deep Potential whose fitting net saturated (what a too-high learning rate did on mlearn
    Ni) predicts zero forces and cannot recover: the run stops after that epoch with a
    one-line error naming optim.lr (from the second epoch on), instead of training on for its
    whole budget."""
    from mlpot.errors import exit_code_of
    from mlpot.models.deeppot import DeepPotSeA
    from mlpot.train.trainer import TrainingFailed

    model = {"name": "dp_se_e2_a", "cutoff": 3.6, "hparams": dict(DeepPotSeA.TEST_HPARAMS)}
    trainer = Trainer(config_from_dict(cfg_dict(data_file, tmp_path / "dead", model=model)))
    nets = [m for m in trainer.model.modules() if hasattr(m, "fittings")]
    assert nets
    with torch.no_grad():  # every unit of the first fitting layer far in its flat tails
        for fit in nets[0].fittings:
            fit.layers[0].linear.weight.mul_(1e6)
            fit.layers[0].linear.bias.mul_(1e6)
    with pytest.raises(TrainingFailed, match=r"epoch 2, step \d+: the forces are practically zero"
                                             r".*lower optim.lr \(now 0.005"):
        trainer.fit()
    assert exit_code_of(TrainingFailed("x")) == 2
    # the same model and data, untouched, trains on
    alive = Trainer(config_from_dict(cfg_dict(data_file, tmp_path / "alive", epochs=1,
                                              model=model)))
    alive.fit()
