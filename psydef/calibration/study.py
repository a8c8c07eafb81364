"""The Optuna study over the calibration's parameters (see :mod:`psydef.calibration.rule`).

Search space: ``delta_c`` in ``[-delta_bound, delta_bound]`` for every level but 7 (``delta_7 = 0``:
the argmax is unchanged by adding a constant to delta, so one entry is fixed), ``stick_1..stick_{m-1}``
in [0, 1] mapped to the members' blend weights by :func:`psydef.calibration.rule.simplex_weights`, and
``tau7`` in ``tau7_range`` when the gate is on. The objective is the official macro-F1 on the OOF rows.
The first trial of every study is the plain blend, so the search never ends below it.

Trials are asked, scored and told in batches: every batch is scored in one vectorised numpy pass.
For ``sampler="random"`` the batch is drawn in bulk with numpy (uniform over the same distributions,
seeded by the seed and the number of trials already complete) and recorded with ``study.add_trials``,
without Optuna's per-trial ask/tell bookkeeping: the same trials, distributions and values in the study.

Storage and sharing (:mod:`psydef.calibration.storage`): the study is loaded if it exists, and
``n_trials`` is the number of COMPLETE trials the study should end with, so a second call resumes it.
A stored study is searched on an in-memory mirror (``bench/search.py --storages`` compares it with
asking and telling on the storage itself); each batch, under the study's cross-process lock, a process
copies into its mirror the trials others stored, counts the complete trials, runs
``min(batch, n_trials - complete)`` new ones on the mirror and writes them back with ``add_trials``.
Batches of different processes never overlap, so the study ends with exactly ``n_trials`` trials, all
complete, and each batch's sampler has seen every trial stored before it. Give each process its own
``seed``, as Optuna advises for parallel samplers.
"""
from __future__ import annotations

import importlib.util
import math
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from tqdm.auto import tqdm

from psydef.calibration import SAMPLERS
from psydef.calibration.rule import EnsembleSpec, simplex_weights
from psydef.calibration.score import CandidateScorer
from psydef.calibration.storage import StudyLock, open_storage, parse_storage
from psydef.core.labels import HIGH_ADAPTIVE, N_LEVELS

DEFAULT_BATCH = {"tpe": 8, "random": 1024}  # cmaes: one generation (its population size)


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
# The study


def complete_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's COMPLETE trials in trial-number order (not copied: read them, do not change them)."""
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _check_same_space(study: optuna.Study, space: SearchSpace) -> None:
    complete = complete_trials(study)
    if complete and complete[0].distributions != space.distributions():
        raise ValueError(f"Study {study.study_name!r} was run over parameters {sorted(complete[0].distributions)}; "
                         f"this search is over {sorted(space.distributions())} (members, gate or bounds differ).")


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
        complete = complete_trials(self.study)
        return np.maximum.accumulate(np.array([t.value for t in complete], dtype=np.float64))

    def plot_history(self, interactive: bool = False):
        """Optuna's optimization history: a matplotlib figure, or a plotly one with ``interactive``
        (needs plotly: :func:`interactive_plots`)."""
        return _plot("plot_optimization_history", self.study, interactive)

    def plot_importances(self, interactive: bool = False):
        """Parameter importances (Optuna's default PED-ANOVA evaluator),
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

    lock = StudyLock(parse_storage(storage), study_name)
    try:
        with lock():  # creating tables or a study must not race another process
            study = optuna.create_study(storage=open_storage(lock.parsed), sampler=optuna_sampler,
                                        study_name=study_name, direction="maximize", load_if_exists=True)
            _check_same_space(study, space)
            done = len(complete_trials(study))
        # A stored study is searched on an in-memory mirror and only complete trials are written back:
        # one write per trial instead of a dozen (ask, each parameter, tell), and nothing half-done is
        # ever stored, even when a batch is interrupted.
        mirror = study if lock.parsed is None else optuna.create_study(sampler=optuna_sampler, direction="maximize")
        run_batch = partial(_run_batch, lock, study, mirror, space, scorer, sampler=sampler, seed=seed, batch=batch,
                            n_trials=n_trials)
        n_new, start = 0, time.monotonic()
        with tqdm(total=n_trials, initial=min(done, n_trials), desc=f"{sampler} search", unit="trial",
                  disable=not show_progress) as bar:
            while timeout is None or time.monotonic() - start < timeout:
                done, k = run_batch()
                if k == 0:
                    break
                n_new += k
                bar.update(done + k - bar.n)
    finally:
        lock.close()
    return SearchResult(study, space, n_new)


def _run_batch(lock: StudyLock, study: optuna.Study, mirror: optuna.Study, space: SearchSpace,
               scorer: CandidateScorer, *, sampler: str, seed: int, batch: int, n_trials: int) -> tuple[int, int]:
    """One batch, under the study's lock: copy into ``mirror`` the trials others stored in ``study``, run
    ``min(batch, n_trials - complete)`` new trials on the mirror and write them back to the study.
    Returns (the study's complete trials before the batch, the trials the batch ran)."""
    with lock():
        complete = complete_trials(study)
        if mirror is not study:  # catch up with trials stored by earlier runs or other processes
            mirror.add_trials(complete[len(mirror.get_trials(deepcopy=False)):])
        done = len(complete)
        k = max(0, min(batch, n_trials - done))
        if k == 0:
            return done, 0
        searched = k
        if done == 0:  # the plain blend is the first trial: the search never ends below it
            _add_trials(mirror, space, scorer, space.params_matrix([space.plain_params()]))
            searched -= 1
        if searched and sampler == "random":
            _add_trials(mirror, space, scorer, space.sample(np.random.default_rng([seed, done]), searched))
        elif searched:
            _ask_tell_batch(mirror, space, scorer, searched)
        if mirror is not study:
            study.add_trials(mirror.get_trials(deepcopy=False)[-k:])
        return done, k


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
