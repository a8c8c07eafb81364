"""psydef's console lines are records of the ``psydef`` logger: the command line shows them on stdout as
concise lines (PSYDEF_LOG_LEVEL sets the level), a library call shows none, and a program embedding
psydef keeps its own logging configuration."""
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from psydef import progress
from psydef.cli import cli

REPO = Path(__file__).resolve().parents[1]


def _prepare(data_dir, **env):
    return CliRunner().invoke(cli, ["prepare", "--data-dir", str(data_dir)], env=env)


def _python(code: str, **options) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=120, **options)


def test_the_command_line_prints_the_lines_at_info_and_none_at_warning(tracking_uri, data_dir):
    shown = _prepare(data_dir)
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert len(lines) == 2, shown.stdout  # message only: no level or logger name, no line twice
    assert lines[0].startswith("== prepare: prepare seed=42 (run "), lines
    assert lines[1].startswith("prepare: 60 records, 15 dialogues, "), lines

    quiet = _prepare(data_dir, PSYDEF_LOG_LEVEL="warning")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stdout == ""
    assert not logging.getLogger(progress.ROOT_LOGGER).handlers  # the command's handler went with it


def test_a_bad_log_level_is_one_line_before_the_store_is_touched(data_dir, tmp_path):
    store = tmp_path / "mlflow.db"
    result = CliRunner().invoke(cli, ["prepare", "--data-dir", str(data_dir), "--tracking-uri", f"sqlite:///{store}"],
                                env={"PSYDEF_LOG_LEVEL": "loud"})
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output == ("Error: PSYDEF_LOG_LEVEL='loud' in this process's environment is not a level: set it to "
                             "one of DEBUG, INFO, WARNING, ERROR, or unset it for INFO\n")
    assert not store.exists()


def test_warnings_say_so_and_lines_keep_their_order(capsys):
    with progress.console_logging(logging.INFO):
        logging.getLogger("psydef.tracking").warning("run r1: the last system metrics were not logged")
        logging.getLogger("psydef.stages.train").info("fold 0: 1 epochs, loss 0.5000")
    assert capsys.readouterr().out == ("warning: run r1: the last system metrics were not logged\n"
                                       "fold 0: 1 epochs, loss 0.5000\n")


def test_a_line_logged_under_a_progress_bar_is_not_glued_to_it():
    """stdout and stderr into one pipe, as `mlflow run ... > log 2>&1`: the bar is cleared before the
    line and drawn again after it."""
    code = """
import logging
from tqdm import tqdm
from psydef import progress
with progress.console_logging(logging.INFO), tqdm(total=2, desc="epoch 1/1") as bar:
    bar.update(1)
    logging.getLogger("psydef.stages.train").info("fold 0: 1 epochs")
    bar.update(1)
"""
    out = _python(code, stdout=subprocess.PIPE, stderr=subprocess.STDOUT).stdout.decode()
    segments = re.split(r"[\r\n]", out)
    assert "fold 0: 1 epochs" in segments, repr(out)
    assert out.index("0/2") < out.index("fold 0: 1 epochs") < out.index("2/2"), repr(out)


def test_a_library_call_prints_nothing_below_warning():
    """Importing and calling psydef configures no logging: Python's last resort shows warnings only."""
    code = """
import logging
import psydef.cli, psydef.stages.pipeline
from psydef import progress
progress.banner("train: a banner")
logging.getLogger("psydef.stages.train").info("fold 0: 1 epochs")
logging.getLogger("psydef.tracking").warning("careful")
"""
    proc = _python(code, capture_output=True, text=True)
    assert (proc.stdout, proc.stderr) == ("", "careful\n")


def test_an_embedding_programs_handler_gets_the_records_and_the_command_adds_none(tracking_uri, data_dir):
    psydef_logger = logging.getLogger(progress.ROOT_LOGGER)

    seen = []  # (level, message, the psydef logger's handlers when it was emitted)

    class Recorder(logging.Handler):
        def emit(self, record):
            seen.append((record.levelno, record.getMessage(), list(psydef_logger.handlers)))

    recorder = Recorder()
    psydef_logger.addHandler(recorder)
    psydef_logger.setLevel(logging.INFO)
    try:
        result = _prepare(data_dir)
    finally:
        psydef_logger.removeHandler(recorder)
        psydef_logger.setLevel(logging.NOTSET)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert [(level, message.split(" (run ")[0][:28]) for level, message, _ in seen] == [
        (logging.INFO, "== prepare: prepare seed=42"), (logging.INFO, "prepare: 60 records, 15 dial")]
    assert all(handlers == [recorder] for *_, handlers in seen)
