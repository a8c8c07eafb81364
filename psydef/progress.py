"""What a person watching the console needs: one banner line per stage, rough durations, output in
order. No MLflow, no math.

psydef's console lines are records of the ``psydef`` logger (one logger per module under it); a
library call prints none of them (Python's last-resort handler shows WARNING and worse) until the
program configures :mod:`logging` or the command line adds :func:`console_logging`'s handler."""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

ROOT_LOGGER = "psydef"
LOG_LEVEL_ENV = "PSYDEF_LOG_LEVEL"  # the command line's console level, e.g. WARNING to keep only warnings
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def line_buffered() -> None:
    """Flush stdout at every line, also when it is a file or a pipe (as stderr, where the bars go),
    so psydef's lines and the progress bars appear in the order they happened."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)


class ConsoleFormatter(logging.Formatter):
    """Concise console lines: the message alone, ``warning: ``/``error: `` before a WARNING or worse."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return line if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {line}"


class ConsoleHandler(logging.Handler):
    """Each record on the stdout of the moment (a test runner may swap it), written through tqdm so that a
    progress bar being drawn on stderr is cleared and redrawn around the line, and flushed at once: the
    lines and the bars appear in the order they happened, also when both go to one file."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 (logging's contract: report through handleError, never raise)
            self.handleError(record)


def console_level() -> int:
    """The level of $PSYDEF_LOG_LEVEL (a name of :data:`LOG_LEVELS`, any case), INFO when unset."""
    value = os.environ.get(LOG_LEVEL_ENV, "").strip()
    if not value:
        return logging.INFO
    if value.upper() not in LOG_LEVELS:
        raise ValueError(f"{LOG_LEVEL_ENV}={value!r} in this process's environment is not a level: set it to one of "
                         f"{', '.join(LOG_LEVELS)}, or unset it for INFO")
    return logging.getLevelName(value.upper())


@contextmanager
def console_logging(level: int) -> Iterator[None]:
    """The command line's console while the block runs: a :class:`ConsoleHandler` on the ``psydef``
    logger at ``level``. A program that gave the ``psydef`` logger handlers of its own (embedding
    psydef) keeps its configuration: none is added and the level is left as it set it."""
    root = logging.getLogger(ROOT_LOGGER)
    if root.handlers:
        yield
        return
    handler, previous = ConsoleHandler(), root.level
    handler.setFormatter(ConsoleFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


def banner(text: str) -> None:
    logger.info(f"== {text}")


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
