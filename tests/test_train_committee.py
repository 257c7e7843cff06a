"""Committees in one `mlpot train` run (training.ensemble, training.bootstrap): members that
differ, a committee checkpoint that exports to one file, exact resume, bootstrap resamples,
the calibration factor, and `mlpot test` on a committee."""
import csv
import json

import numpy as np
import pytest
import torch
import yaml

from _fitting import labelled_cu_cells, write_frames
from mlpot import keys as K
from mlpot.checkpoint import model_from_checkpoint, read_checkpoint
from mlpot.cli import main as cli
from mlpot.export import export, load, read_metadata
from mlpot.models.committee import Committee
from mlpot.train import ConfigError, Trainer, config_from_dict
from mlpot.train.metrics import MetricAccumulator, ence
from mlpot.train.trainer import bootstrap_indices

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"name": "egnn", "cutoff": 3.6, "hparams": {"hidden": 8, "num_layers": 1}}


def cu_frames(n=10):
    return labelled_cu_cells(n, seed=100, stress=False)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_frames(tmp_path_factory, cu_frames())


def cfg_dict(data_file, out_dir, epochs=2, **training):
    return {"data": {"train": data_file, "validation_fraction": 0.3},
            "model": dict(TINY),
            "loss": {"energy": 1.0, "forces": 10.0},
            "optim": {"lr": 5e-3},
            "training": {"batch_size": 3, "max_epochs": epochs, "out_dir": str(out_dir),
                         "progress": False, "seed": 5, "ensemble": 3, **training}}


def test_bad_committee_options_are_config_errors(data_file, tmp_path):
    for k in (0, -1):
        with pytest.raises(ConfigError, match=f"training.ensemble = {k}: must be an integer >= 1"):
            config_from_dict(cfg_dict(data_file, tmp_path, ensemble=k))
    with pytest.raises(ConfigError, match="training.ensemble = 2.5"):
        config_from_dict(cfg_dict(data_file, tmp_path, ensemble=2.5))
    with pytest.raises(ConfigError, match="bootstrap = true needs a committee"):
        config_from_dict(cfg_dict(data_file, tmp_path, ensemble=1, bootstrap=True))
    assert config_from_dict(cfg_dict(data_file, tmp_path, ensemble=1)).training.ensemble == 1


@pytest.fixture(scope="module")
def committee_run(data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("committee") / "run"
    cfg = config_from_dict(cfg_dict(data_file, out, epochs=2))
    trainer = Trainer(cfg)
    trainer.fit()
    from mlpot.train.trainer import finalize

    results = finalize(trainer)
    return trainer, results, out


def test_one_run_trains_a_committee_that_exports_to_one_file(committee_run, tmp_path):
    trainer, results, out = committee_run
    assert trainer.committee_size == 3 and isinstance(trainer.model, Committee)
    # one dataset (neighbor lists built once) shared by every member
    n = len(trainer.train_set)
    assert all(sorted(i for b in trainer.member_batches(k) for i in b) == list(range(n))
               for k in range(3))
    # members differ: different initial seeds give different weights and predictions
    w = [dict(m.named_parameters()) for m in trainer.members]
    name = next(n for n, p in w[0].items() if p.numel() > 4)
    assert not torch.equal(w[0][name], w[1][name]) and not torch.equal(w[1][name], w[2][name])
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(np.isfinite(float(r["val_uq_spearman_frame"])) for r in rows)
    state = read_checkpoint(str(out / "best.pt"))
    assert state["config"]["model"] == "committee" and len(state["config"]["members"]) == 3
    assert isinstance(state["optimizer"], list) and len(state["optimizer"]) == 3
    model = model_from_checkpoint(str(out / "best.pt"))
    assert isinstance(model, Committee) and model.num_members == 3
    assert float(model.calibration) == pytest.approx(results["calibration_factor"], rel=1e-12)
    path = export(model, str(tmp_path / "committee.pt"))
    meta = read_metadata(path)
    assert meta["committee"] == 3
    assert meta["calibration"] == pytest.approx(results["calibration_factor"], rel=1e-12)
    loaded = load(path)
    batch = next(iter(trainer.val_set.loader(3))).as_dict()
    got = loaded(dict(batch), True, False)
    ref = model(dict(batch), True, False)
    assert got[K.FORCES_MEMBERS].shape[0] == 3
    assert float(got[K.MAX_FORCE_DEV].min()) > 0  # the members disagree
    torch.testing.assert_close(got[K.MAX_FORCE_DEV], ref[K.MAX_FORCE_DEV])
    torch.testing.assert_close(got[K.MAX_FORCE_DEV + K.CALIBRATED_SUFFIX],
                               ref[K.MAX_FORCE_DEV] * results["calibration_factor"])


def test_calibration_factor_is_the_formula_on_validation(committee_run):
    trainer, results, out = committee_run
    model = model_from_checkpoint(str(out / "best.pt"))
    err2, dev2 = [], []
    for batch in trainer.val_set.loader(2):
        pred = model(batch.as_dict(), True, False)
        f = pred[K.FORCES].detach().numpy()
        members = pred[K.FORCES_MEMBERS].detach().numpy()  # [K, N, 3]
        dev2.append(((members - members.mean(0)) ** 2).sum(-1).mean(0))  # DeePMD's, squared
        err2.append(((f - batch.forces.numpy()) ** 2).sum(-1))
    c = np.sqrt(np.concatenate(err2).mean() / np.concatenate(dev2).mean())
    assert results["calibration_factor"] == pytest.approx(c, rel=1e-6)
    assert c != pytest.approx(1.0, abs=1e-3)
    val = results["validation"]
    # with the fitted factor the calibrated deviation has the observed RMS on validation
    assert val["uq_rms_ratio"] == pytest.approx(1.0, rel=1e-6)
    assert val["uq_calibration"] == pytest.approx(c, rel=1e-6)
    written = json.load(open(out / "metrics.json"))
    assert written["calibration_factor"] == results["calibration_factor"]
    for key in ("uq_spearman_frame", "uq_spearman_atom", "uq_ence"):
        assert np.isfinite(written["validation"][key]), key


def test_uncertainty_measures_against_numpy_and_scipy():
    from scipy.stats import spearmanr

    class Batch:  # two frames of 3 atoms
        energy = None
        stress = None
        num_structures = 2
        batch = torch.tensor([0, 0, 0, 1, 1, 1])

    rng = np.random.default_rng(0)
    fp, fr = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    dev = rng.uniform(0.1, 1.0, size=6)
    B = Batch()
    B.forces = torch.tensor(fr)
    acc = MetricAccumulator()
    acc.add({K.FORCES: torch.tensor(fp), K.FORCES_DEV: torch.tensor(dev),
             K.FORCES_DEV + K.CALIBRATED_SUFFIX: torch.tensor(2 * dev),
             K.MAX_FORCE_DEV: torch.tensor([dev[:3].max(), dev[3:].max()])}, B)
    m = acc.result()
    err = np.linalg.norm(fp - fr, axis=1)
    assert acc.calibration_factor() == pytest.approx(np.sqrt((err ** 2).mean() / (dev ** 2).mean()))
    assert m["uq_calibration"] == pytest.approx(2.0)
    assert m["uq_rms_ratio"] == pytest.approx(np.sqrt((err ** 2).mean() / (4 * dev ** 2).mean()))
    assert m["uq_spearman_atom"] == pytest.approx(spearmanr(dev, err)[0])
    # ENCE with one value per bin: mean of |d - e| / d
    assert ence(err, 2 * dev, bins=6) == pytest.approx(np.mean(np.abs(2 * dev - err) / (2 * dev)))
    assert ence(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0


def test_resumed_committee_equals_an_uninterrupted_one(data_file, tmp_path):
    full = Trainer(config_from_dict(cfg_dict(data_file, tmp_path / "full", epochs=3,
                                             bootstrap=True)))
    full.fit()
    part = Trainer(config_from_dict(cfg_dict(data_file, tmp_path / "part", epochs=3,
                                             bootstrap=True)))
    part.done = lambda: part.epoch >= 1  # killed after its first checkpoint
    part.fit()
    resumed = Trainer(config_from_dict(cfg_dict(data_file, tmp_path / "part", epochs=3,
                                                bootstrap=True)))
    resumed.fit(resume=True)
    assert resumed.epoch == 3
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    for ea, eb in zip(full.emas, resumed.emas):
        for (k, a), b in zip(ea.state_dict().items(), eb.state_dict().values()):
            assert torch.equal(a, b), k
    for oa, ob in zip(full.optimizers, resumed.optimizers):
        for a, b in zip(oa.state_dict()["state"].values(), ob.state_dict()["state"].values()):
            assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    rows_full = list(csv.DictReader(open(tmp_path / "full" / "log.csv")))
    rows_res = list(csv.DictReader(open(tmp_path / "part" / "log.csv")))
    assert [r["val_loss"] for r in rows_full] == [r["val_loss"] for r in rows_res]
    # a resume with another committee size is refused with what to do
    other = Trainer(config_from_dict(cfg_dict(data_file, tmp_path / "part", epochs=4,
                                              ensemble=2)))
    with pytest.raises(ConfigError, match="holds a committee of 3 but training.ensemble = 2"):
        other.fit(resume=True)


def test_bootstrap_gives_members_different_frames(data_file, tmp_path):
    cfg = config_from_dict(cfg_dict(data_file, tmp_path / "b", bootstrap=True))
    trainer = Trainer(cfg)
    n = len(trainer.train_set)
    frames = trainer.member_frames
    assert all(len(f) == n for f in frames)
    assert len({tuple(f) for f in frames}) == 3  # each member its own resample
    assert any(len(set(f)) < n for f in frames)  # drawn with replacement
    assert frames == [bootstrap_indices(n, 5 + k) for k in range(3)]  # by seed, reproducibly
    again = Trainer(config_from_dict(cfg_dict(data_file, tmp_path / "b2", bootstrap=True)))
    assert again.member_frames == frames
    # the loader of member k serves exactly its resample, as the shared structure objects
    seen = []
    for batch_idx in trainer.member_batches(1):
        seen += batch_idx
    assert sorted(seen) == sorted(frames[1])
    plain = Trainer(config_from_dict(cfg_dict(data_file, tmp_path / "p")))
    assert plain.member_frames == [None, None, None]


def test_cli_test_reports_calibration_for_a_committee(committee_run, data_file, tmp_path,
                                                      capsys):
    _, results, out = committee_run
    assert cli(["test", str(out / "best.pt"), "--data", data_file]) == 0
    table = capsys.readouterr().out
    for name in ("UQ calibration factor", "UQ Spearman per frame", "UQ ENCE",
                 "UQ RMS error / RMS dev"):
        assert name in table, table
    path = export(model_from_checkpoint(str(out / "best.pt")), str(tmp_path / "c.pt"))
    assert cli(["test", path, "--data", data_file, "--json", "--out", str(tmp_path / "t")]) == 0
    text = capsys.readouterr().out
    metrics = json.loads(text[text.index("{"): text.rindex("}") + 1])
    assert metrics["uq_calibration"] == pytest.approx(results["calibration_factor"], rel=1e-6)
    assert -1 <= metrics["uq_spearman_frame"] <= 1 and metrics["uq_ence"] >= 0
    assert json.load(open(tmp_path / "t" / "test_metrics.json"))["uq_ence"] == metrics["uq_ence"]
    # a single model has no uncertainty rows
    single = cfg_dict(data_file, tmp_path / "single", epochs=1, ensemble=1)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(single))
    assert cli(["train", str(tmp_path / "s.yaml")]) == 0
    capsys.readouterr()
    assert cli(["test", str(tmp_path / "single" / "best.pt"), "--data", data_file]) == 0
    assert "UQ" not in capsys.readouterr().out


def test_export_of_separately_trained_models_is_one_committee(committee_run, data_file, tmp_path,
                                                              capsys):
    """`mlpot export a/best.pt b/best.pt -o c.pt` (DP-GEN's way: models trained apart) writes
    one committee whose mean and deviations are those of the two models' own exports."""
    from mlpot.uncertainty import model_deviation

    runs = []
    for seed in (5, 6):
        cfg = cfg_dict(data_file, tmp_path / f"m{seed}", epochs=1, ensemble=1, seed=seed)
        (tmp_path / f"m{seed}.yaml").write_text(yaml.safe_dump(cfg))
        assert cli(["train", str(tmp_path / f"m{seed}.yaml")]) == 0
        runs.append(str(tmp_path / f"m{seed}" / "best.pt"))
    out = str(tmp_path / "c.pt")
    assert cli(["export", *runs, "-o", out]) == 0
    assert "committee model" in capsys.readouterr().out
    meta = read_metadata(out)
    assert meta["committee"] == 2 and meta["calibration"] == 1.0
    assert meta["training_data_hash"] == read_checkpoint(runs[0])["data_hash"]
    singles = [load(export(r, str(tmp_path / f"s{k}.pt"))) for k, r in enumerate(runs)]
    batch = next(iter(committee_run[0].val_set.loader(3))).as_dict()
    got = load(out)(dict(batch), True, False)
    each = [m(dict(batch), True, False) for m in singles]
    e = torch.stack([o[K.ENERGY] for o in each])
    f = torch.stack([o[K.FORCES] for o in each])
    torch.testing.assert_close(got[K.ENERGY], e.mean(0))
    torch.testing.assert_close(got[K.FORCES], f.mean(0))
    n_atoms = torch.bincount(batch[K.BATCH])
    dev = model_deviation(e, f, batch[K.BATCH], n_atoms)
    torch.testing.assert_close(got[K.MAX_FORCE_DEV], dev[K.MAX_FORCE_DEV])
    assert float(got[K.MAX_FORCE_DEV].min()) > 0  # two seeds disagree
    # members that do not fit together, and a committee as a member: one line, exit code 2
    other = cfg_dict(data_file, tmp_path / "cut", epochs=1, ensemble=1)
    other["model"]["cutoff"] = 3.0
    (tmp_path / "cut.yaml").write_text(yaml.safe_dump(other))
    assert cli(["train", str(tmp_path / "cut.yaml")]) == 0
    capsys.readouterr()
    for bad, why in (([runs[0], str(tmp_path / "cut" / "best.pt")], "must share all three"),
                     ([runs[0], str(committee_run[2] / "best.pt")],
                      "a committee is built from single models")):
        assert cli(["export", *bad, "-o", str(tmp_path / "bad.pt")]) == 2
        err = capsys.readouterr().err.strip()
        assert why in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "bad.pt").exists()
