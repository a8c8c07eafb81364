"""Checks of the calibration's input arrays (plain numpy), shared by rule.py, score.py and estimate.py.

Each ``check_*`` takes an array-like and the name the caller knows it by, returns it as a float64 (or
int64) array, and raises a one-line ``ValueError`` that names that input when it is malformed.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from psydef.core.labels import N_LEVELS

WEIGHT_ATOL = 1e-9  # how far a weight row's sum may be from 1
PROB_ATOL = 1e-6  # how far a probability row's sum may be from 1


def check_logits(x, name: str = "logits", n_rows: int | None = None) -> np.ndarray:
    """A finite float64 (n, 9) array: one row of per-level scores (logits, probabilities) per record."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != N_LEVELS:
        raise ValueError(f"{name} must have shape (n_rows, {N_LEVELS}); got shape {x.shape}.")
    if n_rows is not None and x.shape[0] != n_rows:
        raise ValueError(f"{name} has {x.shape[0]} rows; expected {n_rows}.")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return x


def check_probs(p, name: str = "probabilities", n_rows: int | None = None) -> np.ndarray:
    """A (n, 9) array of non-negative rows summing to 1."""
    p = check_logits(p, name, n_rows)
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, rtol=0, atol=PROB_ATOL):
        raise ValueError(f"{name} must hold probabilities: non-negative rows summing to 1.")
    return p


def check_labels(y, name: str = "y", n_rows: int | None = None) -> np.ndarray:
    """A 1-D int64 array of levels 0..8."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {y.shape}.")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must hold integer labels; got dtype {y.dtype}.")
    y = y.astype(np.int64)
    if n_rows is not None and y.shape[0] != n_rows:
        raise ValueError(f"{name} has {y.shape[0]} entries; expected {n_rows}.")
    if y.size and (y.min() < 0 or y.max() >= N_LEVELS):
        raise ValueError(f"{name} must hold levels 0..{N_LEVELS - 1}; got values in [{y.min()}, {y.max()}].")
    return y


def check_weights(w, n_members: int, name: str = "weights") -> np.ndarray:
    """(k, n_members) rows on the probability simplex (a 1-D array is one row, returned 1-D)."""
    w = np.asarray(w, dtype=np.float64)
    rows = np.atleast_2d(w)
    if w.ndim > 2 or rows.shape[1] != n_members:
        raise ValueError(f"{name} must have {n_members} entries per candidate (one per member); got shape {w.shape}.")
    on_simplex = np.isclose(rows.sum(axis=1), 1.0, rtol=0, atol=WEIGHT_ATOL).all()
    if not np.isfinite(rows).all() or (rows < 0).any() or not on_simplex:
        raise ValueError(f"{name} must lie on the simplex (non-negative, summing to 1); got {w.tolist()}.")
    return w


def check_deltas(d, k: int | None = None, name: str = "deltas") -> np.ndarray:
    """A finite (k, 9) array of per-level biases, one row per candidate."""
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] != N_LEVELS or (k is not None and d.shape[0] != k):
        expected = f"({k if k is not None else 'k'}, {N_LEVELS})"
        raise ValueError(f"{name} must have shape {expected}; got {d.shape}.")
    if not np.isfinite(d).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return d


def check_tau7s(t, k: int, name: str = "tau7s") -> np.ndarray | None:
    """None (no gate), or (k,) thresholds in (0, 1], one per candidate."""
    if t is None:
        return None
    t = np.asarray(t, dtype=np.float64)
    if t.shape != (k,):
        raise ValueError(f"{name} must have shape ({k},) (one threshold per candidate) or be None; got {t.shape}.")
    if not ((t > 0) & (t <= 1)).all():
        raise ValueError(f"{name} must lie in (0, 1]; got values in [{t.min()}, {t.max()}].")
    return t


def check_member_logits(logits_by_member: Sequence) -> list[np.ndarray]:
    """Each member's logits as a finite float64 (n, 9) array, the same n for all."""
    if len(logits_by_member) == 0:
        raise ValueError("At least one member's logits are needed.")
    first = check_logits(logits_by_member[0], "logits of member 0")
    return [first] + [check_logits(x, f"logits of member {i}", first.shape[0])
                      for i, x in enumerate(logits_by_member[1:], start=1)]


def check_member_probs(member_probs: Sequence) -> np.ndarray:
    """The members' probabilities as one (m, n, 9) float64 array, the same n for all."""
    if len(member_probs) == 0:
        raise ValueError("At least one member's probabilities are needed.")
    first = check_probs(member_probs[0], "probabilities of member 0")
    return np.stack([first] + [check_probs(p, f"probabilities of member {i}", first.shape[0])
                               for i, p in enumerate(member_probs[1:], start=1)])
