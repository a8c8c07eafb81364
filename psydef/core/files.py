"""Files psydef writes for the user, written so that a reader never sees a half-written one.

Each file is written to a temporary file in its own folder, flushed to disk, and renamed onto its
name (``os.replace``, atomic on one file system); a failure removes the temporaries and leaves
whatever held the names before.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path


def writable_folder(path: str | Path, what: str) -> Path:
    """``path`` as a folder a file can be written in, created if missing; ValueError naming it
    (``what``: the option or setting it came from) when it is a file, cannot be created or is
    not writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path}: is a file, not a folder; give a folder to write the outputs in")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"{what} {path}: cannot write there ({err.strerror or err}); give a writable folder") from None
    return path


def _fsync_folder(folder: Path) -> None:
    """Makes a rename in ``folder`` durable (where the platform can open a folder)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextlib.contextmanager
def atomic_files(*paths: str | Path):
    """Yields one temporary path beside each of ``paths`` to write; when the block ends without an
    error, each is flushed and renamed onto its path, in the order given. On an error no path is
    touched and the temporaries are removed."""
    paths = [Path(p) for p in paths]
    temporaries = []
    try:
        for path in paths:  # created with the mode a new file gets (mkstemp's would be 0600)
            temporary = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            temporaries.append(temporary)
        yield temporaries
        for temporary in temporaries:
            with temporary.open("rb+") as handle:
                os.fsync(handle.fileno())
        for temporary, path in zip(temporaries, paths):
            os.replace(temporary, path)
        for folder in {path.parent for path in paths}:
            _fsync_folder(folder)
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
