"""Honest estimates of what a calibration procedure is worth on rows it was not fitted on (plain numpy/sklearn)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from psydef.calibration.rule import _check_labels, _check_members
from psydef.calibration.score import macro_f1

# ---------------------------------------------------------------------------------------------
# The honest estimate


@dataclass(frozen=True)
class NestedEstimate:
    """Calibration scored on dialogues it was not fitted on.

    ``pooled_f1`` is one macro-F1 over all rows, each predicted by the calibration fitted without
    its dialogue; ``fold_f1`` are the per-fold macro-F1s; ``fold_of_row[i]`` is the fold whose
    held-out part row i was."""

    pooled_f1: float
    fold_f1: tuple[float, ...]
    predictions: np.ndarray
    fold_of_row: np.ndarray

    @property
    def mean_fold_f1(self) -> float:
        return float(np.mean(self.fold_f1))


# fit_fn(logits_by_member, y, groups, fold) -> decoder; decoder(logits_by_member) -> labels (n,)
FitFn = Callable[[list, np.ndarray, np.ndarray, int], Callable[[list], np.ndarray]]


def nested_cv_estimate(fit_fn: FitFn, logits_by_member: Sequence, y_true, groups, *,
                       n_splits: int = 5, seed: int = 0) -> NestedEstimate:
    """Honest estimate of a calibration procedure on out-of-fold rows.

    Dialogues (``groups``) are split into ``n_splits`` folds, stratified on the labels; for each
    fold, ``fit_fn`` sees only the other folds' rows (members' logits, labels, groups and the fold
    index) and returns a decoder, which labels the held-out fold's rows from their logits alone.
    A dialogue's rows are never in both the fit and the scored part."""
    logits = _check_members(logits_by_member)
    n = logits[0].shape[0]
    y = _check_labels(y_true, "y_true", n)
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},) (one dialogue id per row); got {groups.shape}.")
    n_groups = len(np.unique(groups))
    if n_splits < 2 or n_groups < n_splits:
        raise ValueError(f"n_splits must be >= 2 and at most the number of dialogues ({n_groups}); got {n_splits}.")

    predictions = np.full(n, -1, dtype=np.int64)
    fold_of_row = np.full(n, -1, dtype=np.int64)
    fold_f1 = []
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for fold, (fit_idx, score_idx) in enumerate(splitter.split(np.zeros(n), y, groups)):
        decoder = fit_fn([x[fit_idx] for x in logits], y[fit_idx], groups[fit_idx], fold)
        pred = _check_labels(decoder([x[score_idx] for x in logits]), "decoder output", len(score_idx))
        predictions[score_idx] = pred
        fold_of_row[score_idx] = fold
        fold_f1.append(macro_f1(y[score_idx], pred))
    return NestedEstimate(macro_f1(y, predictions), tuple(fold_f1), predictions, fold_of_row)


