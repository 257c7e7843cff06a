"""Helpers used by several benchmark scripts: where the shared folder and the peer venv are,
the water boxes the peers are timed on, timing under load, memory, machine facts, and JSON
results that hold no machine paths.

Only the standard library is imported here at module level, so that every script answers
``--help`` at once and without the shared folder; numpy, scipy, ase and torch are imported by
the functions that need them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the folder `shared` beside the repository (peer benchmarks, their data and training runs)
DEFAULT_SHARED = REPO.parent / "shared"
# where ``<shared>/bench/setup_venv.sh`` makes the peer venv when given no folder
DEFAULT_PEER_PYTHON = "/tmp/peers/bin/python"


# ------------------------------------------------------------------ where things are
def add_shared_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shared", type=Path, default=DEFAULT_SHARED, metavar="DIR",
        help="the shared folder with the peer benchmarks and data (default: `shared` beside "
             "the repository)")


def fail(message: str):
    """Stop with one line on stderr and exit code 2 (bad input: something is missing)."""
    print(f"{Path(sys.argv[0]).name}: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def shared_path(shared: Path, *parts: str, what: str) -> Path:
    """``shared/parts...``, or stop with one line that says what is missing and what to do."""
    path = Path(shared).joinpath(*parts)
    if not path.exists():
        fail(f"{what} not found: {path} does not exist; pass --shared DIR pointing at the shared "
             "folder (the one holding bench/ and data/)")
    return path


def add_peer_python_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--peer-python", default=os.environ.get("PEER_PY", DEFAULT_PEER_PYTHON), metavar="PATH",
        help="python of the peer venv (default: $PEER_PY, else %(default)s, where "
             "<shared>/bench/setup_venv.sh makes it)")


def peer_python(path: str, shared: Path) -> str:
    if not os.access(path, os.X_OK):
        fail(f"the peer venv's python {path} is missing; make the venv with "
             f"`bash {Path(shared) / 'bench' / 'setup_venv.sh'}` (about 3 minutes) or pass "
             "--peer-python")
    return path


def require_module(name: str, why: str):
    """Import a peer tool, or exit with one line that says how to get it."""
    try:
        return __import__(name, fromlist=["_"])
    except ImportError as err:
        fail(f"{name} is missing from {sys.executable} ({err}); {why}. Run this script with the "
             "peer venv's python (made by `bash ../shared/bench/setup_venv.sh`; then "
             "`pip install --no-deps -e . ninja` into it from the repository root)")


def use_interpreter_bin() -> None:
    """Put this interpreter's bin folder on PATH: torch's extension builder looks for ninja
    there, and a venv's python run by its full path does not put it there itself."""
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")


# ------------------------------------------------------------------ structures
def water_box(n: int, seed: int = 0):
    """n^3 water molecules at liquid density (periodic cubic box, 3.1 A between centres).

    The same structure as the peer benchmarks' ``water_box`` (same seed, same sequence of random
    numbers), so that mlpot and the peers are timed on identical atoms: centres on a cubic
    lattice jittered by up to 0.15 A, random rotations, and molecules with an atom closer than
    1.5 A to another molecule's atom rotated again until there is none. Contacts are found with
    scipy's periodic k-d tree here (the peers use vesin; the pairs are the same).
    """
    import numpy as np
    from ase import Atoms
    from ase.build import molecule
    from scipy.spatial import cKDTree
    from scipy.spatial.transform import Rotation

    spacing, min_dist = 3.1, 1.5
    rng = np.random.default_rng(seed)
    shape = molecule("H2O").positions
    shape = shape - shape[0]  # O at the origin
    axis = spacing * np.arange(n)
    centres = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    centres = centres + rng.uniform(-0.15, 0.15, size=centres.shape)
    n_mol = centres.shape[0]
    rotations = Rotation.random(n_mol, random_state=rng).as_matrix()
    length = spacing * n
    molecule_of = np.repeat(np.arange(n_mol), 3)

    def place():
        return (centres[:, None, :] + np.einsum("mij,aj->mai", rotations, shape)).reshape(-1, 3)

    for _ in range(200):
        positions = place()
        inside = np.mod(positions, length)
        inside[inside >= length] = 0.0  # -1e-17 mod L rounds to L, outside the tree's box
        tree = cKDTree(inside, boxsize=length)
        pairs = tree.query_pairs(min_dist, output_type="ndarray")
        a, b = molecule_of[pairs[:, 0]], molecule_of[pairs[:, 1]]
        clash = np.unique(np.concatenate([a[a != b], b[a != b]]))
        if clash.size == 0:
            break
        rotations[clash] = Rotation.random(clash.size, random_state=rng).as_matrix()
    else:
        raise RuntimeError(f"water_box({n}): close contacts left after 200 rounds of rotations")
    atoms = Atoms(["O", "H", "H"] * n_mol, positions=positions, cell=np.eye(3) * length,
                  pbc=True)
    atoms.wrap()
    return atoms


# ------------------------------------------------------------------ load and timing
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_jiffies() -> tuple[int, int]:
    """Machine-wide (busy, steal) clock ticks since boot, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq, steal


def other_load(seconds: float = 1.0) -> float:
    """Cores kept busy by other processes while this one sleeps for `seconds`."""
    busy0 = cpu_jiffies()[0]
    own0 = time.process_time()
    time.sleep(seconds)
    others = (cpu_jiffies()[0] - busy0) / TICK - (time.process_time() - own0)
    return max(0.0, others) / seconds


def wait_quiet(limit: float = 0.2, max_wait: float = 900.0, quiet_for: int = 3) -> float:
    """Wait until other processes keep fewer than `limit` cores busy for `quiet_for` seconds
    running (at most `max_wait` seconds); returns the seconds waited. On 2 shared cores one busy
    neighbour slows torch's threads several times over."""
    start, quiet, said = time.perf_counter(), 0, False
    while quiet < quiet_for and time.perf_counter() - start < max_wait:
        if other_load(1.0) < limit:
            quiet += 1
            continue
        quiet = 0
        if not said:
            print("waiting for other processes to go quiet ...", flush=True)
            said = True
        time.sleep(4.0)
    return time.perf_counter() - start


def timeit(fn, warmup: int = 2, repeat: int = 5, max_seconds: float | None = None) -> dict:
    """Call fn `warmup` times untimed, then time up to `repeat` calls (with `max_seconds`, stop
    once the timed calls add up to that, after at least 3).

    Returns median_s, min_s, n, cpu_ratio (this process's CPU time over wall time: 1 is one busy
    core), other_load (cores other processes kept busy meanwhile: above ~0.2 the timing was
    contended) and steal (cores the hypervisor took)."""
    for _ in range(warmup):
        fn()
    times, cpu = [], 0.0
    busy0, steal0 = cpu_jiffies()
    while len(times) < repeat:
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu += time.process_time() - c0
        if max_seconds is not None and len(times) >= 3 and sum(times) > max_seconds:
            break
    busy1, steal1 = cpu_jiffies()
    wall = sum(times)
    return {"median_s": statistics.median(times), "min_s": min(times), "n": len(times),
            "cpu_ratio": cpu / wall,
            "other_load": round(max(0.0, (busy1 - busy0) / TICK - cpu) / wall, 2),
            "steal": round((steal1 - steal0) / TICK / wall, 2)}


# ------------------------------------------------------------------ memory
def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    return -1.0


def peak_rss_mb() -> float:
    return _proc_status_mb("VmHWM")


def reset_peak_rss() -> bool:
    """Start the peak-RSS count afresh from the present RSS (Linux clear_refs, value 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "<unset>"),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "<unset>")}


# ------------------------------------------------------------------ results without machine paths
def portable(value, **roots):
    """`value` (a path, or a dict/list holding some) with each absolute path written relative
    to a named root, as ``<name>/rest`` (``portable(p, shared=args.shared)``), relative to the
    repository when under it, and as ``<elsewhere>/file name`` otherwise, so that committed
    results hold no machine paths."""
    if isinstance(value, dict):
        return {k: portable(v, **roots) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, **roots) for v in value]
    if not isinstance(value, (str, Path)):
        return value
    if not os.path.isabs(value):  # as given (relative to where the script ran)
        return value.as_posix() if isinstance(value, Path) else value
    path = Path(os.path.abspath(value))
    named = sorted(((n, Path(os.path.abspath(r))) for n, r in roots.items() if r),
                   key=lambda item: -len(item[1].parts))  # the innermost root first
    for name, root in named + [("", REPO)]:
        if path == root or root in path.parents:
            rel = path.relative_to(root).as_posix()
            return (f"<{name}>/{rel}" if rel != "." else f"<{name}>") if name else rel
    return f"<elsewhere>/{path.name}"


def command_line(**roots) -> str:
    """How this script was run, as ``python <script> <args>`` with portable paths."""
    def one(arg: str) -> str:
        if arg.startswith("-") and "=" in arg:  # --out=/some/path
            option, value = arg.split("=", 1)
            return f"{option}={portable(value, **roots)}"
        return str(portable(arg, **roots))

    return shlex.join(["python"] + [one(a) for a in sys.argv])


def write_json(path, obj) -> None:
    """Write obj as JSON through a temporary file, so a kill leaves the old file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def rmd17_split(shared: Path, molecule: str, pool: int = 800, seed: int = 0):
    """rMD17 split of the trust and distillation benchmarks: the 1,000 frames of
    ``<shared>/data/rmd17/<molecule>_train_01.xyz`` permuted with numpy's default_rng(seed); the
    first ``pool`` frames are the pool (training side), the rest (200) the test part, used for
    nothing else. Returns (path, pool indices, test indices) as sorted lists of frame numbers."""
    import numpy as np

    path = shared_path(shared, "data", "rmd17", f"{molecule}_train_01.xyz",
                       what=f"the rMD17 {molecule} file")
    order = np.random.default_rng(seed).permutation(1000)
    return path, sorted(int(i) for i in order[:pool]), sorted(int(i) for i in order[pool:])
