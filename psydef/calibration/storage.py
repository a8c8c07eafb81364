"""Where an Optuna study is stored, and the lock that lets several processes share it.

Addresses: ``None`` (in memory), ``sqlite:///path.db`` or ``postgresql+psycopg2://...`` (Optuna's
RDBStorage; PostgreSQL is what tuners on several machines share), or a journal file (``path.journal``
or ``journal://path``; JournalStorage + JournalFileBackend).

The study's cross-process lock is a PostgreSQL advisory lock on the study's name, or an exclusive
``fcntl`` lock on ``<file>.study-lock`` for the file storages (a no-op in memory).
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from psydef.core.secrets import redact_uri

LOCK_SUFFIX = ".study-lock"
POSTGRES_PREFIX = "postgresql+psycopg2:"


def parse_storage(storage) -> tuple[str, str] | None:
    """None (in memory), or (kind, address): ("sqlite", file), ("journal", file) or ("postgresql", URL)."""
    if storage is None:
        return None
    s = os.fspath(storage)
    if s.startswith("sqlite:///"):
        path = s[len("sqlite:///"):]
        if path in ("", ":memory:"):
            raise ValueError("An in-memory SQLite study cannot be shared or resumed; use storage=None instead.")
        return "sqlite", path
    if s.startswith(POSTGRES_PREFIX):
        return "postgresql", s
    if s.startswith("postgresql"):
        raise ValueError(f"Unsupported storage {redact_uri(s)!r}: name the driver, {POSTGRES_PREFIX}//USER@HOST/DB "
                         "(SQLAlchemy maps a bare postgresql:// to psycopg 3, which psydef does not install).")
    if s.startswith("journal://"):
        return "journal", s[len("journal://"):]
    if s.endswith(".journal"):
        return "journal", s
    raise ValueError(f"Unsupported storage {redact_uri(s)!r}: use None, 'sqlite:///path.db', "
                     f"'{POSTGRES_PREFIX}//USER@HOST:PORT/DB', 'path.journal' or 'journal://path'.")


def open_storage(parsed: tuple[str, str] | None) -> optuna.storages.BaseStorage | None:
    """The Optuna storage of a :func:`parse_storage` result (None: in memory)."""
    if parsed is None:
        return None
    kind, address = parsed
    if kind == "journal":
        return JournalStorage(JournalFileBackend(address))
    return RDBStorage(f"sqlite:///{address}" if kind == "sqlite" else address)


class StudyLock:
    """The cross-process lock of one study (a no-op in memory): a PostgreSQL advisory lock on its
    name, held on one connection for the whole search; else ``fcntl`` on ``<file>.study-lock``.
    ``with lock():`` holds it; :meth:`close` releases the connection."""

    def __init__(self, parsed: tuple[str, str] | None, study_name: str):
        self.parsed, self.study_name, self._connection = parsed, study_name, None

    @contextmanager
    def __call__(self):
        if self.parsed is None:
            yield
        elif self.parsed[0] == "postgresql":
            with self._advisory_lock():
                yield
        else:
            with open(f"{self.parsed[1]}{LOCK_SUFFIX}", "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)

    @contextmanager
    def _advisory_lock(self):
        import sqlalchemy

        if self._connection is None:
            self._connection = sqlalchemy.create_engine(self.parsed[1], poolclass=sqlalchemy.pool.NullPool).connect()
        key = {"key": f"psydef-study:{self.study_name}"}
        self._connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(hashtext(:key))"), key)
        try:
            yield
        finally:
            self._connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(hashtext(:key))"), key)
            self._connection.commit()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def load_study(storage, study_name: str = "calibration") -> optuna.Study:
    """An existing study from ``storage`` (any address :func:`parse_storage` accepts but None), to read."""
    parsed = parse_storage(storage)
    if parsed is None:
        raise ValueError("An in-memory study cannot be loaded: use SearchResult.study.")
    lock = StudyLock(parsed, study_name)
    try:
        with lock():
            return optuna.load_study(study_name=study_name, storage=open_storage(parsed))
    finally:
        lock.close()
