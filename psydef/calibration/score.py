"""Vectorised scoring of many candidate decision rules at once, and the official metric they maximise
(plain numpy; equal bit for bit to sklearn's ``f1_score(..., labels=range(1, 9), average="macro")``)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from psydef.calibration.rule import _blend, _decide, _member_probs
from psydef.calibration.validation import check_deltas, check_labels, check_member_probs, check_tau7s, check_weights
from psydef.core.labels import N_LEVELS, OFFICIAL_LABELS

_SCORED = np.asarray(OFFICIAL_LABELS)
# Small chunks keep the (chunk, n, 9) temporaries in the CPU cache.
DEFAULT_CHUNK_BYTES = 2 * 2**20

# ---------------------------------------------------------------------------------------------
# The official metric


def _f1_from_predictions(y_true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per-class F1 (k, 9) of (k, n) predictions, by bincount over ``candidate * 9 + class``.

    Same formula as sklearn (``2 tp / (n_true + n_pred)``, 0 where both are 0), so the macro mean
    over levels 1..8 equals ``f1_score(..., labels=range(1, 9), average="macro", zero_division=0)``
    exactly."""
    k = pred.shape[0]
    flat = pred + (np.arange(k) * N_LEVELS)[:, None]
    n_pred = np.bincount(flat.ravel(), minlength=k * N_LEVELS).reshape(k, N_LEVELS)
    tp = np.bincount(flat[pred == y_true], minlength=k * N_LEVELS).reshape(k, N_LEVELS)
    denom = (np.bincount(y_true, minlength=N_LEVELS) + n_pred).astype(np.float64)
    return np.divide(2.0 * tp, denom, out=np.zeros_like(denom), where=denom > 0)


def _official_mean(f1: np.ndarray) -> np.ndarray:
    """(k,) mean of levels 1..8 of (k, 9) per-class F1. Row by row, because numpy sums a (k, 8)
    array along axis 1 in another order than a 1-D array of 8 (sklearn's ``np.mean``), which can
    change the last bit."""
    return np.array([row.mean() for row in f1[:, _SCORED]])


def per_class_f1(y_true, y_pred) -> np.ndarray:
    """F1 of each of the 9 levels (0 where a level is neither true nor predicted)."""
    y = check_labels(y_true, "y_true")
    p = check_labels(y_pred, "y_pred", len(y))
    return _f1_from_predictions(y, p[None])[0]


def macro_f1(y_true, y_pred) -> float:
    """The official metric: macro-F1 over levels 1..8 (level 0 is not scored)."""
    return float(_official_mean(per_class_f1(y_true, y_pred)[None])[0])


# ---------------------------------------------------------------------------------------------
# Vectorised scoring of candidates


class CandidateScorer:
    """Scores candidates ``(weights, delta, tau7)`` of the decision rule against fixed members and
    labels, many at a time.

    Candidates are decoded in chunks so that the (chunk, n, 9) temporaries stay under
    ``max_chunk_bytes``: memory is bounded whatever the number of candidates."""

    def __init__(self, member_probs: Sequence, y_true, *, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.member_probs = check_member_probs(member_probs)
        n_rows = self.member_probs.shape[1]
        self.y_true = check_labels(y_true, "y_true", n_rows)
        if max_chunk_bytes <= 0:
            raise ValueError("max_chunk_bytes must be positive.")
        # Three float64 (chunk, n, 9) temporaries are alive at once: blend, biased scores, argmax.
        self.chunk_size = max(1, int(max_chunk_bytes) // (3 * 8 * N_LEVELS * max(1, n_rows)))

    @classmethod
    def from_logits(cls, logits_by_member: Sequence, y_true, **kwargs) -> "CandidateScorer":
        return cls(list(_member_probs(logits_by_member)), y_true, **kwargs)

    @property
    def n_members(self) -> int:
        return self.member_probs.shape[0]

    def _validate(self, weights, deltas, tau7s):
        w = np.atleast_2d(check_weights(weights, self.n_members))
        d = check_deltas(deltas, w.shape[0])
        return w, d, check_tau7s(tau7s, w.shape[0])

    def predict(self, weights, deltas, tau7s=None) -> np.ndarray:
        """(k, n) labels of k candidates; holds k x n labels, so meant for small k."""
        w, d, t = self._validate(weights, deltas, tau7s)
        return np.concatenate([self._predict_chunk(w, d, t, s) for s in self._chunks(len(w))])

    def score(self, weights, deltas, tau7s=None) -> np.ndarray:
        """(k,) official macro-F1 of k candidates: weights (k, m), deltas (k, 9), tau7s (k,) or None."""
        w, d, t = self._validate(weights, deltas, tau7s)
        out = np.empty(len(w))
        for s in self._chunks(len(w)):
            out[s] = _official_mean(_f1_from_predictions(self.y_true, self._predict_chunk(w, d, t, s)))
        return out

    def _chunks(self, k: int):
        return [slice(i, min(i + self.chunk_size, k)) for i in range(0, k, self.chunk_size)]

    def _predict_chunk(self, w, d, t, s: slice) -> np.ndarray:
        return _decide(_blend(self.member_probs, w[s]), d[s], None if t is None else t[s])
