"""Grouped stratified folds over the real records; augmented variants follow their source.

``group_by="dialogue"`` (default) keeps every dialogue in one fold: the honest estimate for new
conversations. ``group_by="utterance"`` keeps only each utterance with its own variants, which mirrors
the official test split (record-level, sharing dialogues with train) and is therefore optimistic.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from psydef.core.augment import with_provenance

GROUP_BY = ("dialogue", "utterance")
FOLD_COLUMNS = ("id", "dialogue_id", "label", "fold", "source_id", "is_augmented")


def assign_folds(table: pd.DataFrame, *, n_splits: int = 5, seed: int = 42, group_by: str = "dialogue") -> np.ndarray:
    """Fold index (0..n_splits-1) for each real record of ``table``, stratified by label."""
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {GROUP_BY}, got {group_by!r}")
    from sklearn.model_selection import StratifiedGroupKFold  # here: `psydef prepare --help` reads GROUP_BY

    groups = table["dialogue_id"] if group_by == "dialogue" else table["id"]
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    folds = np.full(len(table), -1, dtype=np.int64)
    for k, (_, valid) in enumerate(splitter.split(table, table["label"], groups)):
        folds[valid] = k
    return folds


def fold_table(real: pd.DataFrame, augmented: pd.DataFrame, *, n_splits: int = 5, seed: int = 42,
               group_by: str = "dialogue") -> pd.DataFrame:
    """One row per real record and per augmented variant with the columns of ``folds.csv``.
    Each variant (``source_id`` names its real record) gets its source's fold."""
    real_rows = with_provenance(real).assign(fold=assign_folds(real, n_splits=n_splits, seed=seed, group_by=group_by))
    fold_of = real_rows.set_index("id")["fold"]
    missing = set(augmented["source_id"]) - set(fold_of.index) if len(augmented) else set()
    if missing:
        raise ValueError(f"augmented variants name sources that are not real records: {sorted(missing)[:5]}")
    aug_rows = augmented.assign(fold=augmented["source_id"].map(fold_of).astype("int64"))
    return pd.concat([real_rows, aug_rows], ignore_index=True).loc[:, list(FOLD_COLUMNS)]


def leaked_dialogues(folds: pd.DataFrame) -> int:
    """Dialogues whose rows (real or augmented) fall in more than one fold."""
    return int((folds.groupby("dialogue_id")["fold"].nunique() > 1).sum())


def leaked_sources(folds: pd.DataFrame) -> int:
    """Real records whose augmented variants fall in another fold than the record itself."""
    return int((folds.groupby("source_id")["fold"].nunique() > 1).sum())


def check_no_leakage(folds: pd.DataFrame, group_by: str) -> None:
    """Raise when a group the folds promise to keep together is split (asserted before training)."""
    if leaked_sources(folds):
        raise ValueError(f"{leaked_sources(folds)} records have augmented variants in another fold")
    if group_by == "dialogue" and leaked_dialogues(folds):
        raise ValueError(f"{leaked_dialogues(folds)} dialogues appear in more than one fold")


def n_folds(folds: pd.DataFrame) -> int:
    """How many folds a folds table holds (folds are numbered 0..n-1)."""
    return int(folds["fold"].max()) + 1


def split_fold(folds: pd.DataFrame, k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows: real + augmented outside fold k, validation rows: real records of fold k)."""
    n_splits = n_folds(folds)
    if not 0 <= k < n_splits:
        raise ValueError(f"fold {k} is out of range: the folds are 0..{n_splits - 1}")
    train = folds[folds["fold"] != k]
    valid = folds[(folds["fold"] == k) & ~folds["is_augmented"]]
    return train, valid


def oof_fold_mismatch(folds: pd.DataFrame, k: int, oof_ids: list[str]) -> str | None:
    """Why ``oof_ids`` are not exactly the real records of fold ``k`` (each once), or None when they
    are: then fold k's model, trained on the other folds' rows (variants follow their source, see
    :func:`check_no_leakage`), never saw these records nor their variants."""
    expected = set(folds.loc[(folds["fold"] == k) & ~folds["is_augmented"].astype(bool), "id"])
    got = set(oof_ids)
    if got == expected and len(got) == len(oof_ids):
        return None
    return (f"{len(expected - got)} of fold {k}'s records missing, {len(got - expected)} ids from other folds or "
            f"unknown, {len(oof_ids) - len(got)} repeated")
