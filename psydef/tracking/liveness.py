"""Heartbeat: no run stays RUNNING after its process is gone

Every stage run (stage_run) carries the pid and host of its process, its process identity (the
machine's boot id, the pid namespace, the pid and the process's start time) and a heartbeat tag that
a daemon thread refreshes every HEARTBEAT_S seconds. SIGINT and SIGTERM end it FAILED (the run's
context exits with an exception). For SIGKILL or a lost machine, every stage first marks FAILED
the RUNNING runs of its experiment whose process is gone: one of this boot and pid namespace with
no process of that pid and start time left, or no beat for STALE_AFTER_S seconds. A process this
one cannot see (another machine, a container with its own pid namespace under the same host name,
a run without an identity) is judged by its heartbeat alone: a fresh beat means alive. Runs without
a heartbeat (fold runs of parallel fold jobs, the parent they share) are left to the train stage
(mark_stale_folds_failed), except the nested runs of a dead stage run."""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from psydef.tracking.names import (END_REASON, HEARTBEAT, HEARTBEAT_HOST, HEARTBEAT_PID, HEARTBEAT_PROCESS,
                                   PARENT_RUN_ID, STAGE)
from psydef.tracking.store import client
from psydef.tracking.writes import run_tag, tolerate_concurrent_write

logger = logging.getLogger(__name__)


HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed beats: a slow server delays a beat, it does not stop ten
_beating: set[str] = set()
_beating_lock = threading.Lock()
_beater: threading.Thread | None = None


def _beat_forever() -> None:
    from mlflow.exceptions import MlflowException

    while True:
        time.sleep(HEARTBEAT_S)
        with _beating_lock:
            run_ids = list(_beating)
        for run_id in run_ids:
            try:
                client().set_tag(run_id, HEARTBEAT, str(int(time.time())))
            except (MlflowException, OSError):  # a server away for a moment; the next beat retries
                pass


@contextmanager
def heartbeat(run_id: str):
    """Tag ``run_id`` with this process's pid and host and keep its heartbeat fresh while inside."""
    global _beater

    client().log_batch(run_id, tags=[run_tag(HEARTBEAT, str(int(time.time()))), run_tag(HEARTBEAT_PID, str(os.getpid())),
                                     run_tag(HEARTBEAT_HOST, socket.gethostname()),
                                     run_tag(HEARTBEAT_PROCESS, process_identity())])
    with _beating_lock:
        _beating.add(run_id)
        if _beater is None or not _beater.is_alive():
            _beater = threading.Thread(target=_beat_forever, name="psydef-heartbeat", daemon=True)
            _beater.start()
    try:
        yield
    finally:
        with _beating_lock:
            _beating.discard(run_id)


@contextmanager
def failed_on_sigterm():
    """SIGTERM raises SystemExit(143) in the main thread (SIGINT raises KeyboardInterrupt already), so
    the runs being left end FAILED. Installed only over the default handler, only by the outermost."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pid_namespace() -> str:
    """Where a pid means one process: this boot of this machine and this pid namespace on Linux
    (``BOOT_ID/INODE``); elsewhere (no pid namespaces) the host name."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot_id}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return f"host {socket.gethostname()}"


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, /proc/PID/stat field 22); "" where
    /proc is missing (then a live pid is taken for the same process); None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        return None
    except OSError:
        return "" if _pid_alive(pid) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def process_identity(pid: int | None = None) -> str:
    """``NAMESPACE:PID:START`` of process ``pid`` (default: this one), which no other process shares:
    not one in another container with the same host name, nor a later process given the same pid."""
    pid = os.getpid() if pid is None else pid
    return f"{pid_namespace()}:{pid}:{_start_time(pid) or ''}"


def process_gone(identity: str) -> bool:
    """Whether the process of ``identity`` (process_identity) has certainly ended: it lived in this
    pid namespace of this boot and no process of that pid and start time is left. False when it may be
    alive, and for processes this one cannot see (another machine or pid namespace)."""
    parts = identity.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit() or parts[0] != pid_namespace():
        return False
    started, now = parts[2], _start_time(int(parts[1]))
    return now is None or bool(started and now and now != started)


def why_dead(run, now: float | None = None) -> str | None:
    """Why a RUNNING run's process is gone (see above), or None while it may be alive."""
    tags = run.data.tags
    if HEARTBEAT not in tags:
        return None
    host, pid = tags.get(HEARTBEAT_HOST), tags.get(HEARTBEAT_PID, "")
    if process_gone(tags.get(HEARTBEAT_PROCESS, "")):
        return f"its process (pid {pid} on {host}) is gone"
    silent = (now or time.time()) - float(tags[HEARTBEAT])
    if silent > STALE_AFTER_S:
        return f"no heartbeat from pid {pid} on {host} for {silent:.0f} s"
    return None


def _end_failed(run_id: str, reason: str) -> None:
    """End a run FAILED with ``reason``; another stage starting at the same moment may end it too, and
    then the first reason written stands."""
    def stored():
        return {END_REASON: reason} if END_REASON in client().get_run(run_id).data.tags else {}

    tolerate_concurrent_write(lambda: client().set_tag(run_id, END_REASON, reason), stored, {END_REASON: reason},
                              what=f"run {run_id}")
    client().set_terminated(run_id, "FAILED")


def mark_dead_runs_failed(experiment_id: str | None = None) -> list[str]:
    """End FAILED every RUNNING run of the experiment (default: the current one) whose process is
    gone, with its nested runs that carry no heartbeat of their own and its pending logged models;
    returns their ids."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID

    experiment_id = experiment_id or MLFLOW_EXPERIMENT_ID.get()
    if not experiment_id:
        return []
    mlflow_client = client()
    running = mlflow_client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                        max_results=5000)
    ended = []
    for run in running:
        reason = why_dead(run)
        if reason is None:
            continue
        run_id = run.info.run_id
        # its nested runs without a heartbeat of their own, started by it: before its last beat (fold jobs
        # started later under the same parent are another process's)
        started_by_it = (float(run.data.tags[HEARTBEAT]) + 2 * HEARTBEAT_S) * 1000
        orphans = [r.info.run_id for r in running if r.data.tags.get(PARENT_RUN_ID) == run_id
                   and HEARTBEAT not in r.data.tags and r.info.start_time <= started_by_it]
        for dead in (run_id, *orphans):
            _end_failed(dead, f"marked FAILED by pid {os.getpid()} on {socket.gethostname()}: "
                              + (reason if dead == run_id else f"parent run {run_id}: {reason}"))
            for model in mlflow_client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{dead}'"):
                if model.status == LoggedModelStatus.PENDING:
                    mlflow_client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            ended.append(dead)
        logger.info(f"{run.data.tags.get(STAGE, 'run')} run {run_id} was left RUNNING: {reason}; marked FAILED"
                    + (f" with its nested runs {orphans}" if orphans else ""))
    return ended
