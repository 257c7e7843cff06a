"""``mlpot learn CONFIG.yaml``: the active-learning loop (query by committee).

Each iteration ``i`` (files under ``learn_dir/iter_{i:03d}/``):

1. **train** a committee (``training.ensemble`` >= 2) on the initial data plus every earlier
   iteration's ``labelled.xyz`` (``train/``: an ``mlpot train`` run), warm-started from
   iteration i-1's ``best.pt`` weights (its EMA weights are loaded into every member and the
   member's EMA before the first step; the optimizer starts afresh; ``warm_start: false``
   starts from a fresh initialisation; a committee that does not fit, e.g. after a change of
   the type map, is a warning and a fresh start), then exported to ``model.pt``;
2. **explore** with MD through ``integrators`` (``explore``): for each starting structure (and,
   for periodic cells with ``explore.pressures``, each pressure) one batched run of
   ``replicas`` replicas per temperature, with the default health check and the uncertainty
   stop (``integrators.health.UncertaintyStop``) at the upper trust level: a replica whose raw
   ``max_force_dev`` passes it is held there and its structure saved (``uncertain.xyz``). Every
   ``collect_every`` steps each running replica's frame is collected with its raw
   ``max_force_dev`` (``explored.xyz``). Classes (DP-GEN's, raw deviations, eV/A):
   accurate ``dev < lower``, candidate ``lower <= dev < upper``, failed ``dev >= upper``; each
   replica stopped by the uncertainty stop (or lost to another health rule) counts as one
   failed frame. The fractions are over all collected frames plus these;
3. **select** at most ``selection.max_labels`` candidates, thinned for diversity by farthest
   point sampling (FPS) on a per-structure descriptor (``structure_descriptor``), starting from
   the candidate of largest deviation (``selected.xyz``); with
   ``selection.candidates_per_label: c`` FPS runs over the c x max_labels candidates of
   largest deviation only (the most doubted, thinned for diversity: c = 1 takes the most
   doubted frames as they are); ``selection.diversity: labelled`` counts FPS distances to the
   data trained on (initial data and earlier labels) too, each pick the candidate farthest
   from all of it (greedy k-centre); ``selection.diversity: kmeans`` replaces FPS by a k-means
   clustering of the candidates' descriptors, each weighted by its ``max_force_dev``, and takes
   the candidate nearest each centre (``weighted_kmeans_pick``: typical frames of the doubted
   regions rather than outliers; reproducible from ``selection.seed`` and the iteration);
   ``selection.rank: relative`` orders the candidates (the most doubted, FPS's first pick, the
   k-means weights) by DeePMD-kit's relative force deviation, max_i forces_dev_i / (|F_i| +
   ``selection.relative_level``), stored as ``relative_max_force_dev`` in ``explored.xyz``,
   instead of the raw one, which favours structures with large forces; the trust levels stay
   raw;
   ``selection.strategy: random`` (the
   baseline of label-efficiency benchmarks) instead picks them uniformly at random among the
   same candidates, without FPS, reproducibly from ``selection.seed`` and the iteration
   (numpy's ``default_rng([seed, i])``); in pool mode it picks among all unchosen pool frames
   and the pool is not scored (random picks need no scores; the table's fractions stay empty);
4. **label** them with ``mlpot.label.label_file`` (``labelled.xyz``; its progress file makes
   the labelling resumable frame by frame) and add them to the data set.

``labeller: {kind: pool, pool: FILE}`` skips the MD (for benchmarks): the committee scores
every frame of the labelled pool not chosen before (its raw ``max_force_dev``: query by
committee), the FPS selection picks among the candidates (the whole unchosen pool when
``selection.pool_all_candidates``, the default: in a pool every frame may be labelled), and
the chosen frames take their labels from the file: nothing is recomputed.

Stopping rules, checked after each iteration: the fraction of explored frames below the lower
level >= ``stop.accurate_fraction``; ``stop.max_iterations``; ``stop.max_wall_hours`` (wall time
of the loop, summed over resumed runs); ``stop.max_labels`` (labels added by the loop);
``stop.stalled_iterations`` (default 2) iterations in a row that added no label. An iteration
that adds none warns (``LoopStallWarning``) with the reason: no explored frame
between the trust levels (with the deviations seen, and whether to move the levels or the
exploration), no frames explored, or every selected frame failed to label.

State: ``learn_dir/state.json`` (written atomically, ``mlpot.files.atomic_write``) records the
iteration and the last phase finished (``trained``, ``explored``, ``selected``, ``labelled``) and
the table, and the config (everything but ``stop``, which may change: a loop that stopped
goes on when the new stopping rules let it; any other change is an error). The same command
after a kill at any moment resumes: a finished phase is not redone;
a killed training continues from its ``last.pt`` (``--resume`` semantics, exact); a killed
exploration or selection is redone from its start (deterministic: seeds come from
``explore.seed`` and the iteration); a killed labelling keeps every finished label.

Outputs: the per-iteration table on screen and in ``learn_dir/learning.csv`` (iteration,
labels in the training set, labels added, fractions accurate/candidate/failed, the committee's
validation force and energy RMSE) and ``learn_dir/learning.png`` (validation force RMSE against
the number of labels). The validation split is ``training.data.validation_fraction`` of each
iteration's data set; a fixed ``training.data.validation`` file makes the column comparable
across iterations.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import numpy as np

from .files import atomic_write, resolve_path
from .train.config import ConfigError, _spec, dataclass_from_dict

PHASES = ("trained", "explored", "selected", "labelled")
# the extxyz info key of a frame's relative force deviation (``selection.rank: relative``)
RELATIVE_KEY = "relative_max_force_dev"
STATE_FORMAT = 1


class LearnConfigError(ConfigError):
    """Bad input to ``mlpot learn`` (exit code 2), found before any work starts."""


class LoopStallWarning(UserWarning):
    """An iteration of ``mlpot learn`` added no label (the message says why and what to
    change); ``stop.stalled_iterations`` such iterations in a row stop the loop."""


# --------------------------------------------------------------------------- config
@dataclass
class ExploreConfig:
    structures: Union[str, List[str]] = ""       # starting structures (any ASE format)
    temperatures: List[float] = field(default_factory=lambda: [300.0])  # K
    pressures: Optional[List[float]] = None      # bar; periodic cells only (NPT)
    steps: int = _spec(1000, ge=1)               # MD steps per run
    replicas: int = _spec(2, ge=1)               # replicas per temperature
    timestep: float = _spec(1.0, gt=0.0)         # fs
    ensemble: str = _spec("langevin", choices=["langevin", "npt"])
    friction: float = _spec(0.01, gt=0.0)        # 1/fs (Langevin)
    tau_t: float = _spec(100.0, gt=0.0)          # fs (NPT thermostat)
    tau_p: float = _spec(1000.0, gt=0.0)         # fs (NPT barostat)
    collect_every: int = _spec(10, ge=1)         # steps between collected frames
    seed: int = _spec(0, ge=0)
    device: str = "cpu"


@dataclass
class SelectionConfig:
    lower: float = _spec(0.05, gt=0.0)           # eV/A, raw max_force_dev (DP-GEN's common)
    upper: float = _spec(0.15, gt=0.0)           # eV/A
    max_labels: int = _spec(10, ge=1)            # new labels per iteration
    pool_all_candidates: bool = True             # pool mode: every unchosen frame may be picked
    # committee: before FPS, keep only this many candidates per label to pick, those of largest
    # max_force_dev (the most doubted, thinned for diversity); None: FPS over all candidates
    candidates_per_label: Optional[int] = _spec(None, ge=1)
    # committee: FPS distances to the batch's own picks ("batch", from the most doubted) or to
    # the labelled data as well ("labelled": each pick the candidate farthest from all of it);
    # "kmeans": no FPS, the candidate nearest each centre of a k-means clustering weighted by
    # max_force_dev (weighted_kmeans_pick)
    diversity: str = _spec("batch", choices=["batch", "labelled", "kmeans"])
    # committee: order the candidates (most doubted first, FPS's first pick, k-means weights)
    # by the raw max_force_dev ("absolute") or by DeePMD-kit's relative deviation
    # max_i forces_dev_i / (|F_i| + relative_level) ("relative"), which does not favour
    # structures with large forces; the trust levels stay on the raw max_force_dev
    rank: str = _spec("absolute", choices=["absolute", "relative"])
    relative_level: float = _spec(1.0, gt=0.0)   # eV/A (DeePMD-kit's `relative` level)
    # committee: FPS from the most doubted candidate; random: uniformly among the candidates
    strategy: str = _spec("committee", choices=["committee", "random"])
    seed: int = _spec(0, ge=0)                   # random: iteration i picks by (seed, i)


@dataclass
class LabellerConfig:
    kind: str = _spec("ase", choices=["ase", "pyscf", "model", "pool"])
    ase_calculator: Optional[str] = None         # module:Class
    calc_kwargs: Dict[str, Any] = field(default_factory=dict)
    method: str = "pbe"
    basis: str = "def2-svp"
    charge: int = 0
    spin: int = _spec(0, ge=0)
    max_cycle: int = _spec(100, ge=1)
    model: Optional[str] = None
    device: str = "cpu"
    workers: int = _spec(1, ge=1)
    pool: Optional[str] = None                   # pool mode: a labelled file


@dataclass
class StopConfig:
    accurate_fraction: Optional[float] = _spec(0.99, gt=0.0)  # <= 1
    max_iterations: int = _spec(10, ge=1)
    max_wall_hours: Optional[float] = _spec(None, gt=0.0)
    max_labels: Optional[int] = _spec(None, ge=1)
    # iterations in a row that added no label (the loop has stalled: the trust levels or the
    # exploration need a change, which the warning names); None: never stop for this
    stalled_iterations: Optional[int] = _spec(2, ge=1)


@dataclass
class LearnConfig:
    learn_dir: str = "mlpot-learn"
    data: Union[str, List[str]] = ""             # initial labelled data
    training: Dict[str, Any] = field(default_factory=dict)  # an `mlpot train` config
    warm_start: bool = True
    explore: ExploreConfig = field(default_factory=ExploreConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    labeller: LabellerConfig = field(default_factory=LabellerConfig)
    stop: StopConfig = field(default_factory=StopConfig)


_SECTIONS = {"explore": ExploreConfig, "selection": SelectionConfig,
             "labeller": LabellerConfig, "stop": StopConfig}


def _fill(cls, raw: Any, where: str):
    return dataclass_from_dict(cls, raw, where, LearnConfigError, _SECTIONS if cls is LearnConfig else None)


def _files(value) -> List[str]:
    return [value] if isinstance(value, str) else list(value or [])


def learn_config_from_dict(raw: Dict[str, Any], where: str = "config",
                           base_dir: str = ".") -> LearnConfig:
    """A checked LearnConfig (the checks that need no work: see ``check_inputs`` for those
    that read the structures and build the labeller). Relative paths are relative to
    ``base_dir`` (the config file's folder)."""
    if not isinstance(raw, dict):
        raise LearnConfigError(f"{where}: expected a mapping with keys learn_dir, data, "
                               "training, explore, selection, labeller, stop")
    cfg = _fill(LearnConfig, raw, where)

    def rel(p):
        return resolve_path(p, base_dir)

    cfg.learn_dir = rel(cfg.learn_dir)
    cfg.data = [rel(p) for p in _files(cfg.data)]
    cfg.explore.structures = [rel(p) for p in _files(cfg.explore.structures)]
    cfg.labeller.pool = rel(cfg.labeller.pool)
    if cfg.labeller.model:
        cfg.labeller.model = rel(cfg.labeller.model)
    if not cfg.data:
        raise LearnConfigError(f"{where}: data is required: the initial labelled structures "
                               "(a file or a list of files)")
    s, st = cfg.selection, cfg.stop
    if not s.lower < s.upper:
        raise LearnConfigError(f"{where}: selection.lower = {s.lower:g} must be below "
                               f"selection.upper = {s.upper:g} (eV/A, raw max_force_dev; e.g. "
                               "lower: 0.05, upper: 0.15)")
    if st.accurate_fraction is not None and st.accurate_fraction > 1:
        raise LearnConfigError(f"{where}: stop.accurate_fraction = {st.accurate_fraction:g}: "
                               "must be a fraction in (0, 1]")
    lab = cfg.labeller
    if lab.kind == "pool":
        if not lab.pool:
            raise LearnConfigError(f"{where}: labeller.kind = pool needs labeller.pool: a "
                                   "labelled file whose frames are scored and picked")
    else:
        if lab.kind == "ase" and not lab.ase_calculator:
            raise LearnConfigError(f"{where}: labeller.kind = ase needs labeller.ase_calculator "
                                   "(module:Class, e.g. ase.calculators.emt:EMT)")
        if lab.kind == "model" and not lab.model:
            raise LearnConfigError(f"{where}: labeller.kind = model needs labeller.model (a "
                                   "file written by `mlpot export`)")
        if not cfg.explore.structures:
            raise LearnConfigError(f"{where}: explore.structures is required: the starting "
                                   "structures of the MD (or use labeller.kind: pool)")
    e = cfg.explore
    if not e.temperatures or any(not t > 0 for t in e.temperatures):
        raise LearnConfigError(f"{where}: explore.temperatures = {e.temperatures}: give a list "
                               "of temperatures > 0 K")
    if e.pressures and e.ensemble != "npt":
        raise LearnConfigError(f"{where}: explore.pressures needs explore.ensemble: npt (or "
                               "remove explore.pressures for NVT Langevin runs)")
    if e.ensemble == "npt" and not e.pressures:
        raise LearnConfigError(f"{where}: explore.ensemble = npt needs explore.pressures (bar)")
    # the committee's training config, checked now with the initial data
    tcfg = training_config(cfg, cfg.data, os.path.join(cfg.learn_dir, "check"), where)
    if tcfg.training.ensemble < 2:
        raise LearnConfigError(
            f"{where}: training.training.ensemble = {tcfg.training.ensemble}: active learning "
            "needs a committee to measure its uncertainty; set training.ensemble to 2 or more "
            "(4 is common)")
    return cfg


def training_config(cfg: LearnConfig, train_files: List[str], out_dir: str, where="config"):
    """The `mlpot train` Config of one iteration: the user's ``training`` section with
    data.train set to ``train_files`` and training.out_dir to ``out_dir``."""
    from .train import config_from_dict

    raw = copy.deepcopy(cfg.training or {})
    if not isinstance(raw, dict):
        raise LearnConfigError(f"{where}: training must be a mapping (an `mlpot train` config)")
    data = dict(raw.get("data") or {})
    if "train" in data:
        raise LearnConfigError(f"{where}: training.data.train is set by the loop (the initial "
                               "data and the labels so far); give the initial data as data:")
    data["train"] = list(train_files)
    raw["data"] = data
    training = dict(raw.get("training") or {})
    training["out_dir"] = out_dir
    training.setdefault("progress", False)
    raw["training"] = training
    try:
        return config_from_dict(raw, where=f"{where}: training")
    except ConfigError as err:
        raise LearnConfigError(str(err)) from None


def load_learn_config(path: str) -> LearnConfig:
    from .train.config import read_yaml

    return learn_config_from_dict(read_yaml(path, LearnConfigError), where=path,
                                  base_dir=os.path.dirname(os.path.abspath(path)))


def labeller_spec(cfg: LearnConfig):
    from .label import LabellerSpec

    lab = cfg.labeller
    return LabellerSpec(kind=lab.kind, method=lab.method, basis=lab.basis, charge=lab.charge,
                        spin=lab.spin, max_cycle=lab.max_cycle, calculator=lab.ase_calculator,
                        calc_kwargs=dict(lab.calc_kwargs), model=lab.model, device=lab.device)


def _read(path: str, what: str):
    import ase.io

    if not os.path.isfile(path):
        raise LearnConfigError(f"{what} {path}: no such file")
    try:
        frames = ase.io.read(path, index=":")
    except Exception as err:  # noqa: BLE001 - re-raised with the file's name
        raise LearnConfigError(f"{what} {path}: ASE could not read it "
                               f"({type(err).__name__}: {err})") from err
    if not frames:
        raise LearnConfigError(f"{what} {path}: no frames")
    return frames


def check_inputs(cfg: LearnConfig):
    """Checks that read inputs, before any work: the data files exist, the labeller imports and
    can handle every starting structure (PySCF: molecules only, with basis functions for every
    element; EMT and a model: their elements; any other ASE calculator: a dry run labelling the
    first starting structure of each composition), the pool reads. Returns the starting
    structures (or the pool's frames)."""
    for path in cfg.data:
        if not os.path.exists(path):
            raise LearnConfigError(f"data {path}: no such file or folder")
    if cfg.labeller.kind == "pool":
        return _read(cfg.labeller.pool, "labeller.pool")
    from .label import make_labeller

    from .label import FrameFailed, LabelError, composition

    labeller = make_labeller(labeller_spec(cfg))  # LabelError (exit 2) if it cannot import
    starts, seen = [], set()
    for path in cfg.explore.structures:
        for k, atoms in enumerate(_read(path, "explore.structures")):
            where = f"explore.structures {path}: frame {k}"
            labeller.check(atoms, where)  # PySCF: molecules only; EMT, a model: its elements
            key = composition(atoms)
            if getattr(labeller, "needs_dry_run", False) and key not in seen:
                # any other ASE calculator: one frame per composition, labelled now
                try:
                    labeller.label(atoms)
                except FrameFailed as err:
                    raise LabelError(f"{where} ({key}): the dry run of "
                                     f"{cfg.labeller.ase_calculator} failed: {err}; check that "
                                     "the calculator handles these elements and settings") from err
            seen.add(key)
            starts.append(atoms)
    known = _training_elements(cfg)
    for k, atoms in enumerate(starts):
        missing = sorted(set(atoms.get_chemical_symbols()) - known) if known else []
        if missing:
            raise LearnConfigError(
                f"explore.structures: structure {k} has {', '.join(missing)}, which the initial "
                f"data ({', '.join(sorted(known))}) do not have, so the committee cannot run on "
                "it; add labelled structures with these elements to data (or list them in "
                "training.data.type_map)")
    return starts


def _training_elements(cfg: LearnConfig) -> Optional[set]:
    """The elements the committee will know: training.data.type_map, else those of the initial
    data files (None when they are not files ASE reads, e.g. DeePMD folders: the trainer checks
    them)"""
    import ase.io

    type_map = ((cfg.training or {}).get("data") or {}).get("type_map")
    if type_map:
        return set(type_map)
    elements: set = set()
    for path in cfg.data:
        if not os.path.isfile(path):
            return None
        try:
            for atoms in ase.io.iread(path, index=":"):
                elements |= set(atoms.get_chemical_symbols())
        except Exception:  # noqa: BLE001 - the trainer's reader reports what is wrong
            return None
    return elements


# --------------------------------------------------------------------------- descriptor
def structure_descriptor(atoms, cutoff: float, bins: int = 24, width: float = 0.15):
    """A species-resolved radial distribution of one structure, the descriptor of the FPS.

    For each ordered pair of species (a, b) present in ``species``, the distances r_ij < cutoff
    from atoms i of species a to neighbours j of species b are smeared with Gaussians of
    ``width`` Angstrom on ``bins`` points in [0, cutoff] and summed, divided by the number of
    atoms (an intensive histogram). Why this one: it is invariant to translations, rotations
    and permutations, does not depend on the committee being trained (so distances between
    structures mean the same thing in every iteration, and a pool scored in several iterations
    is thinned consistently), costs one ASE neighbor list, and separates what MD at different
    temperatures and pressures explores (bond-length spread, density, coordination). It does
    not see angles; the candidates it thins are already chosen by the committee's force
    deviation, which does."""
    from ase.neighborlist import neighbor_list

    z = atoms.numbers
    species = sorted(set(int(x) for x in z))
    centres = np.linspace(0.0, cutoff, bins)
    i, j, d = neighbor_list("ijd", atoms, cutoff)
    parts = []
    for a in species:
        for b in species:
            sel = (z[i] == a) & (z[j] == b)
            g = np.exp(-0.5 * ((d[sel, None] - centres[None, :]) / width) ** 2).sum(0)
            parts.append(g / len(atoms))
    return np.concatenate(parts)


def farthest_point_sampling(x: np.ndarray, k: int, first: int = 0,
                            covered: Optional[np.ndarray] = None) -> List[int]:
    """Indices of ``k`` rows of ``x`` chosen greedily, each the farthest (Euclidean) from those
    chosen before, starting with ``first``. With ``covered`` (rows already in the data set),
    distances count to those too and the first pick is the row farthest from them (greedy
    k-centre, the core-set selection of Sener and Savarese, ICLR 2018); ``first`` is unused."""
    n = len(x)
    if n == 0 or k <= 0:
        return []
    if covered is not None and len(covered):
        dist = np.full(n, np.inf)
        for c in covered:  # row by row: no [n, m, d] array
            dist = np.minimum(dist, np.linalg.norm(x - c, axis=1))
        first = int(np.argmax(dist))
        dist = np.minimum(dist, np.linalg.norm(x - x[first], axis=1))
    else:
        dist = np.linalg.norm(x - x[first], axis=1)
    chosen = [int(first)]
    while len(chosen) < min(k, n):
        dist[chosen] = -1.0
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(x - x[nxt], axis=1))
    return chosen


def weighted_kmeans_pick(x: np.ndarray, weights: np.ndarray, k: int, seed=0,
                         max_iter: int = 100) -> List[int]:
    """Indices of ``k`` distinct rows of ``x``: the row nearest each centre of a k-means
    clustering in which row r counts ``weights[r]`` times (k-means++ seeding from
    ``numpy.random.default_rng(seed)``, then Lloyd's iterations), the clusters taken in order of
    their total weight. With the committee's deviations as weights this is the diverse
    mini-batch selection of Zhdanov (2019, arXiv:1901.05954): the batch covers the candidates'
    main regions, each represented by a typical frame pulled toward the doubted ones, where
    farthest-point sampling picks the outliers. Written here because scipy's ``kmeans2`` takes
    no weights (and scikit-learn is not a dependency)."""
    x = np.asarray(x, dtype=np.float64)
    w = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
    n = len(x)
    if n == 0 or k <= 0:
        return []
    if k >= n:
        return list(range(n))
    if not np.isfinite(w).all() or w.sum() <= 0.0:
        w = np.ones(n)
    rng = np.random.default_rng(seed)

    def sq_dist(c):  # [n, m] squared distances without an [n, m, d] array
        return np.maximum((x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :], 0.0)

    picks = [int(rng.choice(n, p=w / w.sum()))]
    d2 = sq_dist(x[picks])[:, 0]
    while len(picks) < k:
        p = w * d2
        p[picks] = 0.0
        nxt = int(rng.choice(n, p=p / p.sum())) if p.sum() > 0 else \
            int(rng.choice(np.setdiff1d(np.arange(n), picks)))
        picks.append(nxt)
        d2 = np.minimum(d2, sq_dist(x[[nxt]])[:, 0])
    centres = x[picks].copy()
    for _ in range(max_iter):
        label = sq_dist(centres).argmin(1)
        new = centres.copy()
        for j in range(k):
            m = label == j
            if m.any() and w[m].sum() > 0:
                new[j] = (w[m, None] * x[m]).sum(0) / w[m].sum()
        if np.allclose(new, centres):
            break
        centres = new
    d = sq_dist(centres)
    label = d.argmin(1)
    mass = np.array([w[label == j].sum() for j in range(k)])
    chosen: List[int] = []
    for j in np.argsort(-mass, kind="stable"):
        for r in np.argsort(d[:, j], kind="stable"):
            if int(r) not in chosen:
                chosen.append(int(r))
                break
    return chosen


def classify(devs: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """0 accurate (dev < lower), 1 candidate (lower <= dev < upper), 2 failed (dev >= upper
    or NaN)."""
    devs = np.asarray(devs, dtype=np.float64)
    out = np.full(devs.shape, 2, dtype=np.int64)
    out[devs < upper] = 1
    out[devs < lower] = 0
    return out


# --------------------------------------------------------------------------- the loop
def _kill_point(name: str) -> None:
    """Test hook: ``MLPOT_TEST_KILL_AT=<name>`` ends the process here as ``kill -9`` would."""
    if os.environ.get("MLPOT_TEST_KILL_AT") == name:
        os._exit(137)


class Learner:
    def __init__(self, cfg: LearnConfig, log=print):
        self.cfg = cfg
        self.log = log
        self.dir = cfg.learn_dir
        self.state_path = os.path.join(self.dir, "state.json")

    # ------------------------------------------------------------ state
    def read_state(self) -> Dict[str, Any]:
        if not os.path.exists(self.state_path):
            return {"format": STATE_FORMAT, "iteration": 0, "phase": None, "elapsed_s": 0.0,
                    "rows": [], "pool_chosen": [], "stopped": None}
        with open(self.state_path) as f:
            state = json.load(f)
        if state.get("format") != STATE_FORMAT:
            raise LearnConfigError(f"{self.state_path}: written by another version of mlpot "
                                   "learn; use a new learn_dir")
        return state

    def write_state(self, state: Dict[str, Any]) -> None:
        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(state, f, indent=1)

        atomic_write(self.state_path, write)

    def signature(self, cfg: Optional[LearnConfig] = None) -> Dict[str, Any]:
        """The config a resumed run must match: everything but ``stop``."""
        d = dataclasses.asdict(cfg if cfg is not None else self.cfg)
        d.pop("stop")
        return json.loads(json.dumps(d))

    def iter_dir(self, i: int) -> str:
        return os.path.join(self.dir, f"iter_{i:03d}")

    def train_files(self, i: int) -> List[str]:
        files = list(self.cfg.data)
        for j in range(i):
            path = os.path.join(self.iter_dir(j), "labelled.xyz")
            if os.path.exists(path) and os.path.getsize(path) > 0:
                files.append(path)
        return files

    def labels_added(self, i: int) -> int:
        """Labelled frames added by iterations before ``i``."""
        import ase.io

        n = 0
        for path in self.train_files(i)[len(self.cfg.data):]:
            n += len(ase.io.read(path, index=":"))
        return n

    # ------------------------------------------------------------ run
    def run(self) -> Dict[str, Any]:
        frames = check_inputs(self.cfg)  # bad input: before any work
        self.pool_size = len(frames)
        os.makedirs(self.dir, exist_ok=True)
        state = self.read_state()
        signature = self.signature()
        new = _flat(signature)
        # settings added to mlpot since the run began count as their defaults there
        defaults = _flat(self.signature(LearnConfig()))
        old = {**{k: v for k, v in defaults.items() if k in new},
               **_flat(state.setdefault("config", signature))}
        if old != new:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
                             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
            raise LearnConfigError(f"{self.dir} holds a loop run with another config ({diff}); "
                                   "resume with the same config (only stop: may change) or "
                                   "choose a new learn_dir")
        if state.get("stopped"):
            why = self.stop_reason(state)
            if why:
                self.log(f"{self.dir}: the loop already stopped ({why})")
                self.print_table(state["rows"])
                return state
            # the stop rules were relaxed (stop: may change between runs): go on
            state.update(stopped=None, iteration=state["iteration"] + 1, phase=None)
            self.write_state(state)
        t_start, elapsed0 = time.time(), float(state["elapsed_s"])
        while True:
            i, phase = state["iteration"], state["phase"]
            idir = self.iter_dir(i)
            os.makedirs(idir, exist_ok=True)
            if phase is None:
                self.train(i, state)
                phase = self.advance(state, "trained", t_start, elapsed0)
            if phase == "trained":
                self.explore(i, state, frames)
                phase = self.advance(state, "explored", t_start, elapsed0)
            if phase == "explored":
                self.select(i, state, frames)
                phase = self.advance(state, "selected", t_start, elapsed0)
            if phase == "selected":
                self.label(i, state, frames)
                phase = self.advance(state, "labelled", t_start, elapsed0)
            why = self.stop_reason(state)
            self.print_table(state["rows"])
            if why:
                state["stopped"] = why
                self.write_state(state)
                self.log(f"stopped after iteration {i}: {why}; the last committee is "
                         f"{os.path.join(idir, 'model.pt')}")
                self.plot(state["rows"])
                return state
            state["iteration"], state["phase"] = i + 1, None
            self.write_state(state)
            _kill_point(f"learn-iteration-{i + 1}")

    def advance(self, state, phase: str, t_start: float, elapsed0: float) -> str:
        state["phase"] = phase
        state["elapsed_s"] = elapsed0 + time.time() - t_start
        # the loop's wall time (resumes excluded) when this iteration's phase ended
        self.row(state, state["iteration"])["elapsed_s"] = round(state["elapsed_s"], 1)
        self.write_state(state)
        _kill_point(f"learn-{phase}-{state['iteration']}")
        return phase

    def row(self, state, i: int) -> Dict[str, Any]:
        rows = state["rows"]
        while len(rows) <= i:
            rows.append({"iteration": len(rows)})
        return rows[i]

    # ------------------------------------------------------------ phases
    def train(self, i: int, state) -> None:
        from .checkpoint import model_from_checkpoint
        from .export import export
        from .train.trainer import Trainer, finalize

        idir = self.iter_dir(i)
        out = os.path.join(idir, "train")
        cfg = training_config(self.cfg, self.train_files(i), out)
        trainer = Trainer(cfg)
        resume = os.path.exists(os.path.join(out, "last.pt"))
        prev = os.path.join(self.iter_dir(i - 1), "train", "best.pt")
        if not resume and i > 0 and self.cfg.warm_start and os.path.exists(prev):
            try:
                trainer.init_weights(prev, where=f"iteration {i}: warm start from")
            except ConfigError as err:
                warnings.warn(f"iteration {i}: the committee of iteration {i - 1} does not fit "
                              f"this one ({str(err).splitlines()[0]}); training starts fresh",
                              stacklevel=2)
        self.log(f"iteration {i}: training the committee of {cfg.training.ensemble} on "
                 f"{len(trainer.train_set)} + {len(trainer.val_set)} frames"
                 + (" (resumed)" if resume else ""))
        trainer.fit(resume=resume)
        results = finalize(trainer)
        model = model_from_checkpoint(os.path.join(out, "best.pt"))
        export(model, os.path.join(idir, "model.pt"))
        val = results["validation"]
        row = self.row(state, i)
        # labelled frames in the data set: a fixed validation file is not part of it
        fixed_val = bool(cfg.data.validation)
        row["labels"] = len(trainer.train_set) + (0 if fixed_val else len(trainer.val_set))
        row["labels_added_so_far"] = self.labels_added(i)
        row["val_forces_rmse_eV_per_A"] = _get(val, "forces_rmse_meV_per_A", 1e-3)
        row["val_energy_rmse_meV_per_atom"] = _get(val, "energy_rmse_meV_per_atom", 1.0)

    def _model(self, i: int):
        from .export import load

        return load(os.path.join(self.iter_dir(i), "model.pt"),
                    device=self.cfg.explore.device)

    def explore(self, i: int, state, starts) -> None:
        import ase.io

        idir = self.iter_dir(i)
        unscored = self.cfg.labeller.kind == "pool" and self.cfg.selection.strategy == "random"
        if self.cfg.labeller.kind == "pool":
            # random picks need no scores: the pool is not scored (the fractions stay empty)
            devs, rel = (None, None) if unscored else self.score_pool(i, state, starts)
            chosen = set(state["pool_chosen"])
            frames = []
            for k, atoms in enumerate(starts):
                if k in chosen:
                    continue
                a = atoms.copy()
                a.info = {"pool_index": k}
                if devs is not None:
                    a.info["max_force_dev"] = float(devs[k])
                if rel is not None:
                    a.info[RELATIVE_KEY] = float(rel[k])
                frames.append(a)
            failed_runs = 0
        else:
            frames, failed_runs = self.run_md(i, starts)
        atomic_write(os.path.join(idir, "explored.xyz"),
                     lambda tmp: ase.io.write(tmp, frames, format="extxyz"))
        n = len(frames) + failed_runs
        row = self.row(state, i)
        row["frames"] = n
        if unscored:
            row["accurate"] = row["candidate"] = row["failed"] = None
            return
        devs = np.array([a.info["max_force_dev"] for a in frames], dtype=np.float64)
        cls = classify(devs, self.cfg.selection.lower, self.cfg.selection.upper)
        row["accurate"] = float((cls == 0).sum() / n) if n else 0.0
        row["candidate"] = float((cls == 1).sum() / n) if n else 0.0
        row["failed"] = float(((cls == 2).sum() + failed_runs) / n) if n else 0.0

    def score_pool(self, i: int, state, pool):
        """Raw max_force_dev [P] of every pool frame by iteration i's committee, and their
        relative deviations [P] (``selection.rank: relative``; else None)."""
        from .ase import MLPotCalculator
        from .uncertainty import relative_max_force_dev

        calc = MLPotCalculator(self._model(i), device=self.cfg.explore.device, min_distance=None)
        devs = np.full(len(pool), np.nan)
        rel = np.full(len(pool), np.nan) if self.relative else None
        chosen = set(state["pool_chosen"])
        for k, atoms in enumerate(pool):
            if k in chosen:
                continue
            a = atoms.copy()
            a.calc = calc
            forces = a.get_forces()
            devs[k] = float(calc.results["max_force_dev"])
            if rel is not None:
                rel[k] = float(relative_max_force_dev(calc.results["forces_dev"], forces,
                                                      self.cfg.selection.relative_level))
        return devs, rel

    @property
    def relative(self) -> bool:
        """Candidates are ranked by the relative force deviation (``selection.rank``)."""
        return self.cfg.selection.rank == "relative"

    def run_md(self, i: int, starts):
        """(collected frames with their raw max_force_dev, number of replicas stopped)."""
        import torch

        import integrators as I
        from integrators import health as H

        e = self.cfg.explore
        model = self._model(i)
        idir = self.iter_dir(i)
        uncertain = os.path.join(idir, "uncertain.xyz")
        if os.path.exists(uncertain):
            os.remove(uncertain)  # a killed exploration is redone from its start
        temps = [float(t) for t in e.temperatures]
        frames, failed = [], 0
        run = 0
        for s, atoms in enumerate(starts):
            periodic = bool(np.all(atoms.pbc))
            pressures = (e.pressures or [None]) if periodic else [None]
            types = model.atom_types(atoms.numbers, where=f"explore.structures frame {s}")
            provider = I.MLPotForces(model, types, pbc=tuple(bool(p) for p in atoms.pbc),
                                     atomic_numbers=atoms.numbers)
            for p in pressures:
                r = len(temps) * e.replicas
                t_rep = torch.tensor([t for t in temps for _ in range(e.replicas)],
                                     dtype=torch.float64)
                st = I.state_from_ase(atoms, replicas=r, seed=e.seed + 1000 * i + run,
                                      device=e.device, dtype=model.dtype)
                st = I.initialize_velocities(st, t_rep, remove_com=True)
                if p is not None and e.ensemble == "npt":
                    integ = I.StochasticCellRescaling(e.timestep, t_rep, float(p), e.tau_t,
                                                      e.tau_p)
                else:
                    integ = I.Langevin(e.timestep, t_rep, e.friction)
                rule = H.UncertaintyStop(self.cfg.selection.upper, uncertain)
                health = H.HealthCheck(H.default_rules() + [rule], last_good_path=None)
                collector = _Collector(e.collect_every, run, t_rep.tolist(), p,
                                       self.cfg.selection.relative_level
                                       if self.relative else None)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", I.MDWarning)
                    try:
                        I.simulate(st, integ, provider, e.steps, [collector], health=health,
                                   last_good_path=None)
                        stopped = 0 if rule.stopped is None else int(rule.stopped.sum())
                    except H.UncertaintyStopped:
                        stopped = r
                    except (H.HealthCheckFailed, I.MDStopped) as err:
                        # another rule broke: the replicas still running count as failed
                        live = r if rule.stopped is None else r - int(rule.stopped.sum())
                        stopped = r
                        self.log(f"  run {run}: MD stopped ({' '.join(str(err).split())[:200]}"
                                 f"); {live} running replica(s) counted as failed")
                frames += collector.frames
                failed += stopped
                run += 1
        return frames, failed

    def select(self, i: int, state, starts) -> None:
        import ase.io

        idir = self.iter_dir(i)
        frames = ase.io.read(os.path.join(idir, "explored.xyz"), index=":") \
            if os.path.getsize(os.path.join(idir, "explored.xyz")) > 0 else []
        sel = self.cfg.selection
        devs = np.array([a.info.get("max_force_dev", np.nan) for a in frames],
                        dtype=np.float64)
        if self.cfg.labeller.kind == "pool" and sel.strategy == "random":
            cand = np.arange(len(frames))  # not scored: every unchosen pool frame
        elif self.cfg.labeller.kind == "pool" and sel.pool_all_candidates:
            cand = np.flatnonzero(np.isfinite(devs))
        else:
            cand = np.flatnonzero(classify(devs, sel.lower, sel.upper) == 1)
        budget = sel.max_labels
        if self.cfg.stop.max_labels is not None:
            budget = min(budget, self.cfg.stop.max_labels - self.labels_added(i))
        picked: List[int] = []
        if len(cand) and budget > 0 and sel.strategy == "random":
            rng = np.random.default_rng([sel.seed, i])
            picked = [int(k) for k in rng.choice(cand, size=min(budget, len(cand)),
                                                 replace=False)]
        elif len(cand) and budget > 0:
            # the order of doubt: the raw deviation, or the relative one (selection.rank)
            score = devs if not self.relative else \
                np.array([a.info.get(RELATIVE_KEY, np.nan) for a in frames], dtype=np.float64)
            if sel.candidates_per_label is not None:  # the most doubted candidates only
                keep = sel.candidates_per_label * budget
                cand = np.sort(cand[np.argsort(-score[cand], kind="stable")[:keep]])
            cutoff = float(self._model(i).cutoff)
            x = np.stack([structure_descriptor(frames[k], cutoff) for k in cand])
            if sel.diversity == "kmeans":
                rows = weighted_kmeans_pick(x, score[cand], budget, seed=[sel.seed, i])
            else:
                first = int(np.argmax(score[cand]))
                covered = None
                if sel.diversity == "labelled":
                    covered = np.stack([structure_descriptor(a, cutoff)
                                        for path in self.train_files(i)
                                        for a in ase.io.read(path, index=":")])
                rows = farthest_point_sampling(x, budget, first, covered)
            picked = [int(cand[k]) for k in rows]
        chosen = []
        for k in picked:
            a = frames[k].copy()
            a.calc = None
            chosen.append(a)
        atomic_write(os.path.join(idir, "selected.xyz"),
                     lambda tmp: ase.io.write(tmp, chosen, format="extxyz"))
        row = self.row(state, i)
        row["selected"] = len(chosen)
        if self.cfg.labeller.kind == "pool":
            state["pool_chosen"] = sorted(set(state["pool_chosen"])
                                          | {int(a.info["pool_index"]) for a in chosen})

    def label(self, i: int, state, pool) -> None:
        import ase.io

        from .label import label_file, side_files

        idir = self.iter_dir(i)
        selected = os.path.join(idir, "selected.xyz")
        out = os.path.join(idir, "labelled.xyz")
        chosen = ase.io.read(selected, index=":") if os.path.getsize(selected) > 0 else []
        if not chosen:
            atomic_write(out, lambda tmp: open(tmp, "w").close())
            n = 0
        elif self.cfg.labeller.kind == "pool":  # labels from the pool file, never recomputed
            frames = [pool[int(a.info["pool_index"])] for a in chosen]
            atomic_write(out, lambda tmp: ase.io.write(tmp, frames, format="extxyz"))
            n = len(frames)
        elif os.path.exists(out) and not os.path.exists(side_files(out)[0]):
            # label_file wrote the output, then removed its progress file: labelled already
            # (a kill before the phase was recorded); not labelled again
            n = len(ase.io.read(out, index=":")) if os.path.getsize(out) > 0 else 0
        else:
            s = label_file(selected, out, labeller_spec(self.cfg),
                           workers=self.cfg.labeller.workers, log=self.log)
            n = s["labelled"]
            if s["failed"]:
                self.log(f"  {s['failed']} frame(s) failed to label (listed in "
                         f"{s['failed_file']})")
        _kill_point(f"learn-labels-written-{i}")
        self.row(state, i)["labels_added"] = n
        why = self.stall_message(i, state)
        if why:
            warnings.warn(why, LoopStallWarning, stacklevel=2)

    def stall_message(self, i: int, state) -> Optional[str]:
        """Why iteration i added no label and what to change (None when it added some): the
        next iteration would train on the same data and most likely stall again."""
        import ase.io

        row = self.row(state, i)
        st = self.cfg.stop
        if row.get("labels_added") or (st.accurate_fraction is not None and
                                       (row.get("accurate") or 0.0) >= st.accurate_fraction):
            return None  # labels added, or the loop is done (stop.accurate_fraction)
        sel, head = self.cfg.selection, f"iteration {i} added no labels"
        if row.get("selected"):
            return (f"{head}: all {row['selected']} selected frame(s) failed to label (see "
                    f"the failed-frames file beside {self.iter_dir(i)}/labelled.xyz); check "
                    "the labeller's settings on one of them")
        if st.max_labels is not None and self.labels_added(i) >= st.max_labels:
            return None  # the label budget is spent: stop.max_labels ends the loop
        if not row.get("frames"):
            return (f"{head}: the exploration gave no frames; check explore.structures, "
                    "explore.steps and explore.collect_every")
        path = os.path.join(self.iter_dir(i), "explored.xyz")
        frames = ase.io.read(path, index=":") if os.path.getsize(path) > 0 else []
        devs = np.array([a.info["max_force_dev"] for a in frames if "max_force_dev" in a.info])
        spread = (f"; max_force_dev of the collected frames: median {np.median(devs):.3g}, "
                  f"10-90 % {np.percentile(devs, 10):.3g}-{np.percentile(devs, 90):.3g} eV/A"
                  if len(devs) else "")
        levels = f"selection.lower = {sel.lower:g}, upper = {sel.upper:g} eV/A"
        acc, fail = row.get("accurate") or 0.0, row.get("failed") or 0.0
        if fail >= acc:
            advice = ("the committee doubts nearly every explored frame: raise the trust "
                      "levels to the deviations seen here, or explore more gently (lower "
                      "explore.temperatures, fewer explore.steps)")
        else:
            advice = ("the committee is sure of nearly every explored frame, short of "
                      "stop.accurate_fraction: lower selection.lower, explore further (higher "
                      "explore.temperatures, more explore.steps), or accept the model")
        return (f"{head}: no explored frame lies between the trust levels ({levels}; "
                f"{100 * acc:.1f} % accurate, {100 * fail:.1f} % failed{spread}): {advice}")

    # ------------------------------------------------------------ stopping and reports
    def stop_reason(self, state) -> Optional[str]:
        st = self.cfg.stop
        i = state["iteration"]
        row = state["rows"][i]
        if st.accurate_fraction is not None and row.get("frames") and \
                row.get("accurate") is not None and row["accurate"] >= st.accurate_fraction:
            return (f"{100 * row['accurate']:.1f} % of the explored frames are below the lower "
                    f"trust level (target {100 * st.accurate_fraction:g} %)")
        if i + 1 >= st.max_iterations:
            return f"stop.max_iterations = {st.max_iterations} reached"
        if st.max_wall_hours is not None and state["elapsed_s"] >= 3600 * st.max_wall_hours:
            return f"stop.max_wall_hours = {st.max_wall_hours:g} reached"
        added = row.get("labels_added_so_far", 0) + row.get("labels_added", 0)
        if st.max_labels is not None and added >= st.max_labels:
            return f"stop.max_labels = {st.max_labels} labels added"
        if self.cfg.labeller.kind == "pool" and \
                len(state["pool_chosen"]) >= self.pool_size:
            return "the pool is used up"
        n = st.stalled_iterations
        if n is not None and i + 1 >= n and \
                all(not r.get("labels_added") for r in state["rows"][i + 1 - n: i + 1]):
            return (f"stalled: {n} iteration(s) in a row added no labels (the warning above "
                    "says what to change; stop.stalled_iterations sets how many)")
        return None

    COLUMNS = ["iteration", "labels", "labels_added", "frames", "accurate", "candidate",
               "failed", "val_forces_rmse_eV_per_A", "val_energy_rmse_meV_per_atom",
               "elapsed_s"]

    def print_table(self, rows) -> None:
        path = os.path.join(self.dir, "learning.csv")

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.COLUMNS, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)

        atomic_write(path, write)
        head = (f"{'iter':>4} {'labels':>6} {'added':>5} {'frames':>6} {'accur.':>6} "
                f"{'cand.':>6} {'failed':>6} {'F RMSE':>8} {'E RMSE':>9}")
        lines = [head, f"{'':>4} {'':>6} {'':>5} {'':>6} {'':>6} {'':>6} {'':>6} "
                       f"{'eV/A':>8} {'meV/atom':>9}"]
        for r in rows:
            def f(key, fmt):
                v = r.get(key)
                return format(v, fmt) if v is not None else "-"
            lines.append(f"{r['iteration']:>4} {f('labels', 'd'):>6} "
                         f"{f('labels_added', 'd'):>5} {f('frames', 'd'):>6} "
                         f"{f('accurate', '.3f'):>6} {f('candidate', '.3f'):>6} "
                         f"{f('failed', '.3f'):>6} {f('val_forces_rmse_eV_per_A', '.4f'):>8} "
                         f"{f('val_energy_rmse_meV_per_atom', '.2f'):>9}")
        self.log("\n".join(lines))
        self.plot(rows)

    def plot(self, rows) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        pts = [(r["labels"], r["val_forces_rmse_eV_per_A"]) for r in rows
               if r.get("labels") is not None and r.get("val_forces_rmse_eV_per_A") is not None]
        if not pts:
            return
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        ax.set_xlabel("labelled structures (train + validation)")
        ax.set_ylabel("validation force RMSE (eV/A)")
        ax.set_title("mlpot learn")
        fig.tight_layout()
        path = os.path.join(self.dir, "learning.png")
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _get(d: Dict[str, Any], key: str, scale: float) -> Optional[float]:
    v = d.get(key)
    return None if v is None else float(v) * scale


class _Collector:
    """Collects every ``interval`` steps the running replicas' frames with their raw
    max_force_dev (a reporter of ``integrators.simulate``)."""

    def __init__(self, interval: int, run: int, temps, pressure,
                 relative_level: Optional[float] = None):
        self.interval = int(interval)
        self.run, self.temps, self.pressure = run, temps, pressure
        self.relative_level = relative_level  # also the relative deviation, at this level
        self.frames: List[Any] = []

    def open(self, state, integrator) -> None:
        pass

    def close(self) -> None:
        pass

    def report(self, state, integrator) -> None:
        from integrators import replica_to_ase

        from .uncertainty import relative_max_force_dev

        if state.step == 0:  # the starting structure is not explored yet
            return
        dev = state.outputs.get("max_force_dev")
        if dev is None:
            raise LearnConfigError("the exploration model returns no max_force_dev: it is not "
                                   "a committee")
        rel = None
        if self.relative_level is not None:
            rel = relative_max_force_dev(
                state.outputs["forces_dev"].detach().double().reshape(state.n_replicas, -1).cpu(),
                state.forces.detach().double().cpu(), self.relative_level)
        for r in range(state.n_replicas):
            if state.active is not None and not bool(state.active[r]):
                continue
            a = replica_to_ase(state, r)
            a.info.update(max_force_dev=float(dev[r]), step=int(state.step), run=self.run,
                          replica=r, temperature_K=float(self.temps[r]))
            if rel is not None:
                a.info[RELATIVE_KEY] = float(rel[r])
            if self.pressure is not None:
                a.info["pressure_bar"] = float(self.pressure)
            self.frames.append(a)


def learn(cfg: LearnConfig, log=print) -> Dict[str, Any]:
    """Run (or resume) the loop of ``cfg``; returns the final state (see the module doc)."""
    return Learner(cfg, log).run()


def run_learn(args) -> int:
    cfg = load_learn_config(args.config)
    learn(cfg)
    print(f"outputs in {cfg.learn_dir}/ (learning.csv, learning.png, iter_*/)")
    return 0


def add_learn_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "learn", help="active learning: train a committee, explore with MD, label, repeat",
        description="The active-learning loop of CONFIG.yaml (see examples/learn_config.yaml): "
                    "train a committee, explore with MD, pick the structures where the "
                    "committee disagrees, label them, repeat. The same command after a kill "
                    "resumes. Exit code 2 for bad input (checked before any work).")
    p.add_argument("config", help="YAML file (see examples/learn_config.yaml)")
    p.set_defaults(func=run_learn)
