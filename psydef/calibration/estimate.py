"""What a calibration procedure gains over the plain blend on rows it was not fitted on (plain numpy/sklearn).

The quantity wanted is the gain of the calibrated rule over the plain blend (equal weights, delta 0, no gate)
on unseen records: ``F1(calibrated rule) - F1(plain blend)``. The plain blend fits nothing, so its macro-F1
on the OOF rows is already honest; the calibrated rule is fitted on those rows, so its in-sample F1 is
optimistic. :func:`estimate_gain` reruns the whole fitting procedure (the search) inside repeated K-fold
splits of the records, stratified by label, and compares each fitted rule with the plain blend on the fold
it never saw.

Design (``bench/calibration_estimate.py`` measures it; its figures are in the README's benchmarks section):

* Paired per fold, then averaged: the gain on a fold is the fitted rule's macro-F1 minus the plain blend's,
  both on that fold's rows. Pooling the folds' predictions into one macro-F1 instead would score a mixture
  of several rules, whose errors partly cancel like an ensemble's, and overstate the gain. The pairing also
  cancels most of the small-sample bias of macro-F1 on a fifth of the rows (level 8 has a handful there).
* Record-level folds, like the official test split, which shares its dialogues with train; ``groups``
  makes them dialogue-grouped, to measure what grouping does.
* Repeated with fresh splits (and fresh search seeds) and averaged, for a lower variance.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from tqdm.auto import tqdm

from psydef.calibration.rule import plain_decode
from psydef.calibration.score import macro_f1
from psydef.calibration.validation import check_labels, check_member_logits


@dataclass(frozen=True)
class GainEstimate:
    """The calibration's estimated gain over the plain blend on unseen rows.

    ``plain_f1`` is the plain blend's macro-F1 on all rows (it fits nothing). ``fold_gain[r, k]`` is, on
    the rows of fold k of repeat r, the macro-F1 of the rule fitted without them minus the plain blend's;
    ``predictions[r]`` are each row's labels from the rule fitted without its fold in repeat r, and
    ``fold_of_row[r]`` its fold."""

    plain_f1: float
    fold_gain: np.ndarray  # (n_repeats, n_splits)
    predictions: np.ndarray  # (n_repeats, n)
    fold_of_row: np.ndarray  # (n_repeats, n)

    @property
    def gain(self) -> float:
        """Estimated gain in macro-F1 of the fitted rule over the plain blend on unseen rows."""
        return float(self.fold_gain.mean())

    @property
    def gain_fold_std(self) -> float:
        """Standard deviation of the per-fold gains (their spread, not the error of their mean)."""
        return float(self.fold_gain.std())

    @property
    def calibrated_f1(self) -> float:
        """Estimated macro-F1 of the fitted rule on unseen rows: the plain blend's plus the gain."""
        return self.plain_f1 + self.gain


# fit_fn(logits_by_member, y, split) -> decoder; decoder(logits_by_member) -> labels (n,).
# ``split`` numbers the fits 0, 1, ... (repeat * n_splits + fold): use it to seed each fit differently.
FitFn = Callable[[list, np.ndarray, int], Callable[[list], np.ndarray]]


def estimate_gain(fit_fn: FitFn, logits_by_member: Sequence, y_true, *, n_splits: int = 5, n_repeats: int = 2,
                  seed: int = 0, groups=None, processes: int = 0, show_progress: bool = False) -> GainEstimate:
    """Estimate what the rules ``fit_fn`` fits gain over the plain blend on unseen records.

    For each of ``n_repeats`` shuffles, the rows are split into ``n_splits`` folds stratified by label;
    ``fit_fn`` sees the other folds' logits and labels only and returns a decoder, which labels the
    held-out fold from its logits alone. ``groups`` (one id per row), when given, keeps each group's
    rows in one fold (``StratifiedGroupKFold``): only to measure what grouping does.

    The fits are independent: ``processes`` >= 1 runs them in that many spawned worker processes
    (``fit_fn`` and its decoders must then pickle), with the same result as ``processes=0``, where they
    run in this process one after the other."""
    logits = check_member_logits(logits_by_member)
    n = logits[0].shape[0]
    y = check_labels(y_true, "y_true", n)
    if n_repeats < 1:
        raise ValueError(f"n_repeats must be >= 1; got {n_repeats}.")
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise ValueError(f"groups must have shape ({n},) (one id per row); got {groups.shape}.")
    most = n if groups is None else len(np.unique(groups))
    if not 2 <= n_splits <= most:
        raise ValueError(f"n_splits must be >= 2 and at most the number of {'rows' if groups is None else 'groups'} "
                         f"({most}); got {n_splits}.")

    splits = []  # (repeat, fold, fit rows, held-out rows), numbered by position: the fit's ``split``
    for r in range(n_repeats):
        split_seed = np.random.SeedSequence([seed, r]).generate_state(1)[0]
        if groups is None:
            folds = StratifiedKFold(n_splits, shuffle=True, random_state=split_seed).split(np.zeros(n), y)
        else:
            folds = StratifiedGroupKFold(n_splits, shuffle=True, random_state=split_seed).split(np.zeros(n), y, groups)
        splits += [(r, k, fit_idx, held_idx) for k, (fit_idx, held_idx) in enumerate(folds)]
    if processes < 0:
        raise ValueError(f"processes must be >= 0 (0: in this process); got {processes}.")
    fit_args = ([[x[fit_idx] for x in logits] for _, _, fit_idx, _ in splits], [y[fit_idx] for _, _, fit_idx, _ in splits],
                range(len(splits)))
    plain = plain_decode(logits)
    predictions = np.full((n_repeats, n), -1, dtype=np.int64)
    fold_of_row = np.full((n_repeats, n), -1, dtype=np.int64)
    fold_gain = np.zeros((n_repeats, n_splits))
    with (ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) if processes
          else nullcontext()) as pool:
        decoders = pool.map(fit_fn, *fit_args) if processes else map(fit_fn, *fit_args)
        for (r, k, _, held_idx), decoder in tqdm(zip(splits, decoders), total=len(splits), desc="gain estimate",
                                                  unit="search", disable=not show_progress):
            pred = check_labels(decoder([x[held_idx] for x in logits]), "decoder output", len(held_idx))
            predictions[r, held_idx], fold_of_row[r, held_idx] = pred, k
            fold_gain[r, k] = macro_f1(y[held_idx], pred) - macro_f1(y[held_idx], plain[held_idx])
    return GainEstimate(plain_f1=macro_f1(y, plain), fold_gain=fold_gain, predictions=predictions,
                        fold_of_row=fold_of_row)
