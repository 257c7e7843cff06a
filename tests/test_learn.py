"""`mlpot learn`: the active-learning loop with the EMT labeller on an 8-atom Cu cell (two
iterations grow the data set; a kill between the iterations resumes to the same data set), the
pool mode (query by committee, labels taken from the pool, never recomputed) and bad input
(one line, exit code 2, before any work)."""
import csv
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import yaml
from ase.build import bulk
from ase.calculators.calculator import Calculator
from ase.calculators.emt import EMT
from ase.io import read, write

from mlpot.cli import main as cli
from mlpot.train import ConfigError
from mlpot.learn import (classify, farthest_point_sampling, learn, learn_config_from_dict,
                         weighted_kmeans_pick,
                         structure_descriptor)

pytestmark = pytest.mark.usefixtures("one_thread")

POOL_OFFSET = 1.0  # eV added to the pool's energies: a recomputed label would lack it


class BrokenCalculator(Calculator):
    """An ASE calculator that knows no copper (for the dry run before the loop)."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=None, system_changes=None):
        raise ValueError("no parameters for Cu")


def cu_cells(n, seed, offset=0.0):
    frames = []
    for k in range(n):
        a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
        a.rattle(0.1, seed=seed + k)
        a.calc = EMT()
        a.info["REF_energy"] = a.get_potential_energy() + offset
        a.arrays["REF_forces"] = a.get_forces()
        a.calc = None
        frames.append(a)
    return frames


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("learn_inputs")
    write(d / "init.xyz", cu_cells(6, 0), format="extxyz")
    write(d / "start.xyz", bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1)),
          format="extxyz")
    write(d / "pool.xyz", cu_cells(10, 100, POOL_OFFSET), format="extxyz")
    return d


def config(inputs, learn_dir, **changes):
    cfg = {"learn_dir": str(learn_dir), "data": str(inputs / "init.xyz"),
           "training": {"model": {"name": "egnn", "cutoff": 3.6,
                                  "hparams": {"hidden": 8, "num_layers": 1}},
                        "loss": {"energy": 1.0, "forces": 10.0}, "optim": {"lr": 5e-3},
                        "data": {"validation_fraction": 0.3},
                        "training": {"batch_size": 3, "max_epochs": 2, "seed": 5,
                                     "ensemble": 2}},
           "explore": {"structures": str(inputs / "start.xyz"), "temperatures": [300, 900],
                       "replicas": 1, "steps": 20, "timestep": 2.0, "collect_every": 5},
           # tiny members barely disagree (max_force_dev ~1e-3 eV/A): levels that make every
           # explored frame a candidate, so that each iteration adds max_labels labels
           "selection": {"lower": 1e-5, "upper": 1.0, "max_labels": 3},
           "labeller": {"kind": "ase", "ase_calculator": "ase.calculators.emt:EMT"},
           "stop": {"max_iterations": 2}}
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_config(tmp_path, cfg):
    path = tmp_path / "learn.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def loop(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("learn") / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = learn(learn_config_from_dict(config(inputs, out)), log=lambda *a: None)
    # iteration 1 was warm-started from iteration 0's weights (a mismatch warns and starts fresh)
    assert not [w for w in caught if "training starts fresh" in str(w.message)]
    return out, state


def labelled(run, i):
    return read(str(run / f"iter_{i:03d}" / "labelled.xyz"), index=":")


def test_two_iterations_grow_the_data_set_with_emt_labels(loop):
    run, state = loop
    assert state["stopped"] == "stop.max_iterations = 2 reached"
    rows = list(csv.DictReader(open(run / "learning.csv")))
    assert [int(r["iteration"]) for r in rows] == [0, 1]
    # iteration 0 trains on the 6 initial frames, iteration 1 on those plus its 3 labels
    assert [int(r["labels"]) for r in rows] == [6, 9]
    assert [int(r["labels_added"]) for r in rows] == [3, 3]
    for r in rows:  # 2 temperatures x 1 replica, 20 steps, a frame every 5: 8 frames
        assert int(r["frames"]) == 8 and float(r["candidate"]) == 1.0
        assert float(r["val_forces_rmse_eV_per_A"]) > 0
    # the loop's wall time when each iteration ended: growing, and in state.json as a whole
    times = [float(r["elapsed_s"]) for r in rows]
    assert 0 < times[0] < times[1] <= state["elapsed_s"] + 0.05  # rounded to 0.1 s
    assert (run / "learning.png").stat().st_size > 0
    assert (run / "iter_001" / "model.pt").exists()
    cfg = yaml.safe_load(open(run / "iter_001" / "train" / "config.yaml"))
    assert cfg["data"]["train"][-1].endswith("iter_000/labelled.xyz")
    explored = read(str(run / "iter_000" / "explored.xyz"), index=":")
    for i in (0, 1):
        frames = labelled(run, i)
        assert len(frames) == 3
        for a in frames:  # the labels are EMT's at these positions
            b = a.copy()
            b.calc = EMT()
            assert a.info["REF_energy"] == pytest.approx(b.get_potential_energy(), abs=1e-6)
            np.testing.assert_allclose(a.arrays["REF_forces"], b.get_forces(), atol=1e-6)
    # the labelled frames are explored frames (MD snapshots, not the starting cell)
    pos = [a.positions for a in explored]
    for a in labelled(run, 0):
        assert any(np.allclose(a.positions, p, atol=1e-8) for p in pos)
        assert a.info["step"] > 0


def _learn_in_subprocess(path, kill_at=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # output before os._exit
    env.pop("MLPOT_TEST_KILL_AT", None)
    if kill_at:
        env["MLPOT_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "mlpot.cli", "learn", path], env=env,
                          capture_output=True, text=True, timeout=300)


def test_kills_mid_iteration_and_between_iterations_resume_to_the_same_data_set(
        loop, inputs, tmp_path):
    ref, _ = loop
    run = tmp_path / "run"
    path = write_config(tmp_path, config(inputs, run))
    # killed after iteration 0's labels were written, before its phase was recorded
    killed = _learn_in_subprocess(path, kill_at="learn-labels-written-0")
    assert killed.returncode == 137, killed.stderr
    assert json.load(open(run / "state.json"))["phase"] == "selected"
    assert len(labelled(run, 0)) == 3
    # resumed: the labels are not computed again; then killed between the iterations
    killed = _learn_in_subprocess(path, kill_at="learn-iteration-1")
    assert killed.returncode == 137, killed.stderr
    assert "iter labels" in killed.stdout  # the table of iteration 0
    assert "frames (0 failed)" not in killed.stdout and "training" not in killed.stdout
    state = json.load(open(run / "state.json"))
    assert state["iteration"] == 1 and state["phase"] is None
    assert not (run / "iter_001").exists()
    done = _learn_in_subprocess(path)
    assert done.returncode == 0, done.stderr
    assert "iteration 0: training" not in done.stdout  # iteration 0 was not redone
    for i in (0, 1):
        got, want = labelled(run, i), labelled(ref, i)
        assert len(got) == len(want) == 3
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a.positions, b.positions)
            assert a.info["REF_energy"] == b.info["REF_energy"]
            np.testing.assert_array_equal(a.arrays["REF_forces"], b.arrays["REF_forces"])
    assert list(csv.DictReader(open(run / "learning.csv")))[-1]["labels"] == "9"
    # the same command once more: the loop has stopped, nothing is redone
    again = _learn_in_subprocess(path)
    assert again.returncode == 0 and "training" not in again.stdout
    assert "already stopped" in again.stdout


def test_pool_mode_picks_pool_frames_and_never_relabels(inputs, tmp_path):
    run = tmp_path / "pool"
    cfg = config(inputs, run, labeller={"kind": "pool", "pool": str(inputs / "pool.xyz")},
                 explore={"structures": []})
    state = learn(learn_config_from_dict(cfg), log=lambda *a: None)
    pool = read(str(inputs / "pool.xyz"), index=":")
    chosen = []
    for i in (0, 1):
        explored = read(str(run / f"iter_{i:03d}" / "explored.xyz"), index=":")
        # every unchosen pool frame is scored by the committee; chosen ones are not again
        assert len(explored) == 10 - 3 * i
        assert all(a.info["max_force_dev"] > 0 for a in explored)
        assert not set(a.info["pool_index"] for a in explored) & set(chosen)
        assert not (run / f"iter_{i:03d}" / "uncertain.xyz").exists()  # no MD
        sel = read(str(run / f"iter_{i:03d}" / "selected.xyz"), index=":")
        idx = [a.info["pool_index"] for a in sel]
        # FPS starts from the frame the committee doubts most
        assert idx[0] == max(explored, key=lambda a: a.info["max_force_dev"]).info["pool_index"]
        for k, a in zip(idx, labelled(run, i)):  # the pool's labels, offset included
            assert a.info["REF_energy"] == pytest.approx(pool[k].info["REF_energy"], abs=1e-9)
            np.testing.assert_allclose(a.arrays["REF_forces"], pool[k].arrays["REF_forces"],
                                       atol=1e-9)
            np.testing.assert_allclose(a.positions, pool[k].positions, atol=1e-9)
        chosen += idx
    assert len(set(chosen)) == 6 and sorted(state["pool_chosen"]) == sorted(chosen)
    # a stopped loop goes on when its stopping rules are relaxed (only stop: may change)
    cfg["stop"] = {"max_iterations": 3}
    state = learn(learn_config_from_dict(cfg), log=lambda *a: None)
    assert len(state["rows"]) == 3 and len(set(state["pool_chosen"])) == 9
    assert set(state["pool_chosen"]) > set(chosen)
    cfg["selection"] = {**cfg["selection"], "max_labels": 4}
    with pytest.raises(ConfigError, match="another config .selection.max_labels: 3 -> 4"):
        learn(learn_config_from_dict(cfg), log=lambda *a: None)


def test_weighted_kmeans_pick():
    """One frame per well-separated group, the heaviest group first; weights pull a centre (and
    so the pick) toward the doubted frames; reproducible from the seed."""
    rng = np.random.default_rng(0)
    groups = [rng.normal(c, 0.05, size=(6, 2)) for c in ((0, 0), (5, 0), (0, 5))]
    x = np.concatenate(groups)
    w = np.ones(len(x))
    w[12:] = 3.0  # the third group is the most doubted
    picked = weighted_kmeans_pick(x, w, 3, seed=1)
    assert sorted(k // 6 for k in picked) == [0, 1, 2] and picked[0] // 6 == 2
    assert picked == weighted_kmeans_pick(x, w, 3, seed=1)
    line = np.array([[0.0], [1.0], [2.0]])
    assert weighted_kmeans_pick(line, np.ones(3), 1) == [1]  # the middle
    assert weighted_kmeans_pick(line, np.array([1.0, 1.0, 10.0]), 1) == [2]  # centre 1.75
    assert weighted_kmeans_pick(line, np.ones(3), 5) == [0, 1, 2]
    assert weighted_kmeans_pick(line[:0], np.ones(0), 2) == []


def test_fps_and_classes():
    x = np.array([[0.0], [0.1], [5.0], [2.4], [0.2]])
    assert farthest_point_sampling(x, 3, first=0) == [0, 2, 3]
    # with the labelled data as centres (greedy k-centre): far from 5.0 and 0.0 first
    assert farthest_point_sampling(x, 2, covered=np.array([[5.0], [0.0]])) == [3, 4]
    assert classify(np.array([0.01, 0.05, 0.1, 0.15, np.nan]), 0.05, 0.15).tolist() == \
        [0, 1, 1, 2, 2]
    a = bulk("Cu", "fcc", a=3.61, cubic=True)
    b = a.copy()
    b.rattle(0.1, seed=1)
    da, db = structure_descriptor(a, 3.6), structure_descriptor(b, 3.6)
    rotated = b.copy()
    rotated.rotate(30, "z", rotate_cell=True)
    np.testing.assert_allclose(structure_descriptor(rotated, 3.6), db, atol=1e-9)
    assert np.linalg.norm(da - db) > 1e-2


@pytest.mark.parametrize("change, message", [
    ({"training": {"training": {"ensemble": 1}}}, "ensemble = 1: active learning needs a "
                                                  "committee"),
    ({"selection": {"lower": 0.2, "upper": 0.1}}, "selection.lower = 0.2 must be below "
                                                  "selection.upper = 0.1"),
    ({"labeller": {"kind": "ase", "ase_calculator": "no_such_pkg.calc:Calc"}},
     "cannot import no_such_pkg.calc"),
    ({"labeller": {"kind": "pyscf"}}, "is periodic"),
    ({"explore": {"pressures": [1.0]}}, "explore.pressures needs explore.ensemble: npt"),
    ({"selection": {"rank": "relativ"}}, "selection.rank = 'relativ' is not one of"),
    ({"selection": {"relative_level": 0}}, "selection.relative_level = 0.0: must be a number > 0"),
    ({"explore": {"structures": "AU"}}, "structure 0 has Au, which the initial data (Cu) do "
                                        "not have"),
    ({"labeller": {"kind": "ase", "ase_calculator": "test_learn:BrokenCalculator"}},
     "the dry run of test_learn:BrokenCalculator failed: ValueError: no parameters for Cu"),
])
def test_bad_input_is_one_line_before_any_work(inputs, tmp_path, capsys, change, message):
    cfg = config(inputs, tmp_path / "run")
    if change.get("explore", {}).get("structures") == "AU":
        au = bulk("Cu", "fcc", a=3.61, cubic=True)
        au.symbols[0] = "Au"
        write(tmp_path / "cuau.xyz", au, format="extxyz")
        change = {"explore": {"structures": str(tmp_path / "cuau.xyz")}}
    if "training" in change:
        cfg["training"]["training"] = {**cfg["training"]["training"], "ensemble": 1}
    else:
        cfg.update({k: {**cfg[k], **v} if k in ("selection", "explore") else v
                    for k, v in change.items()})
    code = cli(["learn", write_config(tmp_path, cfg)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # no work started


def test_the_example_config_loads():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from mlpot.learn import load_learn_config

    cfg = load_learn_config(os.path.join(root, "examples", "learn_config.yaml"))
    assert cfg.selection.lower == 0.05 and cfg.selection.upper == 0.15
    assert cfg.labeller.kind == "ase" and cfg.stop.max_iterations >= 1


def test_replicas_past_the_upper_level_are_held_and_count_as_failed(inputs, tmp_path):
    """Trust levels inside the tiny committee's range (max_force_dev ~ 2e-4 .. 3e-3 eV/A here):
    a replica that passes the upper level is stopped by integrators' UncertaintyStop (its
    structure in uncertain.xyz) and counts as one failed frame; no collected frame is above it."""
    run = tmp_path / "run"
    cfg = config(inputs, run, selection={"lower": 5e-4, "upper": 1e-3, "max_labels": 2},
                 explore={"replicas": 2}, stop={"max_iterations": 1})
    state = learn(learn_config_from_dict(cfg), log=lambda *a: None)
    it = run / "iter_000"
    crossed = read(str(it / "uncertain.xyz"), index=":")
    explored = read(str(it / "explored.xyz"), index=":")
    assert 0 < len(crossed) <= 4 and all(a.info["max_force_dev"] > 1e-3 for a in crossed)
    assert all(a.info["max_force_dev"] <= 1e-3 for a in explored)
    for a in crossed:  # no frame of a stopped replica after its stop
        assert all(b.info["step"] < a.info["step"] for b in explored
                   if b.info["replica"] == a.info["replica"])
    row = state["rows"][0]
    n = len(explored) + len(crossed)
    assert row["frames"] == n and row["failed"] == pytest.approx(len(crossed) / n)
    devs = np.array([a.info["max_force_dev"] for a in explored])
    assert row["accurate"] == pytest.approx((devs < 5e-4).sum() / n)
    assert row["candidate"] == pytest.approx(((devs >= 5e-4) & (devs < 1e-3)).sum() / n)
    # the selected frames are candidates
    for a in read(str(it / "selected.xyz"), index=":"):
        assert 5e-4 <= a.info["max_force_dev"] < 1e-3


def test_a_kill_inside_the_training_restarts_it_cleanly(loop, inputs, tmp_path):
    """Killed by the trainer's own hook right after the first best.pt of iteration 0 (no
    last.pt yet): the same command trains that iteration again and ends with the same data set
    as an uninterrupted run."""
    ref, _ = loop
    run = tmp_path / "run"
    path = write_config(tmp_path, config(inputs, run))
    killed = _learn_in_subprocess(path, kill_at="between-best-and-last")
    assert killed.returncode == 137, killed.stderr
    train = run / "iter_000" / "train"
    assert (train / "best.pt").exists() and not (train / "last.pt").exists()
    assert not (run / "state.json").exists()
    done = _learn_in_subprocess(path)
    assert done.returncode == 0, done.stderr
    for i in (0, 1):
        for a, b in zip(labelled(run, i), labelled(ref, i), strict=True):
            np.testing.assert_array_equal(a.positions, b.positions)
            assert a.info["REF_energy"] == b.info["REF_energy"]


def test_random_strategy_picks_unlabelled_pool_frames_reproducibly_from_its_seed(inputs,
                                                                                 tmp_path):
    """selection.strategy: random (the label-efficiency baseline): each iteration picks
    max_labels frames of the pool, never one chosen before, the same for the same seed; the
    pool is not scored."""
    def run(name, seed):
        cfg = config(inputs, tmp_path / name,
                     labeller={"kind": "pool", "pool": str(inputs / "pool.xyz")},
                     explore={"structures": []},
                     selection={"strategy": "random", "seed": seed, "max_labels": 3},
                     stop={"max_iterations": 3})
        state = learn(learn_config_from_dict(cfg), log=lambda *a: None)
        picks = [[a.info["pool_index"] for a in
                  read(str(tmp_path / name / f"iter_{i:03d}" / "selected.xyz"), index=":")]
                 for i in range(3)]
        return state, picks

    state, picks = run("a", 1)
    assert [len(p) for p in picks] == [3, 3, 3]
    flat = [k for p in picks for k in p]
    assert len(set(flat)) == 9 and sorted(state["pool_chosen"]) == sorted(flat)
    explored = read(str(tmp_path / "a" / "iter_002" / "explored.xyz"), index=":")
    assert sorted(a.info["pool_index"] for a in explored) == sorted(set(range(10)) - set(
        picks[0] + picks[1]))
    assert all("max_force_dev" not in a.info for a in explored)  # not scored
    assert state["rows"][0]["accurate"] is None and state["rows"][0]["frames"] == 10
    pool = read(str(inputs / "pool.xyz"), index=":")
    for k, a in zip(picks[2], labelled(tmp_path / "a", 2)):  # labels from the pool
        assert a.info["REF_energy"] == pytest.approx(pool[k].info["REF_energy"], abs=1e-9)
    _, same = run("b", 1)
    _, other = run("c", 2)
    assert same == picks and other != picks


def test_selection_strategy_is_checked(inputs, tmp_path):
    cfg = config(inputs, tmp_path / "run", selection={"strategy": "randomly"})
    with pytest.raises(ConfigError, match="selection.strategy = 'randomly' is not one of "
                                          r"\['committee', 'random'\]. Did you mean 'random'"):
        learn_config_from_dict(cfg)


def test_a_loop_that_adds_no_labels_warns_why_and_stops(inputs, tmp_path):
    """Trust levels far above the tiny committee's deviations (~1e-3 eV/A): every explored
    frame is 'accurate', none is a candidate, stop.accurate_fraction is out of reach. Each
    iteration warns with the reason and the deviations seen; two such iterations in a row stop
    the loop (stop.stalled_iterations) long before stop.max_iterations."""
    from mlpot.learn import LoopStallWarning

    run = tmp_path / "run"
    cfg = config(inputs, run, selection={"lower": 5.0, "upper": 10.0, "max_labels": 2},
                 stop={"max_iterations": 6, "accurate_fraction": None})
    with pytest.warns(LoopStallWarning) as caught:
        state = learn(learn_config_from_dict(cfg), log=lambda *a: None)
    assert len(state["rows"]) == 2 and state["stopped"].startswith("stalled: 2 iteration")
    messages = [str(w.message) for w in caught if w.category is LoopStallWarning]
    assert len(messages) == 2
    assert "iteration 0 added no labels" in messages[0]
    assert "100.0 % accurate" in messages[0] and "lower selection.lower" in messages[0]
    assert "max_force_dev of the collected frames: median" in messages[0]
    # far below the deviations: everything failed, the other advice
    cfg = config(inputs, tmp_path / "run2", selection={"lower": 1e-9, "upper": 2e-9},
                 stop={"max_iterations": 1})
    with pytest.warns(LoopStallWarning, match="doubts nearly every explored frame"):
        learn(learn_config_from_dict(cfg), log=lambda *a: None)


def test_candidates_per_label_picks_among_the_most_doubted(inputs, tmp_path):
    """selection.candidates_per_label: FPS over the c x max_labels candidates of largest
    max_force_dev only; c = 1 takes exactly the most doubted frames, c = 2 picks 3 of the 6
    most doubted, starting from the most doubted."""
    for c in (1, 2):
        run = tmp_path / f"c{c}"
        cfg = config(inputs, run, labeller={"kind": "pool", "pool": str(inputs / "pool.xyz")},
                     explore={"structures": []},
                     selection={"lower": 1e-5, "upper": 1.0, "max_labels": 3,
                                "candidates_per_label": c}, stop={"max_iterations": 1})
        learn(learn_config_from_dict(cfg), log=lambda *a: None)
        explored = read(str(run / "iter_000" / "explored.xyz"), index=":")
        ranked = [a.info["pool_index"] for a in
                  sorted(explored, key=lambda a: -a.info["max_force_dev"])]
        picked = [a.info["pool_index"] for a in read(str(run / "iter_000" / "selected.xyz"),
                                                     index=":")]
        assert len(picked) == 3 and picked[0] == ranked[0]
        assert set(picked) <= set(ranked[:3 * c])
        if c == 1:
            assert set(picked) == set(ranked[:3])


def test_kmeans_diversity_in_the_loop(inputs, tmp_path):
    """selection.diversity: kmeans picks, among the c x max_labels most doubted frames, the
    frames weighted_kmeans_pick chooses on their descriptors weighted by max_force_dev."""
    from mlpot.learn import structure_descriptor as desc

    run = tmp_path / "run"
    cfg = config(inputs, run, labeller={"kind": "pool", "pool": str(inputs / "pool.xyz")},
                 explore={"structures": []},
                 selection={"lower": 1e-5, "upper": 1.0, "max_labels": 3, "seed": 4,
                            "candidates_per_label": 2, "diversity": "kmeans"},
                 stop={"max_iterations": 1})
    learn(learn_config_from_dict(cfg), log=lambda *a: None)
    explored = read(str(run / "iter_000" / "explored.xyz"), index=":")
    order = np.argsort([-a.info["max_force_dev"] for a in explored], kind="stable")
    cand = np.sort(order[:6])
    x = np.stack([desc(explored[k], 3.6) for k in cand])
    w = np.array([explored[k].info["max_force_dev"] for k in cand])
    expect = [explored[cand[r]].info["pool_index"]
              for r in weighted_kmeans_pick(x, w, 3, seed=[4, 0])]
    picked = [a.info["pool_index"] for a in read(str(run / "iter_000" / "selected.xyz"),
                                                 index=":")]
    assert picked == expect and len(set(picked)) == 3


def _explored_with_relative_checked(run, level, frames, rel=1e-6):
    """The frames of iteration 0's explored.xyz, after checking that ``frames`` (a slice) of
    them carry the committee's relative force deviation at ``level``, recomputed here with
    the ASE calculator on the stored structure."""
    from mlpot.ase import MLPotCalculator
    from mlpot.export import load
    from mlpot.uncertainty import relative_max_force_dev

    explored = read(str(run / "iter_000" / "explored.xyz"), index=":")
    calc = MLPotCalculator(load(str(run / "iter_000" / "model.pt")), min_distance=None)
    for a in explored[frames]:
        b = a.copy()
        b.calc = calc
        f = b.get_forces()
        assert a.info["relative_max_force_dev"] == pytest.approx(
            relative_max_force_dev(calc.results["forces_dev"], f, level), rel=rel)
    return explored


def test_relative_rank_in_the_loop(inputs, tmp_path):
    """selection.rank: relative stores each pool frame's relative force deviation (DeePMD-kit's,
    at selection.relative_level, from the committee's forces) and takes the most doubted frames
    by it, not by the raw max_force_dev."""
    run = tmp_path / "run"
    cfg = config(inputs, run, labeller={"kind": "pool", "pool": str(inputs / "pool.xyz")},
                 explore={"structures": []},
                 selection={"lower": 1e-5, "upper": 1.0, "max_labels": 3,
                            "candidates_per_label": 1, "rank": "relative",
                            "relative_level": 1e-4},
                 stop={"max_iterations": 1})
    learn(learn_config_from_dict(cfg), log=lambda *a: None)
    explored = _explored_with_relative_checked(run, 1e-4, slice(0, 3))
    rel = np.array([a.info["relative_max_force_dev"] for a in explored])
    raw = np.array([a.info["max_force_dev"] for a in explored])
    by_rel = {explored[k].info["pool_index"] for k in np.argsort(-rel, kind="stable")[:3]}
    by_raw = {explored[k].info["pool_index"] for k in np.argsort(-raw, kind="stable")[:3]}
    picked = {a.info["pool_index"] for a in read(str(run / "iter_000" / "selected.xyz"),
                                                 index=":")}
    # at this small level the atoms of small force weigh most: the two orders differ here
    assert picked == by_rel and by_rel != by_raw


def test_relative_rank_in_md_exploration(inputs, tmp_path):
    """In MD exploration too, each collected frame carries the committee's relative force
    deviation (recomputed here with the ASE calculator on the stored structure), and with one
    candidate per label the frames of largest relative deviation are the ones selected."""
    run = tmp_path / "run"
    cfg = config(inputs, run, selection={"lower": 1e-5, "upper": 1.0, "max_labels": 2,
                                         "candidates_per_label": 1, "rank": "relative",
                                         "relative_level": 1e-4},
                 stop={"max_iterations": 1})
    learn(learn_config_from_dict(cfg), log=lambda *a: None)
    explored = _explored_with_relative_checked(run, 1e-4, slice(None, None, 3), rel=1e-4)
    rel = np.array([a.info["relative_max_force_dev"] for a in explored])
    top = {(explored[k].info["replica"], explored[k].info["step"])
           for k in np.argsort(-rel, kind="stable")[:2]}
    picked = {(a.info["replica"], a.info["step"])
              for a in read(str(run / "iter_000" / "selected.xyz"), index=":")}
    assert picked == top


def test_labelled_diversity_and_a_run_from_before_the_newer_settings(inputs, tmp_path):
    """selection.diversity: labelled picks, in each iteration, the candidates farthest from the
    data trained on (initial frames and earlier labels); and a loop begun before a setting
    existed (its state.json lacks the key) resumes when the config leaves it at its default."""
    from mlpot.learn import structure_descriptor as desc

    run = tmp_path / "run"
    cfg = config(inputs, run, labeller={"kind": "pool", "pool": str(inputs / "pool.xyz")},
                 explore={"structures": []},
                 selection={"lower": 1e-5, "upper": 1.0, "max_labels": 3,
                            "diversity": "labelled"}, stop={"max_iterations": 1})
    learn(learn_config_from_dict(cfg), log=lambda *a: None)
    explored = read(str(run / "iter_000" / "explored.xyz"), index=":")
    picked = [a.info["pool_index"] for a in read(str(run / "iter_000" / "selected.xyz"),
                                                 index=":")]
    x = {a.info["pool_index"]: desc(a, 3.6) for a in explored}
    labelled_x = [desc(a, 3.6) for a in read(str(inputs / "init.xyz"), index=":")]
    gap = {k: min(np.linalg.norm(v - c) for c in labelled_x) for k, v in x.items()}
    assert picked[0] == max(gap, key=gap.get)  # the frame least like the training data
    # a state written before selection.diversity and candidates_per_label existed
    state_path = run / "state.json"
    state = json.loads(state_path.read_text())
    for key in ("diversity", "candidates_per_label"):
        state["config"]["selection"].pop(key)
    state_path.write_text(json.dumps(state))
    cfg["selection"] = {k: v for k, v in cfg["selection"].items() if k != "diversity"}
    cfg["stop"] = {"max_iterations": 2}
    state = learn(learn_config_from_dict(cfg), log=lambda *a: None)
    assert len(state["rows"]) == 2
