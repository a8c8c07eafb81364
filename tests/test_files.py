"""psydef/core/files.py: outputs replaced whole or not at all, in a folder checked up front."""
import os

import pytest

from psydef.core.files import atomic_files, writable_folder


def test_atomic_files_replace_every_path_once_all_are_written(tmp_path):
    old = tmp_path / "a.txt"
    old.write_text("old")
    with atomic_files(old, tmp_path / "b.txt") as (a, b):
        a.write_text("new a")
        b.write_text("new b")
        assert old.read_text() == "old"  # untouched while the block runs
    assert (old.read_text(), (tmp_path / "b.txt").read_text()) == ("new a", "new b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]  # no temporary left
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o666 & ~umask  # the mode of any new file


def test_atomic_files_touch_nothing_when_the_block_fails(tmp_path):
    old = tmp_path / "a.txt"
    old.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_files(old, tmp_path / "b.txt") as (a, _):
            a.write_text("half")
            raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"] and old.read_text() == "old"


def test_writable_folder_creates_a_missing_one_and_refuses_a_file(tmp_path):
    assert writable_folder(tmp_path / "new" / "out", "--out-dir").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^--out-dir .*file: is a file, not a folder"):
        writable_folder(tmp_path / "file", "--out-dir")
    with pytest.raises(ValueError, match=r"^--out-dir .*file/out: cannot write there \(Not a directory\)"):
        writable_folder(tmp_path / "file" / "out", "--out-dir")
