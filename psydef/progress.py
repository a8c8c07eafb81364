"""What a person watching the console needs: one banner line per stage, rough durations, output in
order. No MLflow, no math."""
from __future__ import annotations

import sys


def line_buffered() -> None:
    """Flush stdout at every line, also when it is a file or a pipe (as stderr, where the bars go),
    so psydef's lines and the progress bars appear in the order they happened."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)


def banner(text: str) -> None:
    print(f"== {text}", flush=True)


class _Plan:
    """The folds ``main`` will train, and when the first of them started: the remaining training
    time is estimated from the folds done so far (their mean duration)."""
    total_folds: int | None = None
    started: list[float] = []


def plan_main(*, trainings: int, n_splits: int, members: list[str], n_trials: int, inner_trials: int) -> None:
    """The work of ``main``, printed before it starts; the time estimate follows from the first fold."""
    _Plan.total_folds, _Plan.started = trainings * n_splits, []
    banner(f"main: train {trainings} training(s) (member(s) {'; '.join(members)}, each seed on its own folds) x "
           f"{n_splits} folds, tune ({n_trials:,} trials + a gain estimate rerunning the search with "
           f"{inner_trials:,} trials per split), register, promote, predict. Training takes most of the time; once "
           "the first fold is done each fold's banner estimates the rest")


def fold_banner(seed: int, fold: int, n_splits: int) -> None:
    """``== train seed 42: fold 2/5``, with the time left for training under ``main`` once a fold is done."""
    import time

    now = time.monotonic()
    _Plan.started.append(now)
    line = f"train seed {seed}: fold {fold + 1}/{n_splits}"
    done = len(_Plan.started) - 1
    if _Plan.total_folds and done:
        per_fold = (now - _Plan.started[0]) / done
        left = max(_Plan.total_folds - done, 0) * per_fold
        line += f" (about {left / 60:.0f} min of training left: {per_fold / 60:.1f} min per fold so far)"
    banner(line)
