"""Scores and diagnostic plots for DMRS level predictions. Every number comes from sklearn.

The official PsyDefDetect score is macro-F1 over levels 1..8 (:data:`OFFICIAL_LABELS`): level 0 is
excluded from the average but still matters, since predicting 0 for a defended utterance costs recall
of its true level. A level with no true and no predicted item scores 0 (``zero_division=0``).

Plot functions return a matplotlib :class:`~matplotlib.figure.Figure` built with the object API rather
than pyplot, so no display or global figure registry is involved: the caller saves or logs it, and it is
freed once dropped (nothing to close).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from psydef.core.labels import ALL_LABELS, LABEL_NAMES, N_LEVELS, OFFICIAL_LABELS

ArrayLike = Sequence[int] | np.ndarray


def official_macro_f1(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """The leaderboard metric: macro-F1 over levels 1..8."""
    return float(f1_score(y_true, y_pred, labels=list(OFFICIAL_LABELS), average="macro", zero_division=0))


def evaluate(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """``macro_f1`` (official, 1..8), ``macro_f1_all`` (0..8), ``accuracy`` and ``f1_level_0`` ..
    ``f1_level_8``, as plain floats ready for ``mlflow.log_metrics``."""
    per_level = f1_score(y_true, y_pred, labels=list(ALL_LABELS), average=None, zero_division=0)
    return {
        "macro_f1": official_macro_f1(y_true, y_pred),
        "macro_f1_all": float(f1_score(y_true, y_pred, labels=list(ALL_LABELS), average="macro",
                                       zero_division=0)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        **{f"f1_level_{level}": float(f1) for level, f1 in zip(ALL_LABELS, per_level)},
    }


def per_class_report(y_true: ArrayLike, y_pred: ArrayLike) -> pd.DataFrame:
    """One row per level 0..8: level, name, precision, recall, f1, support (true count)."""
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(ALL_LABELS), zero_division=0)
    return pd.DataFrame({"level": list(ALL_LABELS), "name": list(LABEL_NAMES), "precision": precision,
                         "recall": recall, "f1": f1, "support": support})


def confusion(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """9x9 counts, rows = true level, columns = predicted level, both in order 0..8."""
    return confusion_matrix(y_true, y_pred, labels=list(ALL_LABELS))


def _tick_labels() -> list[str]:
    return [f"{level} {name}" for level, name in zip(ALL_LABELS, LABEL_NAMES)]


def _level_xticks(ax) -> None:
    ax.set_xticks(range(N_LEVELS), _tick_labels(), rotation=45, ha="right")


def plot_confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, *, title: str = "Confusion matrix") -> Figure:
    """Counts written in the cells; colours are row-normalised (recall per true level) so that the
    rare levels are as readable as level 7."""
    counts = confusion(y_true, y_pred)
    row_totals = counts.sum(axis=1, keepdims=True)
    recall = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals > 0)

    fig = Figure(figsize=(9, 8))
    ax = fig.add_subplot()
    image = ax.imshow(recall, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true level")
    for i in range(N_LEVELS):
        for j in range(N_LEVELS):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                    color="white" if recall[i, j] > 0.5 else "black")
    _level_xticks(ax)
    ax.set_yticks(range(N_LEVELS), _tick_labels())
    ax.set_xlabel("predicted level")
    ax.set_ylabel("true level")
    ax.set_title(title)
    return fig


def plot_per_class_f1(y_true: ArrayLike, y_pred: ArrayLike) -> Figure:
    """F1 per level; level 0 is drawn grey and hatched because the official average leaves it out,
    and the dashed line is that official macro-F1."""
    report = per_class_report(y_true, y_pred)
    official = official_macro_f1(y_true, y_pred)

    fig = Figure(figsize=(10, 5))
    ax = fig.add_subplot()
    bars = ax.bar(ALL_LABELS, report["f1"],
                  color=["lightgrey" if level not in OFFICIAL_LABELS else "tab:blue" for level in ALL_LABELS],
                  hatch=["//" if level not in OFFICIAL_LABELS else "" for level in ALL_LABELS],
                  edgecolor="black")
    ax.bar_label(bars, labels=[f"{f1:.2f}\n(n={n})" for f1, n in zip(report["f1"], report["support"])],
                 fontsize=8)
    ax.axhline(official, color="tab:red", linestyle="--", label=f"official macro-F1 (1-8) = {official:.3f}")
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("F1")
    ax.set_title("F1 per defense level")
    _level_xticks(ax)
    ax.legend(loc="upper left")
    return fig


def plot_class_distribution(labels: ArrayLike, augmented_labels: ArrayLike | None = None) -> Figure:
    """Items per level: real items, with augmented variants stacked on top when given."""
    real = np.bincount(np.asarray(labels, dtype=int), minlength=N_LEVELS)
    fig = Figure(figsize=(10, 5))
    ax = fig.add_subplot()
    ax.bar(ALL_LABELS, real, color="tab:blue", label="real")
    if augmented_labels is not None:
        augmented = np.bincount(np.asarray(augmented_labels, dtype=int), minlength=N_LEVELS)
        ax.bar(ALL_LABELS, augmented, bottom=real, color="tab:orange", label="augmented")
    ax.set_ylabel("items")
    ax.set_title("Items per defense level")
    _level_xticks(ax)
    ax.legend()
    return fig
