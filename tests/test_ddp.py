"""Data-parallel training under torchrun (gloo on the CPU): 2 processes give the parameters and
validation metrics of 1 process with the same global batch, for every model family and for
committees and the variance network; kill -9 of one rank, then --resume, ends with the parameters
of an uninterrupted run; a 2-process checkpoint resumes on 1 process. See
mlpot/train/distributed.py."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from _fitting import labelled_cu_cells, write_frames
from mlpot.checkpoint import read_checkpoint
from mlpot.cli import main as cli
from mlpot.models import network_class
from mlpot.train.distributed import ShardedBatches

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    # 12 frames, a third for validation: 8 training frames, i.e. 2 global batches of 4
    return write_frames(tmp_path_factory, labelled_cu_cells(12, seed=100, stress=True))


def write_config(path, data_file, out_dir, family="dp_se_e2_a", batch_size=2, epochs=2,
                 model=None, training=None):
    cfg = {"data": {"train": data_file, "validation_fraction": 0.3334},
           "model": {"name": family, "cutoff": 4.0, "dtype": "float64",
                     "hparams": dict(network_class(family).TEST_HPARAMS), **(model or {})},
           "loss": {"energy": 1.0, "forces": 10.0, "stress": 1.0},
           "optim": {"lr": 5e-3},
           "training": {"batch_size": batch_size, "max_epochs": epochs, "out_dir": str(out_dir),
                        "progress": False, "seed": 5, **(training or {})}}
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def mlpot_cmd(config, nproc=1, *extra):
    if nproc == 1:
        return [sys.executable, "-m", "mlpot", "train", str(config), *extra]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "mlpot", "train", str(config), *extra]


def run(cmd, cwd, **env_extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def max_param_diff(a, b):
    wa, wb = a["model"], b["model"]
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa if wa[k].is_floating_point())


def log_rows(out):
    return list(csv.DictReader(open(os.path.join(out, "log.csv"))))


def test_shards_are_disjoint_and_cover_the_global_batches():
    frames = list(range(100, 111))  # 11 frames, 2 per process, 3 processes: global batch 6
    g = [torch.Generator().manual_seed(3) for _ in range(4)]
    shards = [list(ShardedBatches(frames, 2, 3, r, g[r])) for r in range(3)]
    single = list(ShardedBatches(frames, 6, 1, 0, g[3]))  # one process, the global batch
    assert len(single) == 2 and all(len(s) == 2 for s in shards)
    for i, batch in enumerate(single):
        assert sum((s[i] for s in shards), []) == batch  # rank r: the r-th part, in order
    # the last global batch (5 frames) is split 2/2/1; one of 2 frames for 3 processes is dropped
    assert [len(s[1]) for s in shards] == [2, 2, 1]
    assert ShardedBatches(list(range(8)), 2, 3, 0).global_batches() == 1
    # every process knows each step's global batch: its own part and the whole, in order
    g = [torch.Generator().manual_seed(3) for _ in range(3)]
    steps = [list(ShardedBatches(frames, 2, 3, r, g[r]).with_global()) for r in range(3)]
    for r in range(3):
        assert [part for part, _ in steps[r]] == shards[r]
        assert [whole for _, whole in steps[r]] == single


def double_cell(atoms):
    """The cell repeated twice along c, with its labels (energy x 2, forces and stress as they
    are)."""
    big = atoms.repeat((1, 1, 2))
    big.info = dict(atoms.info, REF_energy=2 * atoms.info["REF_energy"])
    big.arrays["REF_forces"] = np.concatenate([atoms.arrays["REF_forces"]] * 2)
    return big


def test_global_counts_are_the_sum_of_every_process_batch_counts(tmp_path_factory, tmp_path):
    """The loss's denominators (label counts of the global batch) come from each process's own
    table, not from a collective: they must equal the sum of the processes' batch counts (frames
    of two sizes: the force counts differ from batch to batch)."""
    from mlpot.data import AtomicData
    from mlpot.train.config import load_config
    from mlpot.train.loss import entry_counts
    from mlpot.train.trainer import Trainer

    frames = labelled_cu_cells(10, seed=7, stress=True)
    for k, atoms in enumerate(frames):
        if k % 3 != 1:  # 8 atoms (a copy of the 4-atom cell's labels, consistent)
            frames[k] = double_cell(atoms)
    data = write_frames(tmp_path_factory, frames)
    trainer = Trainer(load_config(write_config(tmp_path / "c.yaml", data, tmp_path / "o")))
    sizes = {len(s.positions) for s in trainer.train_set.items}
    assert len(sizes) > 1
    n = len(trainer.train_set)
    world = 3
    parts = [ShardedBatches(range(n), 2, world, r, torch.Generator().manual_seed(1))
             for r in range(world)]
    for step in zip(*(p.with_global() for p in parts)):
        whole = step[0][1]
        summed = sum(entry_counts(AtomicData.collate([trainer.train_set[i] for i in part]))
                     for part, _ in step)
        assert torch.equal(trainer.global_counts(whole), summed)


# every family: the committee's members are Deep Potentials, the variance network's mean model
# an EGNN (its variance network a small Deep Potential); gradients averaged through shared memory
# (the default on one host: the committee's two members share it) and by gloo's all-reduce
@pytest.mark.parametrize("family,model,training,allreduce", [
    ("dp_se_e2_a", None, {"ensemble": 2, "bootstrap": True}, "auto"),
    ("egnn", {"uncertainty": "mve"}, None, "auto"),
    # 3 layers with both parities: before the layers were trimmed, the middle layer's 1e and 2o
    # weights got no gradient and DDP stopped at the second step
    ("nequip", {"hparams": {"num_features": 4, "l_max": 2, "num_layers": 3}}, None, "auto"),
    ("dp_se_e2_a", None, None, "gloo"),
], ids=["dp-committee", "egnn-mve", "nequip-3layers", "dp-gloo-allreduce"])
def test_two_processes_equal_one_with_the_global_batch(data_file, tmp_path, family, model,
                                                      training, allreduce):
    from mlpot.train.distributed import ALLREDUCE

    two = write_config(tmp_path / "two.yaml", data_file, tmp_path / "two", family, 2,
                       model=model, training=training)
    one = write_config(tmp_path / "one.yaml", data_file, tmp_path / "one", family, 4,
                       model=model, training=training)
    r = run(mlpot_cmd(two, 2), tmp_path, **{ALLREDUCE: allreduce})
    assert "2 processes (gloo), training.batch_size 2 per process, global batch 4" in r.stdout
    # auto: shared memory where this host has a writable /dev/shm, else gloo's all-reduce
    shared = allreduce == "auto" and os.access("/dev/shm", os.W_OK)
    how = "shared memory" if shared else "gloo's all-reduce"
    assert f"gradients averaged through {how}" in r.stdout
    assert r.stdout.count("validation:") == 1  # rank 0 alone reports
    assert cli(["train", one]) == 0  # in this process (no torchrun: a single process)
    a = read_checkpoint(str(tmp_path / "one" / "last.pt"))
    b = read_checkpoint(str(tmp_path / "two" / "last.pt"))
    assert a["step"] == b["step"] == 4
    assert max_param_diff(a, b) < 1e-10
    assert max_param_diff(read_checkpoint(str(tmp_path / "one" / "best.pt")),
                          read_checkpoint(str(tmp_path / "two" / "best.pt"))) < 1e-10
    for ra, rb in zip(log_rows(tmp_path / "one"), log_rows(tmp_path / "two")):
        for key in ("val_loss", "val_forces_rmse_meV_per_A", "train_loss"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=1e-9), key
    m1 = json.load(open(tmp_path / "one" / "metrics.json"))
    m2 = json.load(open(tmp_path / "two" / "metrics.json"))
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert m2["validation"]["forces_rmse_meV_per_A"] == \
        pytest.approx(m1["validation"]["forces_rmse_meV_per_A"], rel=1e-9)


def _rank_pid(parent: int, rank: int):
    """The pid of the torchrun worker with RANK=rank under ``parent`` (None while not started)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(name)
    return None


def test_kill_one_rank_then_resume_loses_nothing(data_file, tmp_path):
    epochs = 12
    cfg = write_config(tmp_path / "c.yaml", data_file, tmp_path / "run", epochs=epochs)
    ref = write_config(tmp_path / "r.yaml", data_file, tmp_path / "ref", epochs=epochs)
    run(mlpot_cmd(ref, 2), tmp_path)  # uninterrupted

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(mlpot_cmd(cfg, 2), cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "run" / "log.csv"
    deadline = time.time() + 300
    killed = None
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log_rows(tmp_path / "run")) >= 2:
            killed = _rank_pid(proc.pid, 1)
            if killed:
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.02)
    assert killed, "the run ended before rank 1 could be killed: raise epochs"
    assert proc.wait(timeout=120) != 0  # torchrun ends the other rank and fails
    held = read_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert 2 <= held["epoch"] < epochs

    run(mlpot_cmd(cfg, 2, "--resume"), tmp_path)
    done = read_checkpoint(str(tmp_path / "run" / "last.pt"))
    full = read_checkpoint(str(tmp_path / "ref" / "last.pt"))
    assert done["epoch"] == full["epoch"] == epochs
    for k, v in full["model"].items():  # same N: bit-identical
        assert torch.equal(v, done["model"][k]), k
    assert [int(r["epoch"]) for r in log_rows(tmp_path / "run")] == list(range(1, epochs + 1))

    # another number of processes continues from the same checkpoint (not bit-identical)
    more = write_config(tmp_path / "m.yaml", data_file, tmp_path / "run", epochs=epochs + 2)
    run(mlpot_cmd(more, 1, "--resume"), tmp_path)
    rows = log_rows(tmp_path / "run")
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 3))
    assert int(rows[-1]["step"]) == int(rows[-3]["step"]) + 2 * 4  # 1 process: 4 steps of 2
    assert json.load(open(tmp_path / "run" / "metrics.json"))["world_size"] == 1


def test_benchmark_switch_keeps_gradients_local(data_file, tmp_path):
    """ddp_bench's diagnostic setting (MLPOT_BENCH_NO_GRADIENT_SYNC=1) really drops the gradient
    all-reduce, says so, and nothing else changes: without it the same run equals 1 process."""
    from mlpot.train.distributed import NO_GRADIENT_SYNC

    two = write_config(tmp_path / "two.yaml", data_file, tmp_path / "two", batch_size=2, epochs=1)
    one = write_config(tmp_path / "one.yaml", data_file, tmp_path / "one", batch_size=4, epochs=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", NO_GRADIENT_SYNC: "1"}
    r = subprocess.run(mlpot_cmd(two, 2), cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "gradients are not averaged over processes" in r.stderr
    assert cli(["train", one]) == 0
    a = read_checkpoint(str(tmp_path / "one" / "last.pt"))
    b = read_checkpoint(str(tmp_path / "two" / "last.pt"))
    assert a["step"] == b["step"] == 2
    assert max_param_diff(a, b) > 1e-6  # rank 0's weights followed its own half-batches


AVERAGE_STEPS = [[(4096, "float64")], [(1000, "float32"), (7, "float64"), (5, "float32")],
                 [(7, "float64")], [(2000, "float32"), (2000, "float64")], [(4096, "float64")]]
SHARED_AVERAGE_SCRIPT = f"STEPS = {AVERAGE_STEPS!r}\n" + """
import json, os, sys
import torch
import torch.distributed as dist
from mlpot.train.distributed import SharedMemoryAverage

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
avg = SharedMemoryAverage.create(4096 * 8, world, rank)
left = sorted(f for f in os.listdir("/dev/shm") if f.startswith("mlpot-ddp-"))
out = {"left": left, "calls": []}
# steps of one or several buckets of several sizes and dtypes: both slot sets used and reused
for step in STEPS:
    mine = torch.Generator().manual_seed(100 * len(out["calls"]) + rank)
    xs = [torch.randn(n, generator=mine, dtype=getattr(torch, t)) for n, t in step]
    out["calls"].append([x.tolist() for x in avg.average(xs)])
try:
    avg.average([torch.zeros(4096, dtype=torch.float64), torch.zeros(1)])
except RuntimeError as e:
    out["too_large"] = str(e)
# no shared memory where rank 0 cannot make the file: None on every process (gloo then)
out["fallback"] = SharedMemoryAverage.create(64, world, rank, sys.argv[1] + "/missing") is None
json.dump(out, open(sys.argv[1] + f"/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


@pytest.mark.skipif(not os.access("/dev/shm", os.W_OK), reason="needs a writable /dev/shm")
def test_shared_memory_average_is_the_mean_on_every_process(tmp_path):
    """Three processes: every bucket of a step (two dtypes, several sizes and counts, both slot
    sets reused) comes back as the mean over the processes, the same floats on each; the file is
    gone from /dev/shm once mapped; a bucket larger than the slot is an error, not a silent
    overflow; where rank 0 cannot make the file, every process gets None (gloo's all-reduce)."""
    script = tmp_path / "average.py"
    script.write_text(SHARED_AVERAGE_SCRIPT)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
         str(script), str(tmp_path)], tmp_path)
    outs = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(3)]
    for call, step in enumerate(AVERAGE_STEPS):
        gens = [torch.Generator().manual_seed(100 * call + r) for r in range(3)]
        for k, (n, t) in enumerate(step):
            dtype = getattr(torch, t)
            inputs = [torch.randn(n, generator=g, dtype=dtype) for g in gens]
            expected = (inputs[0] + inputs[1] + inputs[2]) / 3
            got = [torch.tensor(o["calls"][call][k], dtype=dtype) for o in outs]
            assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])
            assert torch.allclose(got[0], expected, rtol=0,
                                  atol=1e-6 if dtype == torch.float32 else 1e-14)
    assert all(o["left"] == [] for o in outs)  # unlinked once every process had mapped it
    assert all("larger than the shared-memory slot" in o["too_large"] for o in outs)
    assert all(o["fallback"] for o in outs)


def test_an_unknown_allreduce_setting_is_a_clear_error(monkeypatch):
    from mlpot.errors import EXIT_BAD_INPUT, exit_code_of
    from mlpot.train.distributed import ALLREDUCE, Distributed

    monkeypatch.setenv(ALLREDUCE, "mpi")
    with pytest.raises(Exception, match="use auto, shm or gloo") as err:
        Distributed(2, 0, 0, "gloo").shared_memory_average(torch.nn.Linear(2, 2))
    assert exit_code_of(err.value) == EXIT_BAD_INPUT  # bad input (exit 2), not "a bug in mlpot"
