"""The repository itself: no machine paths in what git tracks, and benchmark scripts that start
from a clean clone (without the shared folder beside it)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Absolute paths of one machine. Spelled in pieces, so that this file does not match itself; a
# folder name preceded by a path character (a relative path, or a URL's path) is not a match.
_NOT_AFTER = r"(?<![\w.~/-])"
MACHINE_PATH = re.compile(_NOT_AFTER + "/(?:" + "|".join([
    "wo" + r"rk/", "ro" + r"ot/", "ho" + r"me/[A-Za-z_][\w.-]*", "tm" + r"p/bash_jobs"]) + ")")


def tracked_files() -> list[Path]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [REPO / name for name in out.stdout.decode().split("\0") if name]


def test_machine_path_pattern():
    """The pattern catches what it is meant to and leaves relative paths and URLs alone."""
    hits = ["/" + "work/shared/bench", "x /" + "root/.cache/mlpot", '"/' + 'home/alice/data"',
            "/" + "tmp/bash_jobs.0/job"]
    misses = ["../shared/bench", "~/" + "work/x", "https://example.org/" + "home/page",
              "/tmp/peers/bin/python", "/" + "home/", "benchmarks/" + "work/x"]
    assert all(MACHINE_PATH.search(s) for s in hits)
    assert not any(MACHINE_PATH.search(s) for s in misses)


def test_no_machine_paths_in_tracked_files():
    found = []
    for path in tracked_files():
        if not path.is_file():  # deleted in the working tree, not yet committed
            continue
        data = path.read_bytes()
        if b"\0" in data:  # binary
            continue
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            match = MACHINE_PATH.search(line)
            if match:
                found.append(f"{path.relative_to(REPO)}:{number}: {match.group(0)}")
    assert not found, ("machine paths in tracked files (use paths relative to the repository, "
                       "or options such as --shared):\n" + "\n".join(found))


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_benchmark_results_hold_no_absolute_paths():
    results = [p for p in tracked_files()
               if p.parent == REPO / "benchmarks" / "results" and p.suffix == ".json"
               and p.is_file()]
    found = []
    for path in results:
        for text in _strings(json.loads(path.read_text())):
            for word in re.split(r"[\s=]+", text):
                if word.startswith("/"):
                    found.append(f"{path.name}: {word}")
    assert not found, "absolute paths in benchmark results:\n" + "\n".join(found)


def _clean_clone(tmp_path: Path) -> Path:
    """The benchmark scripts in a repository folder with no shared folder beside it."""
    clone = tmp_path / "repo"
    (clone / "benchmarks").mkdir(parents=True)
    for script in (REPO / "benchmarks").glob("*.py"):
        shutil.copy(script, clone / "benchmarks" / script.name)
    return clone


def _env() -> dict:
    # mlpot and integrators from this checkout, whether or not it is installed
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


def test_every_benchmark_answers_help_without_the_shared_folder(tmp_path):
    clone = _clean_clone(tmp_path)
    scripts = sorted(p.name for p in (clone / "benchmarks").glob("*.py")
                     if not p.name.startswith("_"))
    assert len(scripts) >= 8
    runs = {name: subprocess.Popen([sys.executable, f"benchmarks/{name}", "--help"], cwd=clone,
                                   env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
            for name in scripts}  # side by side: most of the time is importing torch
    failed = []
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=180)
        if proc.returncode != 0 or "usage:" not in out:
            failed.append(f"{name}: exit {proc.returncode}\n{out[-500:]}{err[-1500:]}")
    assert not failed, "\n".join(failed)
    assert not (tmp_path / "shared").exists()


@pytest.mark.parametrize("command", [
    ["train_bench.py", "3bpa", "egnn", "--work", "{tmp}/runs"],
    ["model_bench.py", "--quick", "--only", "dp_se_e2_a", "--json", "{tmp}/model.json"],
    ["peer_scaling.py"],
    ["uq_bench.py", "--work", "{tmp}/runs"],
    ["peer_train_bench.py", "3bpa", "--work", "{tmp}/runs"],
])
def test_a_missing_shared_folder_is_one_clear_line(tmp_path, command):
    """No shared folder beside the clone: exit 2 with one line naming --shared, nothing run."""
    clone = _clean_clone(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    proc = subprocess.run([sys.executable, f"benchmarks/{args[0]}", *args[1:]], cwd=clone,
                          env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--shared" in lines[0] and str(tmp_path / "shared") in lines[0], \
        proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "model.json").exists()
