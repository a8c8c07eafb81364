"""The Optuna study over the calibration's parameters (see :mod:`psydef.calibration.rule`).

Search space: ``delta_c`` in ``[-delta_bound, delta_bound]`` for every level but 7 (``delta_7 = 0``:
the argmax is unchanged by adding a constant to delta, so one entry is fixed), ``stick_1..stick_{m-1}``
in [0, 1] mapped to the members' blend weights by :func:`psydef.calibration.rule.simplex_weights`, and
``tau7`` in ``tau7_range`` when the gate is on. The objective is the official macro-F1 on the OOF rows.

Trials are asked, scored and told in batches: every batch is scored in one vectorised numpy pass.
For ``sampler="random"`` the library's per-trial ask/tell bookkeeping costs more than the scoring, so
the batch is drawn in bulk with numpy (uniform over the same distributions, seeded by the seed and
the number of trials already complete) and recorded with ``study.add_trials``: 2.5x less Optuna
overhead than ask/tell, and the same trials, distributions and values in the study.

Storage and sharing: ``None`` (in memory), ``sqlite:///path.db`` or ``postgresql+psycopg2://...``
(Optuna's RDBStorage; PostgreSQL is what tuners on several machines share), or a journal file
(``path.journal`` or ``journal://path``; JournalStorage + JournalFileBackend). The study is loaded if
it exists, and ``n_trials`` is the number of COMPLETE trials the study should end with, so a second
call resumes it. A stored study is searched on an in-memory mirror (``bench/search.py --storages``:
TPE asked and told on the storage itself took 1.7x (PostgreSQL) to 2-6x (SQLite, journal) as long on a
busy 2-core machine); each batch,
under the study's cross-process lock (a PostgreSQL advisory lock on the study's name, or an exclusive
``fcntl`` lock on ``<file>.study-lock`` for the file storages), a process copies into its mirror the
trials others stored, counts the complete trials, runs ``min(batch, n_trials - complete)`` new ones
on the mirror and writes them back with ``add_trials``. Batches of different processes never
overlap, so the study ends with exactly ``n_trials`` trials, all complete, and each batch's sampler
has seen every trial stored before it. Give each process its own ``seed``, as Optuna advises for
parallel samplers.
"""
from __future__ import annotations

import fcntl
import importlib.util
import math
import os
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from tqdm.auto import tqdm

from psydef.calibration import SAMPLERS
from psydef.calibration.estimate import GainEstimate, estimate_gain
from psydef.calibration.rule import EnsembleSpec, simplex_weights
from psydef.calibration.score import CandidateScorer, per_class_f1
from psydef.core.labels import HIGH_ADAPTIVE, N_LEVELS

DEFAULT_BATCH = {"tpe": 8, "random": 1024}  # cmaes: one generation (its population size)
LOCK_SUFFIX = ".study-lock"
POSTGRES_PREFIX = "postgresql+psycopg2:"


# ---------------------------------------------------------------------------------------------
# Search space


@dataclass(frozen=True)
class SearchSpace:
    n_members: int
    gate: bool = True
    delta_bound: float = 3.0
    tau7_range: tuple[float, float] = (0.3, 0.99)

    def __post_init__(self):
        if self.n_members < 1:
            raise ValueError(f"n_members must be >= 1; got {self.n_members}.")
        if not (math.isfinite(self.delta_bound) and self.delta_bound > 0):
            raise ValueError(f"delta_bound must be a positive number; got {self.delta_bound}.")
        lo, hi = self.tau7_range
        if not 0 < lo < hi <= 1:
            raise ValueError(f"tau7_range must satisfy 0 < low < high <= 1; got {self.tau7_range}.")

    @property
    def delta_levels(self) -> list[int]:
        return [c for c in range(N_LEVELS) if c != HIGH_ADAPTIVE]

    def distributions(self) -> dict[str, FloatDistribution]:
        """Parameter name -> distribution, in the column order of :meth:`to_arrays`' input."""
        dists = {f"delta_{c}": FloatDistribution(-self.delta_bound, self.delta_bound) for c in self.delta_levels}
        dists.update({f"stick_{i}": FloatDistribution(0.0, 1.0) for i in range(1, self.n_members)})
        if self.gate:
            dists["tau7"] = FloatDistribution(*self.tau7_range)
        return dists

    def params_matrix(self, params_list: Sequence[dict]) -> np.ndarray:
        names = list(self.distributions())
        return np.array([[p[name] for name in names] for p in params_list], dtype=np.float64).reshape(-1, len(names))

    def to_arrays(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(k, n_params) parameter rows -> weights (k, m), deltas (k, 9), tau7s (k,) or None."""
        n_delta, n_stick = len(self.delta_levels), self.n_members - 1
        deltas = np.zeros((x.shape[0], N_LEVELS))
        deltas[:, self.delta_levels] = x[:, :n_delta]
        weights = simplex_weights(x[:, n_delta:n_delta + n_stick])
        return weights, deltas, x[:, -1] if self.gate else None

    def candidate(self, params: dict) -> tuple[np.ndarray, np.ndarray, float | None]:
        """One trial's params -> (weights (m,), delta (9,), tau7 or None)."""
        w, d, t = self.to_arrays(self.params_matrix([params]))
        return w[0], d[0], None if t is None else float(t[0])

    def plain_params(self) -> dict[str, float]:
        """The plain blend as a point of the space: no bias, equal weights (the stick-breaking parameters
        that :func:`simplex_weights` maps to 1/m each) and, with the gate, its highest threshold (a
        ``p_7`` that high is the argmax anyway)."""
        m = self.n_members
        params = {f"delta_{c}": 0.0 for c in self.delta_levels}
        params.update({f"stick_{i}": 1.0 - ((m - i) / (m - i + 1)) ** (m - i) for i in range(1, m)})
        if self.gate:
            params["tau7"] = self.tau7_range[1]
        return params

    def sample(self, rng: np.random.Generator, k: int) -> np.ndarray:
        """(k, n_params) rows drawn uniformly from the distributions (what RandomSampler draws)."""
        dists = self.distributions().values()
        return rng.uniform([d.low for d in dists], [d.high for d in dists], size=(k, len(dists)))


def make_sampler(name: str, seed: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # Multivariate by default for one objective; the constant liar spreads out a batch's asks.
        return optuna.samplers.TPESampler(seed=seed)
    if name == "cmaes":
        if importlib.util.find_spec("cmaes") is None:
            raise ImportError("sampler='cmaes' needs the cmaes package: pip install cmaes")
        return optuna.samplers.CmaEsSampler(seed=seed, popsize=_cma_popsize(space), warn_independent_sampling=False)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"Unknown sampler {name!r}; choose one of {SAMPLERS}.")


def _cma_popsize(space: SearchSpace) -> int:
    return 4 + int(3 * math.log(len(space.distributions())))  # CMA-ES's default population size


# ---------------------------------------------------------------------------------------------
# Storage


def _parse_storage(storage) -> tuple[str, str] | None:
    """None (in memory), or (kind, address): ("sqlite", file), ("journal", file) or ("postgresql", URL)."""
    if storage is None:
        return None
    s = os.fspath(storage)
    if s.startswith("sqlite:///"):
        path = s[len("sqlite:///"):]
        if path in ("", ":memory:"):
            raise ValueError("An in-memory SQLite study cannot be shared or resumed; use storage=None instead.")
        return "sqlite", path
    if s.startswith(POSTGRES_PREFIX):
        return "postgresql", s
    if s.startswith("postgresql"):
        raise ValueError(f"Unsupported storage {_masked(s)!r}: name the driver, {POSTGRES_PREFIX}//USER@HOST/DB "
                         "(SQLAlchemy maps a bare postgresql:// to psycopg 3, which psydef does not install).")
    if s.startswith("journal://"):
        return "journal", s[len("journal://"):]
    if s.endswith(".journal"):
        return "journal", s
    raise ValueError(f"Unsupported storage {_masked(s)!r}: use None, 'sqlite:///path.db', "
                     f"'{POSTGRES_PREFIX}//USER@HOST:PORT/DB', 'path.journal' or 'journal://path'.")


def _masked(address: str) -> str:
    """user:password@ -> user:***@, for messages."""
    return re.sub(r"(://[^/:@]*):[^/@]*@", r"\1:***@", address)


def _open_storage(parsed: tuple[str, str] | None) -> optuna.storages.BaseStorage | None:
    if parsed is None:
        return None
    kind, address = parsed
    if kind == "journal":
        return JournalStorage(JournalFileBackend(address))
    return RDBStorage(f"sqlite:///{address}" if kind == "sqlite" else address)


class _StudyLock:
    """The cross-process lock of one study (a no-op in memory): a PostgreSQL advisory lock on its
    name, held on one connection for the whole search; else ``fcntl`` on ``<file>.study-lock``."""

    def __init__(self, parsed: tuple[str, str] | None, study_name: str):
        self.parsed, self.study_name, self._connection = parsed, study_name, None

    @contextmanager
    def __call__(self):
        if self.parsed is None:
            yield
        elif self.parsed[0] == "postgresql":
            from sqlalchemy import text

            if self._connection is None:
                import sqlalchemy

                self._connection = sqlalchemy.create_engine(self.parsed[1], poolclass=sqlalchemy.pool.NullPool).connect()
            key = {"key": f"psydef-study:{self.study_name}"}
            self._connection.execute(text("SELECT pg_advisory_lock(hashtext(:key))"), key)
            try:
                yield
            finally:
                self._connection.execute(text("SELECT pg_advisory_unlock(hashtext(:key))"), key)
                self._connection.commit()
        else:
            with open(f"{self.parsed[1]}{LOCK_SUFFIX}", "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _n_complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _check_same_space(study: optuna.Study, space: SearchSpace) -> None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete and complete[0].distributions != space.distributions():
        raise ValueError(f"Study {study.study_name!r} was run over parameters {sorted(complete[0].distributions)}; "
                         f"this search is over {sorted(space.distributions())} (members, gate or bounds differ).")


def load_study(storage, study_name: str = "calibration") -> optuna.Study:
    """An existing study from ``storage`` (any address :func:`run_study` accepts but None), to read."""
    parsed = _parse_storage(storage)
    if parsed is None:
        raise ValueError("An in-memory study cannot be loaded: use SearchResult.study.")
    lock = _StudyLock(parsed, study_name)
    try:
        with lock():
            return optuna.load_study(study_name=study_name, storage=_open_storage(parsed))
    finally:
        lock.close()


# ---------------------------------------------------------------------------------------------
# The study


@dataclass
class SearchResult:
    study: optuna.Study
    space: SearchSpace
    n_new_trials: int  # trials this call completed (the study may hold others, from earlier or other processes)

    @property
    def best_value(self) -> float:
        return float(self.study.best_value)

    @property
    def best_params(self) -> dict:
        return self.study.best_params

    def best_candidate(self) -> tuple[np.ndarray, np.ndarray, float | None]:
        """(weights (m,), delta (9,), tau7 or None) of the best trial."""
        return self.space.candidate(self.best_params)

    def spec(self, run_ids: Sequence[str], data_digest: str = "", metrics: dict | None = None) -> EnsembleSpec:
        if len(run_ids) != self.space.n_members:
            raise ValueError(f"Expected {self.space.n_members} run ids (one per member); got {len(run_ids)}.")
        weights, delta, tau7 = self.best_candidate()
        return EnsembleSpec(members=[{"run_id": r, "weight": float(w)} for r, w in zip(run_ids, weights)],
                            delta=delta.tolist(), tau7=tau7, data_digest=data_digest, metrics=metrics or {})

    def trials_dataframe(self):
        return self.study.trials_dataframe()

    def best_so_far(self) -> np.ndarray:
        """Running best value over the complete trials, in trial-number order."""
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return np.maximum.accumulate(np.array([t.value for t in complete], dtype=np.float64))

    def plot_history(self, interactive: bool = False):
        """Optuna's optimization history: a matplotlib figure, or a plotly one with ``interactive``
        (needs plotly: :func:`interactive_plots`)."""
        return _plot("plot_optimization_history", self.study, interactive)

    def plot_importances(self, interactive: bool = False):
        """Parameter importances (Optuna's default PED-ANOVA evaluator: seconds even for 22,000 trials),
        as :meth:`plot_history` draws them."""
        return _plot("plot_param_importances", self.study, interactive)


def interactive_plots() -> bool:
    """Whether Optuna's plotly plots can be drawn (plotly installed: the ``plots`` extra)."""
    return optuna.visualization.is_available()


def _plot(name: str, study: optuna.Study, interactive: bool):
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if interactive:
            return getattr(optuna.visualization, name)(study)
        figure = getattr(optuna.visualization.matplotlib, name)(study).figure
    figure.tight_layout()
    plt.close(figure)  # out of pyplot's registry (Optuna draws with pyplot): freed once the caller drops it
    return figure


def run_study(scorer: CandidateScorer, *, n_trials: int, sampler: str = "tpe", seed: int = 0, gate: bool = True,
              delta_bound: float = 3.0, storage=None, study_name: str = "calibration", batch_size: int | None = None,
              timeout: float | None = None, show_progress: bool = True) -> SearchResult:
    """Maximise the official macro-F1 of ``scorer``'s members over the calibration parameters until
    the study holds ``n_trials`` complete trials (or ``timeout`` seconds have passed: the batch
    running then is finished)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; choose one of {SAMPLERS}.")
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1; got {n_trials}.")
    space = SearchSpace(scorer.n_members, gate, delta_bound)
    batch = batch_size if batch_size is not None else DEFAULT_BATCH.get(sampler) or _cma_popsize(space)
    if batch < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch}.")
    optuna_sampler = make_sampler(sampler, seed, space)

    lock = _StudyLock(_parse_storage(storage), study_name)
    try:
        with lock():  # creating tables or a study must not race another process
            study = optuna.create_study(storage=_open_storage(lock.parsed), sampler=optuna_sampler,
                                        study_name=study_name, direction="maximize", load_if_exists=True)
            _check_same_space(study, space)
            done = _n_complete(study)
        # A stored study is searched on an in-memory mirror and only complete trials are written back:
        # one write per trial instead of a dozen (ask, each parameter, tell), and nothing half-done is
        # ever stored, even when a batch is interrupted.
        mirror = study if lock.parsed is None else optuna.create_study(sampler=optuna_sampler, direction="maximize")
        n_new, start = 0, time.monotonic()
        with tqdm(total=n_trials, initial=min(done, n_trials), desc=f"{sampler} search", unit="trial",
                  disable=not show_progress) as bar:
            while timeout is None or time.monotonic() - start < timeout:
                with lock():
                    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if mirror is not study:  # catch up with trials stored by earlier runs or other processes
                        mirror.add_trials(complete[len(mirror.get_trials(deepcopy=False)):])
                    done = len(complete)
                    k = min(batch, n_trials - done)
                    if k > 0:
                        if done == 0:  # the plain blend is the first trial: the search never ends below it
                            _add_trials(mirror, space, scorer, space.params_matrix([space.plain_params()]))
                        searched = k - (done == 0)
                        if sampler == "random" and searched:
                            _add_trials(mirror, space, scorer, space.sample(np.random.default_rng([seed, done]), searched))
                        elif searched:
                            _ask_tell_batch(mirror, space, scorer, searched)
                        if mirror is not study:
                            study.add_trials(mirror.get_trials(deepcopy=False)[-k:])
                if k <= 0:
                    break
                n_new += k
                bar.update(done + k - bar.n)
    finally:
        lock.close()
    return SearchResult(study, space, n_new)


def _add_trials(study, space: SearchSpace, scorer: CandidateScorer, x: np.ndarray) -> None:
    """Score the parameter rows ``x`` and add them to ``study`` as complete trials."""
    values = scorer.score(*space.to_arrays(x))
    dists = space.distributions()
    names = list(dists)
    study.add_trials(optuna.trial.create_trial(params=dict(zip(names, row.tolist())), distributions=dists, value=v)
                     for row, v in zip(x, values.tolist()))


def _ask_tell_batch(study, space: SearchSpace, scorer: CandidateScorer, k: int) -> None:
    dists = space.distributions()
    trials = [study.ask(fixed_distributions=dists) for _ in range(k)]
    values = scorer.score(*space.to_arrays(space.params_matrix([t.params for t in trials])))
    for t, v in zip(trials, values.tolist()):
        study.tell(t, v)


# ---------------------------------------------------------------------------------------------
# Members


def align_members(members: Sequence[tuple[str, Sequence, np.ndarray | None]]) -> tuple[list, list[np.ndarray]]:
    """``[(run_id, ids, logits), ...]`` -> (ids, [logits per member]) with every member's rows in
    the first member's id order. Refuses members without (n, 9) logits, with duplicate ids, or
    whose set of ids differs from the first member's."""
    if not members:
        raise ValueError("align_members needs at least one member.")
    ref_run, ref_ids = members[0][0], list(members[0][1])
    aligned = []
    for run_id, ids, logits in members:
        ids = list(ids)
        if logits is None or np.size(logits) == 0:
            raise ValueError(f"Run {run_id} has no OOF logits.")
        logits = np.asarray(logits, dtype=np.float64)
        if logits.shape != (len(ids), N_LEVELS) or not np.isfinite(logits).all():
            raise ValueError(f"Run {run_id}'s OOF logits must be finite with shape ({len(ids)}, {N_LEVELS}) "
                             f"(one row per OOF id); got shape {logits.shape}.")
        position = {i: row for row, i in enumerate(ids)}
        if len(position) != len(ids):
            raise ValueError(f"Run {run_id} has {len(ids) - len(position)} duplicate OOF ids.")
        missing = [i for i in ref_ids if i not in position]
        extra = len(ids) - (len(ref_ids) - len(missing))
        if missing or extra:
            raise ValueError(
                f"Runs {ref_run} and {run_id} have different OOF ids: {len(missing)} of {ref_run}'s ids are "
                f"missing from {run_id} and {extra} of {run_id}'s are not in {ref_run} "
                f"(e.g. {(missing or [i for i in ids if i not in set(ref_ids)])[:3]}).")
        aligned.append(logits[[position[i] for i in ref_ids]])
    return ref_ids, aligned


# ---------------------------------------------------------------------------------------------
# The whole calibration of one OOF bundle


def _fit_inner_rule(fit_logits, fit_y, split: int, *, run_ids: list[str], n_trials: int, seed: int, verbosity: int,
                    **options) -> Callable[[list], np.ndarray]:
    """One search of the gain estimate (module level, so that worker processes can run it): the decoder
    of its best rule. ``verbosity``: the caller's Optuna verbosity, which a worker process does not inherit."""
    optuna.logging.set_verbosity(verbosity)
    inner = run_study(CandidateScorer.from_logits(fit_logits, fit_y), n_trials=n_trials, seed=seed + 1 + split,
                      show_progress=False, **options)
    return inner.spec(run_ids).decode_logits


@dataclass
class CalibrationReport:
    """The search on all OOF rows, the estimate of what it gains on unseen rows, and the rule chosen:
    the calibrated one only when its estimated gain over the plain blend is positive."""

    raw_f1: float  # the plain blend (equal weights, plain argmax) on all OOF rows: fits nothing, so honest
    calibrated_in_sample_f1: float  # the study's best on the rows it was searched on: optimistic
    estimate: GainEstimate  # the calibration's gain on rows its search never saw
    calibrated: bool  # the choice: the calibrated rule (True) or the plain blend (False)
    spec: EnsembleSpec  # the chosen rule
    per_class_f1: dict[int, float]  # every level's OOF F1 under the chosen rule (in-sample when calibrated)
    search: SearchResult

    @property
    def estimated_f1(self) -> float:
        """Estimated macro-F1 of the chosen rule on unseen rows (what versions are compared by)."""
        return self.estimate.calibrated_f1 if self.calibrated else self.raw_f1

    @property
    def reason(self) -> str:
        e = self.estimate
        verdict = ("positive: the calibrated rule is kept" if self.calibrated
                   else "not positive: the plain blend (equal weights, delta 0, no gate) is kept")
        return (f"estimated gain of the calibration over the plain blend on unseen rows {e.gain:+.4f} (mean of "
                f"{e.fold_gain.size} held-out folds, spread {e.gain_fold_std:.4f}; estimated calibrated "
                f"{e.calibrated_f1:.4f} vs plain {e.plain_f1:.4f}, in-sample calibrated "
                f"{self.calibrated_in_sample_f1:.4f}) is {verdict}")

    def trials_dataframe(self):
        return self.search.trials_dataframe()


def calibrate_oof(logits_by_member: Sequence, y_true, *, run_ids: Sequence[str] | None = None,
                  data_digest: str = "", sampler: str = "tpe", n_trials: int = 2000, inner_n_trials: int = 500,
                  gate: bool = True, delta_bound: float = 3.0, n_splits: int = 5, n_repeats: int = 2, seed: int = 0,
                  groups=None, storage=None, study_name: str = "calibration", n_jobs: int = 1,
                  show_progress: bool = True) -> CalibrationReport:
    """Calibrate the ensemble of ``logits_by_member`` (aligned OOF logits, see :func:`align_members`)
    on all OOF rows; estimate what that gains over the plain blend on unseen rows by rerunning the
    search (``inner_n_trials`` trials) in ``n_repeats`` x ``n_splits`` record-level folds
    (:func:`psydef.calibration.estimate.estimate_gain`); keep the calibrated rule only when that gain
    is positive, the plain blend otherwise. ``groups`` (dialogue ids) makes those folds grouped: only to
    measure what grouping does (``bench/calibration_estimate.py``).

    ``n_jobs`` is how many processes work at once (-1: one per CPU): this one runs the main search while
    ``n_jobs - 1`` worker processes run the estimate's searches. Every search is seeded on its own, so
    the report is the same as with ``n_jobs=1``, where they all run here, one after the other."""
    scorer = CandidateScorer.from_logits(logits_by_member, y_true)
    m = scorer.n_members
    run_ids = list(run_ids) if run_ids is not None else [f"member_{i}" for i in range(m)]
    options = dict(sampler=sampler, gate=gate, delta_bound=delta_bound)
    fit = partial(_fit_inner_rule, run_ids=run_ids, n_trials=inner_n_trials, seed=seed,
                  verbosity=optuna.logging.get_verbosity(), **options)
    if n_jobs == 0 or n_jobs < -1:
        raise ValueError(f"n_jobs must be -1 (one per CPU) or >= 1; got {n_jobs}.")
    processes = (os.cpu_count() or 1 if n_jobs == -1 else n_jobs) - 1
    estimating = partial(estimate_gain, fit, logits_by_member, y_true, n_splits=n_splits, n_repeats=n_repeats,
                         seed=seed, groups=groups, processes=processes, show_progress=show_progress)
    searching = partial(run_study, scorer, n_trials=n_trials, seed=seed, storage=storage, study_name=study_name,
                        show_progress=show_progress, **options)
    if processes == 0:
        search, estimate = searching(), estimating()
    else:
        with ThreadPoolExecutor(max_workers=1) as pool:  # this thread only waits on the worker processes
            estimate_future = pool.submit(estimating)
            search = searching()
            estimate = estimate_future.result()
    calibrated = estimate.gain > 0
    spec = search.spec(run_ids, data_digest) if calibrated else EnsembleSpec.plain(run_ids, data_digest=data_digest)
    pred = spec.decode_logits(logits_by_member)
    return CalibrationReport(
        raw_f1=estimate.plain_f1,
        calibrated_in_sample_f1=search.best_value,
        estimate=estimate,
        calibrated=calibrated,
        spec=spec,
        per_class_f1=dict(enumerate(per_class_f1(scorer.y_true, pred).tolist())),
        search=search,
    )
