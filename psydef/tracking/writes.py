"""Concurrent identical writes

Several processes write the same values to one run or experiment at once: fold jobs tag their shared
parent and log its params and training dataset, stages started together tag the experiment, prepares
of one data set create its dataset row. MLflow's stores read, then insert (``session.merge`` for tags,
a lookup before the insert for params, datasets and inputs), so the slower of two writers hits the
table's unique key: an ``MlflowException`` (BAD_REQUEST or INTERNAL_ERROR; a ``RestException`` through a
server) whose message carries the database's unique-violation text. The row it wanted now exists;
whether it holds the same value decides."""
from __future__ import annotations

import random
import time


WRITE_ATTEMPTS = 5
# How each database words a unique-key violation (SQLite, PostgreSQL, MySQL), inside MLflow's message
_UNIQUE_VIOLATIONS = ("UNIQUE constraint failed", "duplicate key value violates unique constraint",
                      "UniqueViolation", "Duplicate entry")


class ConcurrentWriteConflict(ValueError):
    """Another process wrote a different value to the same key at the same moment."""


def is_unique_violation(err: BaseException) -> bool:
    """Whether an MLflow error is the store's unique-key violation (directly or through a server)."""
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and any(text in str(err.message) for text in _UNIQUE_VIOLATIONS)


def tolerate_concurrent_write(write, stored, wanted: dict, *, what: str) -> None:
    """``write()``, an idempotent write of the values ``wanted`` ({key: value}) that another process may
    make at the same moment. On the store's unique-key error the state is read again (``stored()``: a
    mapping holding the keys written so far): every key holding its wanted value means the other write
    did this one's; a key holding another value is a real conflict (ConcurrentWriteConflict, naming
    ``what``: the run or experiment); keys still missing mean the write is tried again, a few times
    after a short random pause."""
    for attempt in range(WRITE_ATTEMPTS):
        try:
            write()
            return
        except Exception as err:  # only the unique-key violation is handled below
            if not is_unique_violation(err) or attempt == WRITE_ATTEMPTS - 1:
                raise
        now = stored()
        differ = {key: now[key] for key, value in wanted.items() if key in now and now[key] != value}
        if differ:
            shown = "; ".join(f"{key}: {value!r}, not {wanted[key]!r}" for key, value in differ.items())
            raise ConcurrentWriteConflict(f"{what}: another process wrote other values at the same moment ({shown}); "
                                          "check which jobs write to it")
        if all(key in now for key in wanted):
            return
        time.sleep(random.uniform(0.05, 0.25) * (attempt + 1))


def run_tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, value)
