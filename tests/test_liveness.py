"""Whose process is gone: a run or a promotion lease is ended only when its process has certainly ended on
this machine (same boot, same pid namespace, no process of that pid and start time), or when its
heartbeat (lease: expiry) is past. A process in another pid namespace under the same host name (a
container sharing the host's name) is judged by its heartbeat alone. The foreign processes are
simulated by the tags they would write."""
import logging
import os
import socket
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from psydef import tracking
from tests.fixtures.concurrency import free_pid


def _foreign(pid: int, start: str = "12345") -> str:
    """The identity a process of another pid namespace on this host (a container) would tag."""
    return f"{tracking.pid_namespace()}-elsewhere:{pid}:{start}"


def _ours(pid: int, start: str) -> str:
    return f"{tracking.pid_namespace()}:{pid}:{start}"


@pytest.fixture
def live_child():
    """A live process of this namespace, and its identity."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        yield child, tracking.process_identity(child.pid)
    finally:
        child.kill()
        child.wait()


def test_only_runs_whose_process_is_certainly_gone_are_marked_failed(experiment_id, live_child):
    if not os.path.exists("/proc/self/ns/pid"):
        pytest.skip("pid namespaces are a Linux notion")
    client = MlflowClient()
    child, child_identity = live_child
    dead_pid, host = free_pid(), socket.gethostname()

    def run(identity: str | None, beat_age: float = 0, pid: int = dead_pid) -> str:
        tags = {tracking.STAGE: tracking.TUNE, tracking.HEARTBEAT: str(int(time.time() - beat_age)),
                tracking.HEARTBEAT_PID: str(pid), tracking.HEARTBEAT_HOST: host}
        if identity is not None:
            tags[tracking.HEARTBEAT_PROCESS] = identity
        return client.create_run(experiment_id, tags=tags).info.run_id

    stale = tracking.STALE_AFTER_S + 60
    runs = {
        # another pid namespace under this host name: its pid means nothing here, its fresh beat means alive
        "container, fresh beat": (run(_foreign(dead_pid)), "RUNNING"),
        "container, silent": (run(_foreign(dead_pid), beat_age=stale), "FAILED"),
        # written by a psydef that tagged no identity: judged by its beat
        "no identity, fresh beat": (run(None), "RUNNING"),
        # this namespace: the pid decides, with its start time
        "ours, pid gone": (run(_ours(dead_pid, "12345")), "FAILED"),
        "ours, pid reused by another process": (run(_ours(child.pid, "1"), pid=child.pid), "FAILED"),
        "ours, alive": (run(child_identity, pid=child.pid), "RUNNING"),
    }
    ended = tracking.mark_dead_runs_failed(experiment_id)
    status = {what: client.get_run(run_id).info.status for what, (run_id, _) in runs.items()}
    assert status == {what: expected for what, (_, expected) in runs.items()}
    assert sorted(ended) == sorted(run_id for run_id, expected in runs.values() if expected == "FAILED")
    reason = client.get_run(runs["ours, pid gone"][0]).data.tags[tracking.END_REASON]
    assert f"its process (pid {dead_pid} on {host}) is gone" in reason
    assert "no heartbeat from pid" in client.get_run(runs["container, silent"][0]).data.tags[tracking.END_REASON]


def test_a_stage_run_tags_an_identity_that_is_alive_and_then_gone():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    identity = tracking.process_identity(child.pid)
    assert identity.startswith(f"{tracking.pid_namespace()}:{child.pid}:")
    assert not tracking.process_gone(identity) and not tracking.process_gone(tracking.process_identity())
    child.kill()
    child.wait()
    assert tracking.process_gone(identity)
    assert not tracking.process_gone(_foreign(child.pid)) and not tracking.process_gone("")


NAME = "liveness-model"


def _lease(owner: str, identity: str, expires_in: float) -> None:
    MlflowClient().create_registered_model(tracking.lease_name(NAME), tags={
        tracking.LEASE_OWNER: owner, tracking.LEASE_EXPIRES: repr(time.time() + expires_in),
        tracking.LEASE_PROCESS: identity})


def test_a_lease_whose_process_is_gone_is_taken_over_at_once(tracking_uri, caplog):
    caplog.set_level(logging.INFO, logger="psydef")
    dead_pid = free_pid()
    _lease(f"{socket.gethostname()}:{dead_pid}:deadbeef", _ours(dead_pid, "12345"), expires_in=tracking.LEASE_TTL_S)
    lease = tracking.PromotionLease(NAME).acquire(wait=tracking.LEASE_TTL_S / 4)  # far shorter than its expiry
    assert lease.held()
    assert caplog.messages == [(f"promote: the lease {tracking.lease_name(NAME)} of {socket.gethostname()}:{dead_pid}:deadbeef "
                      "was left by a process that is gone; taking it over")]
    lease.release()


def test_a_waiter_says_once_who_holds_the_lease_and_till_when(tracking_uri, caplog):
    """A live holder this process cannot see (another pid namespace) keeps its lease until it expires."""
    caplog.set_level(logging.INFO, logger="psydef")
    owner = f"{socket.gethostname()}:{free_pid()}:c0ffee"
    _lease(owner, _foreign(free_pid()), expires_in=1.5)
    expires = float(MlflowClient().get_registered_model(tracking.lease_name(NAME)).tags[tracking.LEASE_EXPIRES])
    lease = tracking.PromotionLease(NAME).acquire(wait=60)
    assert lease.held() and time.time() >= expires
    until = time.strftime("%H:%M:%S", time.localtime(expires))
    assert caplog.messages == [
        f"promote: waiting for the promotion lease {tracking.lease_name(NAME)}, held by {owner} until {until} at the latest",
        f"promote: the lease {tracking.lease_name(NAME)} of {owner} expired; taking it over"]
    lease.release()
