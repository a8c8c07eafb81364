"""The ensemble's decision rule, in plain numpy (no MLflow, no Optuna), and its file format.

An ensemble is a few members' logits for the same rows. Its decision rule has three parts:

* blend: ``p = sum_m w_m softmax(logits_m)`` with the weights ``w`` on the simplex;
* gate (optional): if ``p_7 >= tau7`` predict level 7, the majority level;
* otherwise the biased argmax ``argmax_c (log p_c + delta_c)``.

The argmax is computed as ``argmax_c p_c * exp(delta_c)``: the same decision (exp is monotone),
without a log over every probability, and with no ``-inf`` where a probability underflows to 0.

Every prediction, whether one decision (:meth:`EnsembleSpec.decode_logits`) or thousands of candidates
scored at once (:class:`psydef.calibration.score.CandidateScorer`), goes through the same element-wise
numpy operations (:func:`_blend`, :func:`_decide`), so a candidate decoded alone and the same
candidate scored in a batch give bit-identical labels.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from psydef.calibration.validation import (check_deltas, check_logits, check_member_logits, check_member_probs,
                                           check_tau7s, check_weights)
from psydef.core.labels import HIGH_ADAPTIVE, LABEL_NAMES, N_LEVELS

# The name of the objective every calibration here maximises: sklearn's
# ``f1_score(y, p, labels=range(1, 9), average="macro", zero_division=0)``.
OBJECTIVE = "macro_f1_levels_1_8"
# Written into every EnsembleSpec; a file written for another rule is refused.
DECODE_RULE = "p=sum_m w_m softmax(logits_m); 7 if tau7 is set and p_7>=tau7; else argmax_c log p_c+delta_c"

# ---------------------------------------------------------------------------------------------
# The decision rule


def softmax(logits) -> np.ndarray:
    """Row-wise softmax of (n, 9) logits, in float64, stable for any finite logits."""
    z = check_logits(logits, "logits")
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
    w = check_weights(weights, len(member_probs))
    if w.ndim != 1:
        raise ValueError(f"weights must be 1-D (one per member); got shape {w.shape}.")
    return _blend(member_probs, w[None])[0]


def _member_probs(logits_by_member: Sequence) -> np.ndarray:
    return np.stack([softmax(x) for x in check_member_logits(logits_by_member)])


def fold_mean_probs(logits_by_fold: Sequence) -> np.ndarray:
    """A member's (n, 9) probabilities from its fold models' logits for the same rows: the mean over
    folds of softmax(logits)."""
    return _member_probs(logits_by_fold).mean(axis=0)


def plain_decode(logits_by_member: Sequence) -> np.ndarray:
    """Labels (n,) of the plain blend: equal weights, delta 0, no gate (what :meth:`EnsembleSpec.plain` decodes)."""
    member_probs = _member_probs(logits_by_member)
    m = member_probs.shape[0]
    return _decide(_blend(member_probs, np.full((1, m), 1.0 / m)), np.zeros((1, N_LEVELS)), None)[0]


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
        check_weights(self.weights, len(self.members), "member weights")
        self.delta = [float(x) for x in check_deltas(np.asarray(self.delta, dtype=np.float64)[None], 1, "delta")[0]]
        if self.tau7 is not None:
            self.tau7 = float(check_tau7s([self.tau7], 1, "tau7")[0])
        self.label_names = list(self.label_names)
        if tuple(self.label_names) != LABEL_NAMES:
            raise ValueError(f"label_names {self.label_names} differ from this code's levels {list(LABEL_NAMES)}.")
        if self.rule != DECODE_RULE:
            raise ValueError(f"This spec was written for decode rule {self.rule!r}; this code decodes {DECODE_RULE!r}.")
        self.metrics = {str(k): float(v) for k, v in self.metrics.items()}

    @classmethod
    def plain(cls, run_ids: Sequence[str], **kwargs) -> "EnsembleSpec":
        """The plain blend of ``run_ids``: equal weights, delta 0, no gate."""
        return cls(members=[{"run_id": r, "weight": 1.0 / len(run_ids)} for r in run_ids], delta=[0.0] * N_LEVELS,
                   tau7=None, **kwargs)

    @property
    def weights(self) -> np.ndarray:
        return np.array([m["weight"] for m in self.members])

    @property
    def run_ids(self) -> list[str]:
        return [m["run_id"] for m in self.members]

    def decode_logits(self, logits_by_member: Sequence) -> np.ndarray:
        """Labels (n,) from the members' (n, 9) logits, given in the order of ``members``."""
        self._check_count(logits_by_member, "logits")
        return self.decode_probs(_member_probs(logits_by_member))

    def blend_probs(self, member_probs: Sequence) -> np.ndarray:
        """The blended (n, 9) probabilities from the members' (n, 9) probabilities (e.g. each
        member's :func:`fold_mean_probs`), given in the order of ``members``."""
        self._check_count(member_probs, "probabilities")
        return _blend(check_member_probs(member_probs), self.weights[None])[0]

    def decode_probs(self, member_probs: Sequence) -> np.ndarray:
        """Labels (n,) from the members' (n, 9) probabilities, given in the order of ``members``."""
        tau7s = None if self.tau7 is None else np.array([self.tau7])
        return _decide(self.blend_probs(member_probs)[None], np.asarray(self.delta)[None], tau7s)[0]

    def _check_count(self, per_member: Sequence, what: str) -> None:
        if len(per_member) != len(self.members):
            raise ValueError(f"Expected {what} of {len(self.members)} members ({self.run_ids}); "
                             f"got {len(per_member)}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EnsembleSpec":
        """The spec of a parsed ensemble file; a one-line ValueError naming the field at fault."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object with fields members, delta, tau7; got a {type(d).__name__}")
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"Unknown EnsembleSpec fields: {sorted(unknown)}.")
        missing = [name for name in ("members", "delta", "tau7") if name not in d]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(missing)}")
        members = d["members"]
        if not isinstance(members, list) or not members:
            raise ValueError(f"field 'members' must be a non-empty list of {{run_id, weight}}; got {members!r:.80}")
        for i, member in enumerate(members):
            weight = member.get("weight") if isinstance(member, dict) else None
            if not isinstance(member, dict) or not isinstance(member.get("run_id"), str) \
                    or isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ValueError(f"members[{i}] must be an object with a string 'run_id' and a number 'weight'; "
                                 f"got {member!r:.80}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as err:  # delta or tau7 of the wrong type or shape, weights off the simplex
            raise ValueError(" ".join(str(err).split())) from err

    def to_json(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        return path

    @classmethod
    def from_json(cls, path) -> "EnsembleSpec":
        return cls.from_dict(json.loads(Path(path).read_text()))

