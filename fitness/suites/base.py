"""Task suites: a fitness scored over a family of small tasks, with a meta-train part that
selection sees and a disjoint meta-test part kept for validation.

A loss is "better" only when it is better on tasks the search never saw (DiscoPOP's LRML was
found on MT-Bench and re-checked on Alpaca Eval, TL;DR and IMDb; Lu et al. 2024, sec. 5). A
suite draws its tasks from a seeded generator, scores a candidate on each task paired with the
baseline loss on the same task and evaluation seed, and aggregates the per-task gains robustly
(mean gain together with the worst task), so a loss that collapses on one task cannot rank
first.

Each task is evaluated in two phases, kept apart for the trust boundary:

* ``train_task(fn, task, seed) -> dict[str, Tensor]``: the only code that runs the genome. It
  sees the training data of the task (preference pairs and the reference policy; labelled
  examples), never what the score is computed on.
* ``score_task(parameters, task, seed) -> float``: no genome code; uses the true reward or the
  held-out data, kept in the plug-in's ``held_out`` store.

The plug-in contract's ``train(fn, seed)`` and ``score(artefacts, seed)`` run these over every
task of the suite and every evaluation seed.

The per-(task, seed) records (:class:`TaskResult`) are the unit a noise-aware engine can
store, extend with fresh seeds and re-aggregate (:func:`aggregate`) without re-running any.
"""
from __future__ import annotations

import math
import time
from abc import abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from engine.genome import GenomeError, compile_genome
from fitness.base import Artefacts, Fitness, Score, TensorSpec
from fitness.truth import Draws, build_secretly, draws, in_builder

#: The two parts of a suite.
SPLITS = ("train", "test")
_SPLIT_CODES = {"train": 1, "test": 2}


def seed_words(seed: int) -> list[int]:
    """An evaluation seed as two 32-bit words, for seeding numpy generators with it."""
    seed = int(seed)
    return [seed & 0xFFFF_FFFF, (seed >> 32) & 0xFFFF_FFFF]


@dataclass(frozen=True)
class Task:
    """One task of a suite.

    Attributes:
        name: Unique, readable name (``train-3:linear/anti/...``): the key in metrics.
        split: ``train`` (meta-train: selection) or ``test`` (meta-test: validation only).
        index: Position in its split.
        spec: The task's parameters (a frozen dataclass of the domain).
        key: Integers that, with the evaluation seed, seed the task's problem instance.
    """

    name: str
    split: str
    index: int
    spec: Any
    key: tuple[int, ...]

    def public_seed(self, seed: int) -> int:
        """A seed for this task and evaluation ``seed`` that anyone can work out (for what
        need not be secret, such as the order of mini-batches)."""
        state = np.random.SeedSequence([*self.key, *seed_words(seed)])
        return int(state.generate_state(1, np.uint64)[0]) & 0x7FFF_FFFF_FFFF_FFFF

    def draws(self, seed: int) -> Draws:
        """Where the random numbers of this task's problem instance for evaluation ``seed`` come
        from (:func:`fitness.truth.draws`: keyed with the truth key unless it is public): call it
        only while building a problem."""
        return draws(self.public_seed(seed))


@dataclass(frozen=True)
class TaskResult:
    """A candidate's score on one task and evaluation seed, paired with the baseline's.

    ``gain = score - baseline``: both are in the task's normalised units, so gains of
    different tasks are comparable (each domain says what a unit is).
    """

    task: str
    seed: int
    score: float
    baseline: float
    seconds: float = 0.0

    @property
    def gain(self) -> float:
        return self.score - self.baseline

    def as_record(self) -> dict[str, Any]:
        record = {"task": self.task, "seed": self.seed, "score": self.score, "baseline": self.baseline,
                  "gain": self.gain}
        if self.seconds:  # known when trained in this process
            record["seconds"] = round(self.seconds, 4)
        return record


#: How far below the baseline a loss may fall on its worst task before that task counts against
#: it (normalised units): the shortfall the end-of-run validation calls a collapse.
WORST_TOLERANCE = 0.05


def aggregate(results: Iterable[TaskResult], worst_weight: float = 0.5,
              worst_tolerance: float = WORST_TOLERANCE, gain_clip: float | None = None) -> dict[str, Any]:
    """Robust aggregate of paired per-task gains.

    Per task, the gain is averaged over its seeds, then, with ``gain_clip``, limited to
    ``[-gain_clip, gain_clip]``; the fitness is ``(1 - worst_weight) * mean + worst_weight *
    min(mean, worst + worst_tolerance)`` over tasks of those gains. A loss that loses no more
    than ``worst_tolerance`` on any task scores its mean gain; one that collapses on a task is
    pulled down by the collapse, so a high mean bought with one failed task cannot rank first.
    The baseline itself scores exactly 0. With ``worst_tolerance`` 0 this is ``(1 -
    worst_weight) * mean + worst_weight * worst``.

    Why a clip: gains over tasks are heavy-tailed (on a task where the baseline overfits, a
    cautious loss gains ten times what it gains elsewhere, by chance of the draw as much as by
    merit), and the worst of several tasks is the noisiest statistic of all; limited gains keep
    one task from deciding a candidate's rank. With a clip just beyond ``worst_tolerance`` a
    task lost by more than the tolerance still counts against the loss (``gain_clip -
    worst_tolerance`` below zero in the worst term), and a loss that wins one task and
    collapses on another gains nothing from the win. ``mean_gain`` and ``worst_gain`` stay
    unclipped; ``clipped_mean_gain`` is the clipped mean.

    Why a tolerance: with one evaluation seed, a task's gain is noisy (the seed-to-seed spread
    of a loss's paired gain reaches 0.05 on some of pref-suite's meta-train tasks), so the worst
    of several tasks is below zero even for a loss whose true gain is zero everywhere; the
    plain worst-task term then ranks the baseline above every real improvement.

    The standard error ``gain_se`` is over evaluation seeds of the per-seed mean gain over that
    seed's tasks (paired with the baseline); it is ``None`` with fewer than two seeds.

    Returns:
        ``fitness``, ``mean_gain``, ``worst_gain``, ``worst_task``, ``gain_se``, ``seeds``
        (evaluation seeds seen) and ``per_task`` (``task -> {score, baseline, gain, seeds}``,
        means over seeds).
    """
    results = list(results)
    if not results:
        raise ValueError("aggregate() needs at least one task result")
    if not 0.0 <= worst_weight <= 1.0:
        raise ValueError(f"worst_weight must be in [0, 1], got {worst_weight!r}")
    if not worst_tolerance >= 0.0:
        raise ValueError(f"worst_tolerance must be >= 0, got {worst_tolerance!r}")
    if gain_clip is not None and not gain_clip > 0.0:
        raise ValueError(f"gain_clip must be > 0 (or None: no clip), got {gain_clip!r}")
    by_task: dict[str, list[TaskResult]] = {}
    for result in results:
        by_task.setdefault(result.task, []).append(result)
    per_task = {}
    for name, items in by_task.items():
        per_task[name] = {
            "score": float(np.mean([r.score for r in items])),
            "baseline": float(np.mean([r.baseline for r in items])),
            "gain": float(np.mean([r.gain for r in items])),
            "seeds": len(items),
        }
    gains = {name: entry["gain"] for name, entry in per_task.items()}
    mean_gain = float(np.mean(list(gains.values())))
    worst_task = min(gains, key=gains.__getitem__)
    worst_gain = gains[worst_task]
    limited = [g if gain_clip is None else min(max(g, -gain_clip), gain_clip) for g in gains.values()]
    clipped_mean = float(np.mean(limited))
    clipped_worst = min(limited)
    seeds = sorted({r.seed for r in results})
    gain_se = None
    if len(seeds) > 1:
        per_seed = [float(np.mean([r.gain for r in results if r.seed == seed])) for seed in seeds]
        gain_se = float(np.std(per_seed, ddof=1) / math.sqrt(len(per_seed)))
    return {
        "fitness": (1.0 - worst_weight) * clipped_mean + worst_weight * min(clipped_mean,
                                                                          clipped_worst + worst_tolerance),
        "mean_gain": mean_gain,
        "clipped_mean_gain": clipped_mean,
        "worst_gain": worst_gain,
        "worst_task": worst_task,
        "gain_se": gain_se,
        "seeds": seeds,
        "per_task": per_task,
    }


def latin_hypercube(count: int, dims: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` points in ``[0, 1)^dims``, one per stratum along every axis (Latin hypercube
    sampling, McKay et al. 1979): a few tasks still cover each factor's whole range."""
    strata = np.stack([rng.permutation(count) for _ in range(dims)], axis=1)
    return (strata + rng.random((count, dims))) / count


def log_uniform(u: float, low: float, high: float) -> float:
    """Map ``u`` in [0, 1) to a log-uniform value in [low, high)."""
    return float(math.exp(math.log(low) + u * (math.log(high) - math.log(low))))


def pick(u: float, choices: Sequence[Any]) -> Any:
    """Map ``u`` in [0, 1) to one of ``choices`` (equal shares)."""
    return choices[min(int(u * len(choices)), len(choices) - 1)]


def check_int(suite: str, name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{suite} option {name} must be an integer >= {low}, got {value!r}")
    return value


class TaskSuite(Fitness):
    """Base of the suites: the task list, the two phases over all tasks, the paired baseline
    and the aggregation.

    Subclasses set ``name``, ``interface``, ``baseline`` (a seed's name) and implement
    :meth:`make_tasks`, :meth:`parameter_spec`, :meth:`build_problem`, :meth:`train_task` and
    :meth:`score_task`.

    The plug-in contract's phases (:mod:`fitness.base`) run every task of the suite for each
    evaluation seed: :meth:`train` returns the trained parameters of every (task, seed) as
    artefacts named ``"{task index}:{seed}:{parameter}"``; :meth:`score` scores them on the
    held-out part of each problem (kept in :attr:`held_out`, wiped in the genome's process),
    trains the baseline on the same problems (trusted seed code, once per task and seed per
    process) and aggregates.

    Args:
        split: ``train`` (meta-train, the default: what selection sees) or ``test``
            (meta-test: validation only, never for selection).
        tasks: Indices of the split's tasks to use (default: all).
        seeds: Evaluation seeds per evaluation: ``seed, seed + 1, ...``.
        worst_weight: Weight of the worst task in the fitness (see :func:`aggregate`).
        worst_tolerance: How far below the baseline the worst task may fall before it counts
            (see :func:`aggregate`; 0 gives the plain ``mean``/``worst`` blend).
        suite_seed: Seed of the task generator; the same value gives the same tasks (default:
            the suite's :attr:`default_suite_seed`).
        train_tasks: Number of meta-train tasks (default :attr:`default_train_tasks`).
        test_tasks: Number of meta-test tasks (default :attr:`default_test_tasks`).
        tasks_per_seed: Meta-train tasks scored per evaluation seed, drawn by the seed
            (:meth:`tasks_for`); by default :attr:`default_tasks_per_seed` on the meta-train
            split when ``tasks`` is not given, else every task.
        gain_clip: Limit of each task's gain in the fitness (see :func:`aggregate`; default
            :attr:`default_gain_clip`, ``None``: no limit).
        fresh_tasks: On the meta-train split (``tasks`` not given): draw each evaluation seed's
            tasks afresh from the task generator instead of from the fixed pool of
            ``train_tasks`` (default :attr:`default_fresh_tasks`). Selection then climbs the
            family's expected gain, not the quirks of a fixed pool it can learn; a drawn task
            that :meth:`usable` rejects is replaced by the next draw.
    """

    fitness_floor = -1.0
    #: The draw of tasks a suite uses unless told otherwise.
    default_suite_seed = 0
    #: Tasks in each split unless told otherwise.
    default_train_tasks = 8
    default_test_tasks = 12
    #: Meta-train tasks scored per evaluation seed (``None``: all of them).
    default_tasks_per_seed: int | None = None
    #: Limit of each task's gain in the fitness (None: no limit).
    default_gain_clip: float | None = None
    #: Whether meta-train tasks are drawn afresh for each evaluation seed.
    default_fresh_tasks = False
    #: Drawn tasks per evaluation seed kept in memory (a few evaluations' worth).
    _SEED_TASKS_KEPT = 64

    def __init__(
        self,
        split: str = "train",
        tasks: Sequence[int] | int | None = None,
        seeds: int = 1,
        worst_weight: float = 0.5,
        worst_tolerance: float = WORST_TOLERANCE,
        suite_seed: int | None = None,
        train_tasks: int | None = None,
        test_tasks: int | None = None,
        tasks_per_seed: int | None = None,
        fresh_tasks: bool | None = None,
        gain_clip: float | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"{self.name} option split must be train or test, got {split!r}")
        self.split = split
        self.seeds_per_evaluation = check_int(self.name, "seeds", seeds, 1)
        if isinstance(worst_weight, bool) or not isinstance(worst_weight, (int, float)) \
                or not 0.0 <= worst_weight <= 1.0:
            raise ValueError(f"{self.name} option worst_weight must be a number in [0, 1], got {worst_weight!r}")
        self.worst_weight = float(worst_weight)
        if isinstance(worst_tolerance, bool) or not isinstance(worst_tolerance, (int, float)) \
                or not 0.0 <= worst_tolerance < math.inf:
            raise ValueError(f"{self.name} option worst_tolerance must be a number >= 0, got {worst_tolerance!r}")
        self.worst_tolerance = float(worst_tolerance)
        gain_clip = self.default_gain_clip if gain_clip is None else gain_clip
        if gain_clip is not None and (isinstance(gain_clip, bool) or not isinstance(gain_clip, (int, float))
                                      or not 0.0 < gain_clip < math.inf):
            raise ValueError(f"{self.name} option gain_clip must be a number > 0, got {gain_clip!r}")
        self.gain_clip = None if gain_clip is None else float(gain_clip)
        self.suite_seed = check_int(self.name, "suite_seed",
                                    self.default_suite_seed if suite_seed is None else suite_seed, 0)
        train_tasks = self.default_train_tasks if train_tasks is None else train_tasks
        test_tasks = self.default_test_tasks if test_tasks is None else test_tasks
        self.counts = {"train": check_int(self.name, "train_tasks", train_tasks, 1),
                       "test": check_int(self.name, "test_tasks", test_tasks, 1)}
        all_tasks = self.split_tasks(split)
        if tasks is None:
            self.tasks = all_tasks
        else:
            indices = [tasks] if isinstance(tasks, int) and not isinstance(tasks, bool) else list(tasks)
            bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(all_tasks)]
            if bad or not indices:
                raise ValueError(f"{self.name} option tasks must be indices in [0, {len(all_tasks)}) of the "
                                 f"{split} split, got {tasks!r}")
            self.tasks = [all_tasks[i] for i in dict.fromkeys(indices)]
        fresh_tasks = self.default_fresh_tasks if fresh_tasks is None else fresh_tasks
        if not isinstance(fresh_tasks, bool):
            raise ValueError(f"{self.name} option fresh_tasks must be true or false, got {fresh_tasks!r}")
        # Fresh draws replace the pool only where the pool would be used: the whole meta-train split.
        self.fresh_tasks = fresh_tasks and split == "train" and tasks is None
        if tasks_per_seed is None:
            tasks_per_seed = self.default_tasks_per_seed if tasks is None and split == "train" else None
        self.tasks_per_seed = (None if tasks_per_seed is None
                               else check_int(self.name, "tasks_per_seed", tasks_per_seed, 1))
        if self.fresh_tasks and self.tasks_per_seed is None:
            self.tasks_per_seed = len(self.tasks)
        if not self.fresh_tasks and self.tasks_per_seed is not None and self.tasks_per_seed >= len(self.tasks):
            self.tasks_per_seed = None  # every task on every seed
        self._seed_tasks: OrderedDict[int, list[Task]] = OrderedDict()
        self._baseline_fn: Callable | None = None
        self._training: OrderedDict[tuple[str, int], Any] = OrderedDict()
        # Room for every problem of a few evaluation-seed sets (the last ones used are kept), and
        # the baseline's score on each (held out too: what DPO scores on a task says something of
        # its truth).
        per_seed = self.tasks_per_seed or len(self.tasks)
        self.held_out.capacity = max(self.held_out.capacity, 8 * per_seed * self.seeds_per_evaluation)

    def validation_options(self) -> dict[str, Any]:
        """Options for the end-of-run validation: the meta-test split, every task of it (the
        engine scores validation on fresh evaluation seeds)."""
        return {"split": "test", "tasks": None, "tasks_per_seed": None}

    # -- tasks ------------------------------------------------------------------------------
    def split_tasks(self, split: str) -> list[Task]:
        """The tasks of ``split`` (deterministic for ``suite_seed``). Meta-train and meta-test
        tasks are drawn from independent streams and keyed apart, so no problem instance is
        shared."""
        if split not in SPLITS:
            raise ValueError(f"split must be train or test, got {split!r}")
        code = _SPLIT_CODES[split]
        rng = np.random.default_rng([self.suite_seed, code])
        specs = self.make_tasks(self.counts[split], split, rng)
        return [
            Task(name=f"{split}-{i}:{self.describe(spec)}", split=split, index=i, spec=spec,
                 key=(self.suite_seed, code, i))
            for i, spec in enumerate(specs)
        ]

    @abstractmethod
    def make_tasks(self, count: int, split: str, rng: np.random.Generator) -> list[Any]:
        """``count`` task specs drawn with ``rng``."""

    def describe(self, spec: Any) -> str:
        """A short readable summary of a task spec (part of the task's name)."""
        return str(spec)

    def task(self, name_or_index: str | int) -> Task:
        """A task of this suite's split, by name or index."""
        for task in self.split_tasks(self.split):
            if name_or_index in (task.name, task.index):
                return task
        raise KeyError(f"{self.name}: no task {name_or_index!r} in the {self.split} split")

    # -- problems: training data (seen by the genome) and held-out truth (never) -------------
    @abstractmethod
    def build_problem(self, task: Task, seed: int) -> tuple[Any, Any]:
        """``(training data, held-out truth)`` of ``task``'s problem instance for ``seed``."""

    def training_data(self, task: Task, seed: int) -> Any:
        """What the training phase of ``task`` receives (a few are cached per process). When
        the problem is built here, its held-out part goes to :attr:`held_out` (unless that was
        wiped: in a genome's process it is dropped before any genome code runs)."""
        key = (task.name, int(seed))
        if key in self._training:
            self._training.move_to_end(key)
            return self._training[key]
        data, truth = build_secretly(self.build_problem, task, seed)
        if not self.held_out.wiped:
            self.held_out.put(key, truth)
        del truth
        self._training[key] = data
        while len(self._training) > self.held_out.capacity:
            self._training.popitem(last=False)
        return data

    def truth(self, task: Task, seed: int) -> Any:
        """The held-out part of ``task``'s problem for ``seed`` (scoring phase only)."""
        return self.held_out.get((task.name, int(seed)), lambda: build_secretly(self.build_problem, task, seed)[1])

    # -- the two phases, per task -----------------------------------------------------------
    @abstractmethod
    def parameter_spec(self, task: Task) -> dict[str, TensorSpec]:
        """Shapes and dtypes of the parameters :meth:`train_task` returns for ``task``."""

    @abstractmethod
    def train_task(self, fn: Callable, task: Task, seed: int) -> dict[str, torch.Tensor]:
        """Train with ``fn`` as the loss on ``task``'s training data; the trained parameters.
        The only code that runs the genome.

        Raises:
            GenomeError: (status ``error``) when the loss breaks training, naming the task.
        """

    @abstractmethod
    def score_task(self, parameters: dict[str, torch.Tensor], task: Task, seed: int) -> float:
        """The normalised score of trained ``parameters`` on ``task`` (no genome code runs)."""

    # -- the plug-in contract's phases over the whole suite ---------------------------------
    def evaluation_seeds(self, seed: int) -> list[int]:
        """The evaluation seeds one evaluation uses."""
        return [int(seed) + k for k in range(self.seeds_per_evaluation)]

    def tasks_for(self, seed: int) -> list[Task]:
        """The tasks scored on evaluation ``seed``: every task of the suite, or, with
        ``tasks_per_seed``, that many drawn by the seed: from the suite's tasks, or, with
        ``fresh_tasks``, new tasks from the generator (:meth:`fresh_tasks_for`). The same for
        every candidate and the baseline on that seed, so gains stay paired; other seeds draw
        other tasks, so a candidate re-measured on fresh seeds is also measured on other tasks."""
        if self.tasks_per_seed is None:
            return list(self.tasks)
        seed = int(seed)
        if self.fresh_tasks:
            return self.fresh_tasks_for(seed)
        rng = np.random.default_rng([self.suite_seed, _SPLIT_CODES[self.split], 0x7A5C,
                                     *seed_words(seed)])
        chosen = sorted(rng.choice(len(self.tasks), size=self.tasks_per_seed, replace=False).tolist())
        return [self.tasks[i] for i in chosen]

    def fresh_tasks_for(self, seed: int) -> list[Task]:
        """``tasks_per_seed`` meta-train tasks drawn from the generator for evaluation ``seed``
        alone (keyed apart from the pool and from every other seed's), each kept only if
        :meth:`usable`; a rejected draw is replaced by the next one.

        Runs in the trusted process (:meth:`prepare` draws them before a genome's process is
        forked, which inherits the list): :meth:`usable` may score the baseline on held-out data.
        """
        seed = int(seed)
        if seed in self._seed_tasks:
            self._seed_tasks.move_to_end(seed)
            return list(self._seed_tasks[seed])
        if self.held_out.wiped:
            raise RuntimeError(f"{self.name}: the tasks of evaluation seed {seed} are drawn in the trusted "
                               "process (prepare()), not in a genome's process")
        code = _SPLIT_CODES["train"]
        words = seed_words(seed)
        rng = np.random.default_rng([self.suite_seed, code, 0xF2E5, *words])
        wanted, drawn, chosen = self.tasks_per_seed, 0, []
        while len(chosen) < wanted:
            if drawn >= 8 * wanted:
                raise RuntimeError(f"{self.name}: only {len(chosen)} of {drawn} tasks drawn for evaluation seed "
                                   f"{seed} are usable; the task family is mostly unusable")
            for spec in self.make_tasks(wanted, "train", rng):
                task = Task(name=f"train@{seed}.{drawn}:{self.describe(spec)}", split="train", index=drawn,
                            spec=spec, key=(self.suite_seed, code, 0xF2E5, *words, drawn))
                drawn += 1
                if self.usable(task, seed):
                    chosen.append(task)
                    if len(chosen) == wanted:
                        break
        self._seed_tasks[seed] = chosen
        while len(self._seed_tasks) > self._SEED_TASKS_KEPT:
            self._seed_tasks.popitem(last=False)
        return list(chosen)

    def usable(self, task: Task, seed: int) -> bool:
        """Whether a freshly drawn ``task`` is kept for evaluation ``seed`` (trusted; default:
        every task). A suite rejects tasks on which its normalised scores mean nothing."""
        return True

    def prepare(self, seed: int) -> None:
        """Build every problem of this evaluation (training data and held-out truth) before a
        genome's process is forked from this one: it inherits the training data and its copy
        of the held-out store is wiped. With a truth key, in one builder process for all of
        them (:func:`fitness.truth.build_secretly`), which also draws the tasks and scores the
        baseline on each; this process takes what it made."""
        if self._prepared(seed):
            return
        made = build_secretly(self._prepare_here, seed)
        if made is not None:
            training, held_out, seed_tasks = made
            self._training, self._seed_tasks = training, seed_tasks
            self.held_out.restore(held_out)

    def _prepared(self, seed: int) -> bool:
        """Whether every problem of this evaluation, and the baseline's score on it, is here."""
        for s in map(int, self.evaluation_seeds(seed)):
            if self.fresh_tasks and self.tasks_per_seed is not None and s not in self._seed_tasks:
                return False  # drawing the tasks builds problems
            for task in self.tasks_for(s):
                if (task.name, s) not in self._training or (task.name, s) not in self.held_out \
                        or ("baseline", task.name, s) not in self.held_out:
                    return False
        return True

    def _prepare_here(self, seed: int) -> tuple[Any, dict, Any] | None:
        for s in self.evaluation_seeds(seed):
            for task in self.tasks_for(s):
                self.training_data(task, s)
                self.truth(task, s)
                self.baseline_score(task, s)
        if not in_builder():
            return None
        return self._training, self.held_out.snapshot(), self._seed_tasks

    def artefact_spec(self, seed: int) -> dict[str, TensorSpec]:
        spec = {}
        for s in self.evaluation_seeds(seed):
            for task in self.tasks_for(s):
                for name, tensor in self.parameter_spec(task).items():
                    spec[f"{task.index}:{s}:{name}"] = tensor
        return spec

    def train(self, fn: Callable, seed: int) -> Artefacts:
        artefacts: Artefacts = {}
        for s in self.evaluation_seeds(seed):
            for task in self.tasks_for(s):
                for name, tensor in self.train_task(fn, task, s).items():
                    artefacts[f"{task.index}:{s}:{name}"] = tensor
        return artefacts

    def score(self, artefacts: Artefacts, seed: int) -> Score:
        start = time.perf_counter()
        results = []
        for s in self.evaluation_seeds(seed):
            for task in self.tasks_for(s):
                prefix = f"{task.index}:{s}:"
                parameters = {name[len(prefix):]: value for name, value in artefacts.items() if name.startswith(prefix)}
                results.append(TaskResult(task.name, s, self.score_task(parameters, task, s),
                                          self.baseline_score(task, s)))
        summary = aggregate(results, self.worst_weight, self.worst_tolerance, self.gain_clip)
        if self.gain_clip is None:
            mean, worst, clip = "mean_gain", "worst_gain", ""
        else:
            mean, worst = "clipped_mean_gain", "clipped worst gain"
            clip = f"; each task's gain limited to +-{self.gain_clip:g}"
        metrics = {
            "split": self.split,
            "fitness_rule": f"{1 - self.worst_weight:g} * {mean} + {self.worst_weight:g} * "
                            f"min({mean}, {worst} + {self.worst_tolerance:g}) "
                            f"(gain = score - {self.baseline} score, same task and seed{clip})",
            **{k: v for k, v in summary.items() if k != "fitness"},
            "mean_score": float(np.mean([r.score for r in results])),
            "mean_baseline": float(np.mean([r.baseline for r in results])),
            "results": [r.as_record() for r in results],
            "score_seconds": time.perf_counter() - start,
        }
        return Score(fitness=summary["fitness"], metrics=metrics)

    # -- the baseline and in-process helpers ------------------------------------------------
    def baseline_function(self) -> Callable:
        """The compiled baseline seed (DPO, cross-entropy): trusted code."""
        if self._baseline_fn is None:
            seed = next(s for s in self.seeds() if s.name == self.baseline)
            self._baseline_fn = compile_genome(seed.code, self.interface.arg_counts)
        return self._baseline_fn

    def baseline_score(self, task: Task, seed: int) -> float:
        """The baseline's score on ``task`` and ``seed`` (trained once per process). Kept in
        :attr:`held_out`, as a tensor: a genome's process must not find it (it is computed on
        the truth) and the wipe zeroes tensors."""

        def make() -> torch.Tensor:
            parameters = self.train_task(self.baseline_function(), task, seed)
            return torch.tensor(self.score_task(parameters, task, seed), dtype=torch.float64)

        return float(self.held_out.get(("baseline", task.name, int(seed)), make))

    def evaluate_task(self, fn: Callable, task: Task, seed: int) -> TaskResult:
        """Train and score ``fn`` on one task and seed in this process, paired with the
        baseline (benchmarks, validation scripts, notebooks)."""
        baseline = self.baseline_score(task, seed)
        start = time.perf_counter()
        value = self.score_task(self.train_task(fn, task, seed), task, seed)
        return TaskResult(task.name, int(seed), value, baseline, time.perf_counter() - start)

    def evaluate_many(self, fn: Callable, seeds: Iterable[int],
                      tasks: Sequence[Task] | None = None) -> list[TaskResult]:
        """Every (task, seed) pair of ``tasks`` (default: this suite's) and ``seeds``, in this process."""
        tasks = self.tasks if tasks is None else tasks
        return [self.evaluate_task(fn, task, seed) for seed in seeds for task in tasks]


def results_from_metrics(metrics: dict[str, Any]) -> list[TaskResult]:
    """The per-(task, seed) results stored in a suite evaluation's metrics (for re-aggregating
    evaluations on more seeds without re-running any)."""
    return [TaskResult(r["task"], int(r["seed"]), float(r["score"]), float(r["baseline"]), float(r.get("seconds", 0)))
            for r in metrics.get("results", [])]


def check_losses(losses: object, expected: int, task_name: str, step: int) -> torch.Tensor:
    """The per-example losses of one training step, checked; raises :class:`GenomeError`
    naming the task and step."""
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (expected,):
        found = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise GenomeError(f"task {task_name}: the loss returned {found} at training step {step}; "
                          f"expected shape ({expected},)", status="error")
    if not losses.is_floating_point():
        raise GenomeError(f"task {task_name}: the loss returned dtype {losses.dtype} at training step {step}",
                          status="error")
    return losses
