"""Concurrent processes making the same writes never crash on the store's unique keys: stages configuring
a new experiment, prepares of one data set in it, fold jobs tagging their shared parent, stages marking
the same dead run FAILED (``racing_writer``: N processes, each step behind a barrier), and the README's
fold jobs as real ``psydef train --fold k`` command lines; against a loopback ``mlflow server`` over
SQLite and over PostgreSQL, and directly on SQLite. A differing concurrent value is a clear conflict."""
from __future__ import annotations

import multiprocessing
import queue
import socket
import subprocess
import sys
import time
from contextlib import nullcontext

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException

from psydef import tracking
from tests.fixtures.concurrency import free_pid, racing_writer
from tests.fixtures.jobs import JOB_HYPER
from tests.fixtures.server import REPO, clean_env, mlflow_server, postgres_cluster, tail

N_PROCESSES = 5
ROUNDS = 3
N_SPLITS = 5


@pytest.fixture(scope="module", params=["sqlite server", "postgresql server", "sqlite direct"])
def store(request, tmp_path_factory):
    """``(tracking_uri, server_log or None)``; MLflow in this process points at it."""
    workdir = tmp_path_factory.mktemp("store")
    before = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        for variable in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(variable, raising=False)
        if request.param == "sqlite direct":
            uri = f"sqlite:///{workdir}/mlflow.db"
            mp.setenv("MLFLOW_TRACKING_URI", uri)
            yield uri, None
        else:
            backend = (postgres_cluster() if request.param.startswith("postgresql")
                       else nullcontext((f"sqlite:///{workdir}/server.db", None)))
            with backend as (backend_uri, _), mlflow_server(backend_uri, workdir) as (uri, _, log):
                mp.setenv("MLFLOW_TRACKING_URI", uri)
                yield uri, log
    mlflow.set_tracking_uri(before)


@pytest.fixture(scope="module")
def shared_prepare(store, tmp_path_factory):
    """A prepare run (experiment ``psydef``) whose folds every fold job of the tests trains on."""
    import json

    from psydef.stages.config import PrepareConfig
    from psydef.stages.prepare import run_prepare
    from tests.fixtures.records import official_records

    uri, _ = store
    data_dir = tmp_path_factory.mktemp("data")
    (data_dir / "train.json").write_text(json.dumps(official_records()))
    (data_dir / "test.json").write_text(json.dumps(official_records(2, labelled=False)))
    tracking.configure(uri, "psydef")
    prepared = run_prepare(PrepareConfig(data_dir=data_dir, seed=7, n_splits=N_SPLITS))
    return data_dir, prepared


def _dead_run(experiment_id: str) -> str:
    """A RUNNING stage run whose process is gone: this machine's namespace, a pid that does not exist."""
    pid = free_pid()
    tags = {tracking.STAGE: tracking.TUNE, tracking.HEARTBEAT: str(int(time.time())),
            tracking.HEARTBEAT_PID: str(pid), tracking.HEARTBEAT_HOST: socket.gethostname(),
            tracking.HEARTBEAT_PROCESS: tracking.process_identity(pid)}
    return MlflowClient().create_run(experiment_id, tags=tags).info.run_id


def test_concurrent_stages_and_fold_jobs_make_the_same_writes_without_crashing(store, shared_prepare, request):
    uri, server_log = store
    data_dir, prepared = shared_prepare
    client = MlflowClient()
    tag = request.node.callspec.id.replace(" ", "-")
    rounds = []
    for r in range(ROUNDS):
        parents = client.create_experiment(f"parents-{tag}-{r}")
        rounds.append({"experiment": f"new-{tag}-{r}", "parents_experiment": parents, "dead": _dead_run(parents),
                       "parent": client.create_run(parents, run_name="train seed=7").info.run_id})
    context = multiprocessing.get_context("spawn")
    barrier, errors = context.Barrier(N_PROCESSES), context.Queue()
    workers = [context.Process(target=racing_writer, args=(uri, str(data_dir), prepared.run_id, rounds, barrier, errors))
               for _ in range(N_PROCESSES)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=900)
    found = []
    while True:
        try:
            found.append(errors.get(timeout=1))
        except queue.Empty:
            break
    assert not found and [w.exitcode for w in workers] == [0] * N_PROCESSES, (
        "\n".join(found)[-6000:] + (f"\n--- server:\n{tail(server_log)}" if server_log else ""))

    expected_tags = tracking.train_tags(7, "minilm", prepared.digest, prepared.run_id,
                                        "minilm:char_ngrams=false,max_length=32")  # racing_writer's member
    for round_ in rounds:
        experiment = client.get_experiment_by_name(round_["experiment"])
        assert experiment.tags[tracking.EXPERIMENT_KIND] == tracking.CUSTOM_MODEL_DEVELOPMENT
        prepares = client.search_runs([experiment.experiment_id])
        assert [r.info.status for r in prepares] == ["FINISHED"] * N_PROCESSES
        assert {(d.dataset.name, d.dataset.digest) for r in prepares for d in r.inputs.dataset_inputs} == {
            ("psydefconv-train", prepared.digest), ("psydefconv-test", _test_digest(data_dir))}
        parent = client.get_run(round_["parent"])
        assert {k: parent.data.tags[k] for k in expected_tags} == expected_tags
        assert parent.data.params["prepare_run_id"] == prepared.run_id and parent.data.params["seed"] == "7"
        assert [(d.dataset.name, d.dataset.digest) for d in parent.inputs.dataset_inputs] == [
            ("psydefconv-train", prepared.digest)]
        dead = client.get_run(round_["dead"])
        assert dead.info.status == "FAILED" and "is gone" in dead.data.tags[tracking.END_REASON]


def _test_digest(data_dir) -> str:
    from psydef.core.data import dataset_digest, read_split

    return dataset_digest(read_split(data_dir / "test.json", labelled=False))


@pytest.mark.parametrize("store", ["sqlite server"], indirect=True)  # the README's store; the others: above
def test_fold_jobs_of_a_new_parent_as_command_lines(store, shared_prepare, tmp_path):
    """The README's recipe: a new parent, then one ``psydef train --fold k`` job per fold, all at once
    (behind a barrier once imported); the job completing the last fold ends the parent FINISHED."""
    uri, server_log = store
    data_dir, prepared = shared_prepare
    client = MlflowClient()
    experiment = client.get_experiment_by_name("psydef").experiment_id
    hyper = ",".join(f"{k}={str(v).lower()}" for k, v in JOB_HYPER.items())
    env = clean_env() | {"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                         "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for r in range(ROUNDS):
        parent = client.create_run(experiment, run_name="train seed=7").info.run_id
        folder = tmp_path / f"round-{r}"
        folder.mkdir()
        procs = []
        for k in range(N_SPLITS):
            args = ["train", "--data-dir", str(data_dir), "--seed", "7", "--prepare-run-id", prepared.run_id,
                    "--fold", str(k), "--parent-run-id", parent, "--backbone", "minilm", "--hyper", hyper,
                    "--experiment-name", "psydef"]
            log = (folder / f"fold-{k}.log").open("w")
            procs.append(subprocess.Popen([sys.executable, "-m", "tests.fixtures.concurrency", str(folder),
                                           str(N_SPLITS), *args], cwd=folder, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
            log.close()
        for k, proc in enumerate(procs):
            proc.wait(timeout=900)
            output = (folder / f"fold-{k}.log").read_text()
            assert proc.returncode == 0, (f"round {r}, fold {k} exited {proc.returncode}:\n{output[-4000:]}"
                                          + (f"\n--- server:\n{tail(server_log)}" if server_log else ""))
        run = client.get_run(parent)
        assert run.info.status == "FINISHED", f"round {r}: parent {parent} is {run.info.status}"
        assert sorted(tracking.fold_runs(parent)) == list(range(N_SPLITS))
        assert "oof_macro_f1" in run.data.metrics


# ---- the helper itself: a differing value is a conflict, a missing one is written again ----------
UNIQUE_ERRORS = {
    "sqlite": MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: tags.key, tags.run_uuid"),
    "postgresql": MlflowException('(psycopg2.errors.UniqueViolation) duplicate key value violates unique '
                                  'constraint "tag_pk"', error_code="INTERNAL_ERROR"),
    "server": RestException({"error_code": "BAD_REQUEST", "message": "(sqlite3.IntegrityError) UNIQUE constraint "
                                                                     "failed: experiment_tags.key"}),
}


@pytest.mark.parametrize("surface", UNIQUE_ERRORS)
def test_a_unique_key_error_is_settled_by_what_the_store_now_holds(surface):
    error = UNIQUE_ERRORS[surface]
    assert tracking.is_unique_violation(error)
    assert not tracking.is_unique_violation(MlflowException("RESOURCE_DOES_NOT_EXIST: no such run"))
    calls, state = [], {}

    def write(value):
        def attempt():
            calls.append(value)
            if len(calls) == 1:  # the first attempt loses the race
                raise error
            state["k"] = value
        return attempt

    # the other process wrote the same value: done, no second write
    state.update(k="v")
    tracking.tolerate_concurrent_write(write("v"), lambda: state, {"k": "v"}, what="run r")
    assert calls == ["v"]
    # it wrote another value: a real conflict, named
    calls.clear()
    with pytest.raises(tracking.ConcurrentWriteConflict, match=r"run r: another process wrote .*k: 'v', not 'w'"):
        tracking.tolerate_concurrent_write(write("w"), lambda: state, {"k": "w"}, what="run r")
    # nothing there yet: written again
    calls.clear()
    state.clear()
    tracking.tolerate_concurrent_write(write("x"), lambda: state, {"k": "x"}, what="run r")
    assert calls == ["x", "x"] and state == {"k": "x"}
    # any other error is not the helper's
    with pytest.raises(MlflowException, match="no such run"):
        tracking.tolerate_concurrent_write(lambda: (_ for _ in ()).throw(MlflowException("no such run")),
                                           lambda: state, {"k": "x"}, what="run r")
