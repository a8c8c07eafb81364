"""The whole calibration of one OOF bundle: the search on all OOF rows (:mod:`psydef.calibration.study`),
the estimate of what it gains on unseen rows (:mod:`psydef.calibration.estimate`), and the choice
between the calibrated rule and the plain blend (:class:`CalibrationReport`)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import numpy as np
import optuna

from psydef.calibration.estimate import GainEstimate, estimate_gain
from psydef.calibration.rule import EnsembleSpec
from psydef.calibration.score import CandidateScorer, per_class_f1
from psydef.calibration.study import SearchResult, run_study


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
    """Calibrate the ensemble of ``logits_by_member`` (OOF logits, every member's rows in the same order)
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
