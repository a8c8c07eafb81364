"""Integration: the whole `main` chain against a real `mlflow server` (started by
mlruns_config/start_server.sh on 127.0.0.1, artifacts proxied to a local folder), with a SQLite or a
PostgreSQL backend store, checked through the server's REST API.

The PostgreSQL case starts a private cluster in a temporary folder (initdb + pg_ctl, as the
``postgres`` user when running as root): no system service is needed. It skips when PostgreSQL's
server binaries or psycopg2 are missing."""
from __future__ import annotations

import glob
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import pytest

from psydef import tracking

REPO = Path(__file__).resolve().parents[1]
START_SERVER = REPO / "mlruns_config" / "start_server.sh"
SEEDS = (1, 2)
N_FOLDS = 5
# The smallest settings that still run every stage: two seeds, 5 folds each, a nested tune.
CHAIN_ARGS = ["--seeds", ",".join(map(str, SEEDS)), "--backbone", "minilm", "--hyper", "epochs=2,steps_per_epoch=5",
              "--n-trials", "60", "--inner-trials", "20"]
SERVER_START_TIMEOUT = 180  # seconds; a loaded 2-core machine needs ~20
CHAIN_TIMEOUT = 600


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def _clean_env() -> dict:
    """This environment without MLflow's run/experiment/store variables (a surrounding run must not leak)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"MLFLOW_DISABLE_TELEMETRY": "true"}


# ---- a private PostgreSQL cluster ------------------------------------------------------------------
def _postgres_bin() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/*/bin (Debian)."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).resolve().parent == Path(pg_ctl).resolve().parent:
        return Path(initdb).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found and (Path(found[-1]).parent / "initdb").exists() else None


def _as_cluster_owner():
    """A function turning a command into one run by the cluster's owner: this user, or ``postgres``
    when running as root (initdb and postgres refuse root). None when there is no way to switch."""
    if os.geteuid() != 0:
        return lambda cmd: cmd
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    if shutil.which("runuser"):
        return lambda cmd: ["runuser", "-u", "postgres", "--", *cmd]
    if shutil.which("su"):
        return lambda cmd: ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(cmd)]
    return None


@contextmanager
def postgres_cluster():
    """Yield ``(store_uri, password)`` of a fresh database on a private cluster listening on
    127.0.0.1:<free port> (password authentication over TCP, its unix socket in the cluster's folder);
    the cluster is stopped and removed afterwards."""
    import importlib.util

    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin); "
                    "apt-get install postgresql")
    if importlib.util.find_spec("psycopg2") is None:
        pytest.skip("psycopg2 is not installed: pip install -e '.[postgres]'")
    as_owner = _as_cluster_owner()
    if as_owner is None:
        pytest.skip("running as root without a 'postgres' user or runuser/su to run initdb as")
    import psycopg2

    # Short path under /tmp (unix socket paths are limited to ~100 bytes; pytest's tmp_path is private to root)
    root = Path(tempfile.mkdtemp(prefix="psydef-pg-"))
    data, log, pwfile = root / "data", root / "postgres.log", root / "pwfile"
    password, port = secrets.token_hex(12), free_port()
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        for path in (root, pwfile):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    env = {**_clean_env(), "LC_ALL": "C", "LANG": "C"}
    started = False
    try:
        subprocess.run(as_owner([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}",
                                 "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8",
                                 "--locale=C", "--no-sync"]),
                       check=True, capture_output=True, text=True, env=env, cwd=root, timeout=120)
        pwfile.unlink()
        started = True  # pg_ctl stop is harmless when start failed half-way
        proc = subprocess.run(as_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                                        "-o", f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off", "start"]),
                              capture_output=True, text=True, env=env, cwd=root, timeout=120)
        assert proc.returncode == 0, f"pg_ctl start failed: {proc.stdout}{proc.stderr}\n{_tail(log)}"
        admin = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", password=password, dbname="postgres")
        try:
            admin.autocommit = True
            admin.cursor().execute("CREATE DATABASE mlflow")
        finally:
            admin.close()
        # The driver named: SQLAlchemy >= 2.1 maps a bare postgresql:// to psycopg 3, the extra installs psycopg2
        yield f"postgresql+psycopg2://postgres:{password}@127.0.0.1:{port}/mlflow", password
    finally:
        if started:
            subprocess.run(as_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                           capture_output=True, env=env, cwd="/", timeout=60)
        shutil.rmtree(root, ignore_errors=True)


# ---- the tracking server ----------------------------------------------------------------------------
def _group_cmdlines(pgid: int) -> list[str]:
    """The command lines of the processes in process group ``pgid`` (Linux /proc; [] elsewhere)."""
    lines = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                lines.append(Path(stat).with_name("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, IndexError, ValueError):
            continue
    return lines


@contextmanager
def mlflow_server(store_uri: str, workdir: Path):
    """Start mlruns_config/start_server.sh in the foreground in its own process group; yield
    ``(tracking_uri, process, log_path)`` once /health answers; stop the whole group afterwards."""
    port = free_port()
    log = workdir / "server.log"
    env = _clean_env() | {"FOREGROUND": "1", "HOST": "127.0.0.1", "PORT": str(port), "BACKEND_STORE_URI": store_uri,
                          "ARTIFACTS_DESTINATION": str(workdir / "artifacts"),
                          "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    uri = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(START_SERVER)], cwd=workdir, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode} before answering:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer {uri}/health within {SERVER_START_TIMEOUT}s:\n{_tail(log)}")
            time.sleep(0.5)
        yield uri, proc, log
    finally:
        # The script exec'd mlflow, the leader of a new session: its pid is the group of it and its workers.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything left in the group (a stuck worker)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


# ---- the test ---------------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def server_store(request, tmp_path):
    """``(store_uri, secret)``: a SQLite file in tmp_path, or a database of a private PostgreSQL cluster
    whose password must never show up in logs, argv, params or tags."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/server.db", None
    else:
        with postgres_cluster() as (uri, password):
            yield uri, password


def test_main_chain_through_tracking_server(server_store, data_dir, tmp_path):
    from mlflow import MlflowClient

    store_uri, secret = server_store
    workdir, out_dir = tmp_path / "server", tmp_path / "out"
    workdir.mkdir()
    chain_dir = tmp_path / "chain"  # the chain's working directory: nothing may land here
    chain_dir.mkdir()
    with mlflow_server(store_uri, workdir) as (uri, proc, server_log):
        env = _clean_env() | {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": tracking.DEFAULT_EXPERIMENT,
                              "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        chain = subprocess.run([sys.executable, "-m", "entrypoints.main", "--data-dir", str(data_dir),
                                "--out-dir", str(out_dir), *CHAIN_ARGS],
                               cwd=chain_dir, env=env, capture_output=True, text=True, timeout=CHAIN_TIMEOUT)
        output = chain.stdout + chain.stderr
        assert chain.returncode == 0, f"main failed ({chain.returncode}):\n{output[-6000:]}\nserver:\n{_tail(server_log)}"

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        by_stage = defaultdict(list)
        for run in runs:
            by_stage[run.data.tags.get(tracking.STAGE)].append(run)
        assert {stage: len(rs) for stage, rs in by_stage.items()} == {
            tracking.PIPELINE: 1, tracking.PREPARE: 1, tracking.TRAIN: len(SEEDS), tracking.FOLD_RUN: len(SEEDS) * N_FOLDS,
            tracking.TUNE: 1, tracking.REGISTER: 1, tracking.PROMOTE: 1, tracking.PREDICT: 1}
        assert {run.info.status for run in runs} == {"FINISHED"}
        pipeline = by_stage[tracking.PIPELINE][0]
        parent = {run.info.run_id: run.data.tags.get("mlflow.parentRunId") for run in runs}
        assert parent[pipeline.info.run_id] is None
        for stage in (tracking.PREPARE, tracking.TRAIN, tracking.TUNE, tracking.REGISTER, tracking.PROMOTE,
                      tracking.PREDICT):
            assert all(parent[run.info.run_id] == pipeline.info.run_id for run in by_stage[stage]), stage
        train_ids = {run.info.run_id for run in by_stage[tracking.TRAIN]}
        assert sorted(int(run.data.tags[tracking.SEED]) for run in by_stage[tracking.TRAIN]) == list(SEEDS)
        for train_id in train_ids:
            folds = [run for run in by_stage[tracking.FOLD_RUN] if parent[run.info.run_id] == train_id]
            assert sorted(int(run.data.tags[tracking.FOLD]) for run in folds) == list(range(N_FOLDS))

        # Artifacts went through the server's proxy into ARTIFACTS_DESTINATION
        assert all(run.info.artifact_uri.startswith("mlflow-artifacts:") for run in runs)
        some_train = sorted(train_ids)[0]
        assert tracking.OOF_LOGITS in {f.path for f in client.list_artifacts(some_train, "oof")}
        assert list((workdir / "artifacts").rglob(tracking.FOLDS_CSV)), "no artifact in the server's destination"
        assert not (chain_dir / "mlruns").exists() and not (chain_dir / "mlflow.db").exists()

        # The registered version, its lineage and the production alias
        tune_id = by_stage[tracking.TUNE][0].info.run_id
        version = client.get_model_version_by_alias(tracking.MODEL_NAME, tracking.PRODUCTION)
        assert version.version == "1"
        assert version.run_id == by_stage[tracking.REGISTER][0].info.run_id
        assert version.tags[tracking.V_TUNE_RUN_ID] == tune_id
        assert set(version.tags[tracking.V_TRAIN_RUN_IDS].split(",")) == train_ids
        assert client.get_registered_model(tracking.MODEL_NAME).aliases == {tracking.PRODUCTION: "1"}
        assert pipeline.data.tags["psydef.model_version"] == "1" and pipeline.data.tags["psydef.tune_run_id"] == tune_id
        assert len(json.loads((out_dir / tracking.PREDICTION_JSON).read_text())) == 8

        if secret:  # the store's password: never in argv, logs, params or tags
            assert all(secret not in line for line in _group_cmdlines(proc.pid))
            assert secret not in _tail(server_log, 10**7) and secret not in output
            for run in runs:
                assert not any(secret in v for v in (*run.data.params.values(), *run.data.tags.values())), run.info.run_id
