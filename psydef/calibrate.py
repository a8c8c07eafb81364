"""Calibration of the ensemble's decision rule, in plain numpy (no MLflow, no Optuna).

An ensemble is a few members' logits for the same rows. Its decision rule has three parts:

* blend: ``p = sum_m w_m softmax(logits_m)`` with the weights ``w`` on the simplex;
* gate (optional): if ``p_7 >= tau7`` predict level 7, the majority level;
* otherwise the biased argmax ``argmax_c (log p_c + delta_c)``.

The argmax is computed as ``argmax_c p_c * exp(delta_c)``: the same decision (exp is monotone),
without a log over every probability, and with no ``-inf`` where a probability underflows to 0.

Every prediction, whether one decision (:func:`decode`, :meth:`EnsembleSpec.decode_logits`) or
thousands of candidates scored at once (:class:`CandidateScorer`), goes through the same
element-wise numpy operations (:func:`_blend`, :func:`_decide`), so a candidate decoded alone and
the same candidate scored in a batch give bit-identical labels.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from psydef.labels import HIGH_ADAPTIVE, LABEL_NAMES, N_LEVELS, OFFICIAL_LABELS

# The name of the objective every calibration here maximises: sklearn's
# ``f1_score(y, p, labels=range(1, 9), average="macro", zero_division=0)``.
OBJECTIVE = "macro_f1_levels_1_8"
# Written into every EnsembleSpec; a file written for another rule is refused.
DECODE_RULE = "p=sum_m w_m softmax(logits_m); 7 if tau7 is set and p_7>=tau7; else argmax_c log p_c+delta_c"

_SCORED = np.asarray(OFFICIAL_LABELS)
_WEIGHT_ATOL = 1e-9
_PROB_ATOL = 1e-6
# Small chunks keep the temporaries in cache: ~0.7 MiB each (5 candidates of 1,870 rows) scored twice
# as fast as ~1.4 MiB each on the development machine.
DEFAULT_CHUNK_BYTES = 2 * 2**20


# ---------------------------------------------------------------------------------------------
# Validation


def _check_matrix(x, name: str, n_rows: int | None = None) -> np.ndarray:
    """A finite float64 (n, 9) array."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != N_LEVELS:
        raise ValueError(f"{name} must have shape (n_rows, {N_LEVELS}); got shape {x.shape}.")
    if n_rows is not None and x.shape[0] != n_rows:
        raise ValueError(f"{name} has {x.shape[0]} rows; expected {n_rows}.")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return x


def _check_probs(p, name: str, n_rows: int | None = None) -> np.ndarray:
    p = _check_matrix(p, name, n_rows)
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, rtol=0, atol=_PROB_ATOL):
        raise ValueError(f"{name} must hold probabilities: non-negative rows summing to 1.")
    return p


def _check_labels(y, name: str, n_rows: int | None = None) -> np.ndarray:
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


def _check_weights(w, n_members: int, name: str = "weights") -> np.ndarray:
    """(k, n_members) rows on the probability simplex (a 1-D array is one row)."""
    w = np.asarray(w, dtype=np.float64)
    rows = np.atleast_2d(w)
    if w.ndim > 2 or rows.shape[1] != n_members:
        raise ValueError(f"{name} must have {n_members} entries per candidate (one per member); got shape {w.shape}.")
    on_simplex = np.isclose(rows.sum(axis=1), 1.0, rtol=0, atol=_WEIGHT_ATOL).all()
    if not np.isfinite(rows).all() or (rows < 0).any() or not on_simplex:
        raise ValueError(f"{name} must lie on the simplex (non-negative, summing to 1); got {w.tolist()}.")
    return w


def _check_deltas(d, k: int | None = None, name: str = "deltas") -> np.ndarray:
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] != N_LEVELS or (k is not None and d.shape[0] != k):
        expected = f"({k if k is not None else 'k'}, {N_LEVELS})"
        raise ValueError(f"{name} must have shape {expected}; got {d.shape}.")
    if not np.isfinite(d).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return d


def _check_tau7s(t, k: int) -> np.ndarray | None:
    if t is None:
        return None
    t = np.asarray(t, dtype=np.float64)
    if t.shape != (k,):
        raise ValueError(f"tau7s must have shape ({k},) (one threshold per candidate) or be None; got {t.shape}.")
    if not ((t > 0) & (t <= 1)).all():
        raise ValueError("tau7 thresholds must lie in (0, 1].")
    return t


# ---------------------------------------------------------------------------------------------
# The decision rule


def softmax(logits) -> np.ndarray:
    """Row-wise softmax of (n, 9) logits, in float64, stable for any finite logits."""
    z = _check_matrix(logits, "logits")
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def simplex_weights(raw) -> np.ndarray:
    """Map parameters in [0, 1]^(m-1) to weights on the m-simplex; works on (..., m-1) arrays.

    Stick-breaking: member i takes the fraction ``v_i`` of what the members before it left, the
    last member takes the rest. Each ``u_i`` is sent through the inverse CDF of Beta(1, m-1-i),
    ``v_i = 1 - (1 - u_i) ** (1 / (m-1-i))``, so uniform parameters give weights uniform on the
    simplex (Dirichlet(1)) and a random search does not crowd the first members. For two members
    this is simply ``(u, 1 - u)``. Zero parameters (one member) give the weight ``[1.0]``.
    """
    u = np.asarray(raw, dtype=np.float64)
    if u.ndim == 0:
        raise ValueError("simplex_weights expects an array whose last axis holds the m-1 parameters.")
    if not np.isfinite(u).all() or (u < 0).any() or (u > 1).any():
        raise ValueError("simplex_weights parameters must lie in [0, 1].")
    m = u.shape[-1] + 1
    v = 1.0 - (1.0 - u) ** (1.0 / np.arange(m - 1, 0, -1))
    rest = np.cumprod(1.0 - v, axis=-1)
    before = np.concatenate([np.ones(u.shape[:-1] + (1,)), rest], axis=-1)
    return before * np.concatenate([v, np.ones(u.shape[:-1] + (1,))], axis=-1)


def _blend(member_probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(m, n, 9) member probabilities and (k, m) weights -> (k, n, 9) blended probabilities."""
    probs = weights[:, 0, None, None] * member_probs[0]
    for j in range(1, member_probs.shape[0]):
        probs += weights[:, j, None, None] * member_probs[j]
    return probs


def _decide(probs: np.ndarray, deltas: np.ndarray, tau7s: np.ndarray | None) -> np.ndarray:
    """(k, n, 9) probabilities, (k, 9) deltas, (k,) thresholds or None -> (k, n) labels."""
    labels = (probs * np.exp(deltas)[:, None, :]).argmax(axis=2)
    if tau7s is not None:
        labels[probs[:, :, HIGH_ADAPTIVE] >= tau7s[:, None]] = HIGH_ADAPTIVE
    return labels


def blend(logits_by_member: Sequence, weights) -> np.ndarray:
    """``sum_m w_m softmax(logits_m)``: (n, 9) probabilities from the members' (n, 9) logits."""
    member_probs = _member_probs(logits_by_member)
    w = _check_weights(weights, len(member_probs))
    if w.ndim != 1:
        raise ValueError(f"weights must be 1-D (one per member); got shape {w.shape}.")
    return _blend(member_probs, w[None])[0]


def decode(probs, delta, tau7: float | None = None) -> np.ndarray:
    """Labels (n,) from (n, 9) probabilities: 7 where ``tau7`` is set and ``p_7 >= tau7``,
    else ``argmax_c (log p_c + delta_c)``."""
    p = _check_probs(probs, "probs")
    d = _check_deltas(np.asarray(delta, dtype=np.float64)[None], 1, "delta")
    t = _check_tau7s(None if tau7 is None else [tau7], 1)
    return _decide(p[None], d, t)[0]


def _check_members(logits_by_member: Sequence) -> list[np.ndarray]:
    """Each member's logits as a finite float64 (n, 9) array, the same n for all."""
    if len(logits_by_member) == 0:
        raise ValueError("At least one member's logits are needed.")
    first = _check_matrix(logits_by_member[0], "logits of member 0")
    return [first] + [_check_matrix(x, f"logits of member {i}", first.shape[0])
                      for i, x in enumerate(logits_by_member[1:], start=1)]


def _member_probs(logits_by_member: Sequence) -> np.ndarray:
    return np.stack([softmax(x) for x in _check_members(logits_by_member)])


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
    y = _check_labels(y_true, "y_true")
    p = _check_labels(y_pred, "y_pred", len(y))
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
        if len(member_probs) == 0:
            raise ValueError("At least one member's probabilities are needed.")
        first = _check_probs(member_probs[0], "probabilities of member 0")
        self.member_probs = np.stack([first] + [
            _check_probs(p, f"probabilities of member {i}", first.shape[0])
            for i, p in enumerate(member_probs[1:], start=1)])
        self.y_true = _check_labels(y_true, "y_true", first.shape[0])
        if max_chunk_bytes <= 0:
            raise ValueError("max_chunk_bytes must be positive.")
        # Three float64 (chunk, n, 9) temporaries are alive at once: blend, biased scores, argmax.
        self.chunk_size = max(1, int(max_chunk_bytes) // (3 * 8 * N_LEVELS * max(1, first.shape[0])))

    @classmethod
    def from_logits(cls, logits_by_member: Sequence, y_true, **kwargs) -> "CandidateScorer":
        return cls(list(_member_probs(logits_by_member)), y_true, **kwargs)

    @property
    def n_members(self) -> int:
        return self.member_probs.shape[0]

    @property
    def n_rows(self) -> int:
        return self.member_probs.shape[1]

    def _validate(self, weights, deltas, tau7s):
        w = np.atleast_2d(_check_weights(weights, self.n_members))
        d = _check_deltas(deltas, w.shape[0])
        return w, d, _check_tau7s(tau7s, w.shape[0])

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


def score_candidates(probs, y_true, deltas, tau7s=None, *, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> np.ndarray:
    """(k,) official macro-F1 of k (delta, tau7) candidates on one (n, 9) probability matrix."""
    d = _check_deltas(deltas)
    scorer = CandidateScorer([probs], y_true, max_chunk_bytes=max_chunk_bytes)
    return scorer.score(np.ones((d.shape[0], 1)), d, tau7s)


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


# ---------------------------------------------------------------------------------------------
# The calibrated ensemble, as a file


@dataclass
class EnsembleSpec:
    """Everything needed to turn the members' logits into labels, JSON-serialisable.

    ``members`` are ``{"run_id": str, "weight": float}`` in the order their logits are passed to
    :meth:`decode_logits`; ``delta`` has 9 entries; ``tau7`` is None when the gate is off.
    Floats survive the JSON round trip exactly, so decoding from the file reproduces the
    calibrated predictions bit for bit."""

    members: list[dict]
    delta: list[float]
    tau7: float | None
    objective: str = OBJECTIVE
    data_digest: str = ""
    label_names: list[str] = field(default_factory=lambda: list(LABEL_NAMES))
    metrics: dict[str, float] = field(default_factory=dict)
    rule: str = DECODE_RULE

    def __post_init__(self):
        self.members = [{"run_id": str(m["run_id"]), "weight": float(m["weight"])} for m in self.members]
        if not self.members:
            raise ValueError("An EnsembleSpec needs at least one member.")
        _check_weights(self.weights, len(self.members), "member weights")
        self.delta = [float(x) for x in _check_deltas(np.asarray(self.delta, dtype=np.float64)[None], 1, "delta")[0]]
        if self.tau7 is not None:
            self.tau7 = float(_check_tau7s([self.tau7], 1)[0])
        self.label_names = list(self.label_names)
        if tuple(self.label_names) != LABEL_NAMES:
            raise ValueError(f"label_names {self.label_names} differ from this code's levels {list(LABEL_NAMES)}.")
        if self.rule != DECODE_RULE:
            raise ValueError(f"This spec was written for decode rule {self.rule!r}; this code decodes {DECODE_RULE!r}.")
        self.metrics = {str(k): float(v) for k, v in self.metrics.items()}

    @property
    def weights(self) -> np.ndarray:
        return np.array([m["weight"] for m in self.members])

    @property
    def run_ids(self) -> list[str]:
        return [m["run_id"] for m in self.members]

    def decode_logits(self, logits_by_member: Sequence) -> np.ndarray:
        """Labels (n,) from the members' (n, 9) logits, given in the order of ``members``."""
        if len(logits_by_member) != len(self.members):
            raise ValueError(f"Expected logits of {len(self.members)} members ({self.run_ids}); "
                             f"got {len(logits_by_member)}.")
        probs = _blend(_member_probs(logits_by_member), self.weights[None])
        tau7s = None if self.tau7 is None else np.array([self.tau7])
        return _decide(probs, np.asarray(self.delta)[None], tau7s)[0]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EnsembleSpec":
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"Unknown EnsembleSpec fields: {sorted(unknown)}.")
        return cls(**d)

    def to_json(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        return path

    @classmethod
    def from_json(cls, path) -> "EnsembleSpec":
        return cls.from_dict(json.loads(Path(path).read_text()))

