"""Store URIs: a password in one is never printed, raised, logged as a param or tag, nor put in a
description (``tracking.redact_uri``), and a store that is not there fails at once in one line
(``tracking.probe``): http(s) servers, with the URI's login sent as basic auth, and PostgreSQL, MySQL and
SQL Server databases, as tracking store and as tune's Optuna storage."""
from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import pytest
from click.testing import CliRunner

from psydef.cli import cli
from psydef import tracking
from tests.fixtures.fake_runs import Store
from tests.fixtures.server import REPO, START_SERVER, clean_env, free_port, mlflow_server, postgres_cluster

SECRET = "s3cr/et?x"  # a '/' and a '?' inside: both broke earlier masks


@pytest.mark.parametrize("uri, shown", [
    (f"postgresql+psycopg2://psydef:{SECRET}@db:5432/mlflow", "postgresql+psycopg2://psydef:***@db:5432/mlflow"),
    ("postgresql+psycopg2://psydef@db/mlflow?sslmode=require&password=hunter2",
     "postgresql+psycopg2://psydef@db/mlflow?sslmode=require&password=***"),
    ("mysql+pymysql://:pw@db/x?PWD=a&sslpassword=b&token=c&api_key=d",
     "mysql+pymysql://:***@db/x?PWD=***&sslpassword=***&token=***&api_key=***"),
    ("http://alice:p%40ss@mlflow.internal:5000", "http://alice:***@mlflow.internal:5000"),
    ("see http://alice:pw@h:5000 and postgresql://u:pw2@h/db.",
     "see http://alice:***@h:5000 and postgresql://u:***@h/db."),
    ("sqlite:///runs@home/mlflow.db", "sqlite:///runs@home/mlflow.db"),
    ("models:/psydef-ensemble@production", "models:/psydef-ensemble@production"),
    ("http://127.0.0.1:5000 does not answer; mail admin@example.org", None),
])
def test_redact_uri_masks_passwords_only(uri, shown):
    assert tracking.redact_uri(uri) == (uri if shown is None else shown)


def test_start_server_masks_the_store_password(tmp_path):
    """What start_server.sh prints (mlflow itself replaced by a stub that prints its argv)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mlflow").write_text('#!/bin/sh\necho "mlflow argv: $*"\n')
    (bin_dir / "mlflow").chmod(0o755)
    store = f"postgresql+psycopg2://psydef:{SECRET}@db:5432/mlflow?sslmode=require&password={SECRET}"
    path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]])
    env = clean_env() | {"FOREGROUND": "1", "BACKEND_STORE_URI": store, "PATH": path}
    proc = subprocess.run(["bash", str(START_SERVER)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    shown = "store postgresql+psycopg2://psydef:***@db:5432/mlflow?sslmode=require&password=***,"
    assert shown in proc.stdout, proc.stdout
    assert "s3cr" not in proc.stdout + proc.stderr


# ---- http(s): the login in the URI ------------------------------------------------------------------
class _LoginServer(ThreadingHTTPServer):
    """Answers /health with 200 for the right basic-auth login and 500 otherwise (so that a probe
    without the login fails: an MLflow server's 401 would pass it)."""

    def __init__(self, login: str):
        self.login, self.seen = login, []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(handler):
                header = handler.headers.get("Authorization", "")
                self.seen.append(header)
                ok = handler.path == "/health" and header == "Basic " + base64.b64encode(login.encode()).decode()
                handler.send_response(200 if ok else 500)
                handler.end_headers()

            def log_message(handler, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def login_server():
    server = _LoginServer(f"alice:{SECRET}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_the_probe_sends_the_uri_login_as_basic_auth(login_server, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    port = login_server.server_address[1]
    quoted = SECRET.replace("/", "%2F").replace("?", "%3F")
    tracking.probe(f"http://alice:{quoted}@127.0.0.1:{port}")  # percent-encoded in the URI, decoded in the login
    with pytest.raises(tracking.TrackingStoreUnreachable) as refused:
        tracking.probe(f"http://alice:wrong{quoted}@127.0.0.1:{port}")
    assert "HTTP 500" in str(refused.value) and "alice:***@" in str(refused.value)
    assert "s3cr" not in str(refused.value)


def test_a_tracking_server_login_in_the_uri_is_never_printed_nor_logged(data_dir, tmp_path):
    """A real `mlflow server` (no login of its own: MLflow's client sends the URI's as basic auth, which it
    ignores); prepare through it. MLflow prints each run's link from its tracking URI."""
    workdir = tmp_path / "server"
    workdir.mkdir()
    with mlflow_server(f"sqlite:///{tmp_path}/server.db", workdir) as (uri, _, _):
        with_login = uri.replace("http://", f"http://alice:{SECRET.replace('/', '%2F').replace('?', '%3F')}@")
        proc = subprocess.run([sys.executable, "-m", "entrypoints", "prepare", "--data-dir", str(data_dir)], cwd=tmp_path,
                              env=clean_env() | {"MLFLOW_TRACKING_URI": with_login, "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, timeout=300)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output
        assert "s3cr" not in output
        client = mlflow.MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT).experiment_id])
        assert runs and all("s3cr" not in value for run in runs
                            for value in (*run.data.params.values(), *run.data.tags.values()))


# ---- what psydef logs ------------------------------------------------------------------------------
def test_params_and_descriptions_are_masked(tracking_uri):
    storage = f"postgresql+psycopg2://psydef:{SECRET}@db/optuna"
    with mlflow.start_run() as run:
        tracking.log_new_params({"storage": storage, "n_trials": 3})
        tracking.describe(f"A study in {storage}.")
    run = mlflow.get_run(run.info.run_id)
    assert run.data.params == {"storage": "postgresql+psycopg2://psydef:***@db/optuna", "n_trials": "3"}
    assert run.data.tags[tracking.NOTE] == "A study in postgresql+psycopg2://psydef:***@db/optuna."


def test_a_password_that_mlflow_run_logged_from_p_is_warned_about(tracking_uri, monkeypatch, caplog):
    """`mlflow run -P storage=...` logs the value before psydef starts (a param cannot be changed): the
    stage taking over that run says so and how to pass the password instead."""
    experiment = tracking.configure(tracking_uri)
    run = mlflow.MlflowClient().create_run(experiment)
    mlflow.MlflowClient().log_param(run.info.run_id, "storage", f"postgresql+psycopg2://psydef:{SECRET}@db/optuna")
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    with tracking.stage_run(tracking.TUNE, "tune"):
        pass
    out = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"run {run.info.run_id} holds a password in its param(s) storage" in out and "PGPASSWORD" in out, out
    assert "s3cr" not in out


# ---- databases: one line at once --------------------------------------------------------------------
def test_an_unreachable_postgresql_tracking_store_is_one_line(data_dir, tmp_path):
    port = free_port()
    uri = f"postgresql+psycopg2://psydef:{SECRET}@127.0.0.1:{port}/mlflow"  # nothing listens there
    proc = subprocess.run([sys.executable, "-m", "entrypoints", "prepare", "--data-dir", str(data_dir)], cwd=tmp_path,
                          env=clean_env() | {"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout == "" and "s3cr" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"Error: tracking store {tracking.redact_uri(uri)} does not answer (TCP 127.0.0.1:{port}: Connection refused)"
        ": check that the database server is running, its host and port, and "
        "MLFLOW_TRACKING_URI / --tracking-uri"], proc.stderr


def test_an_unreachable_optuna_storage_is_one_line(tracking_uri):
    storage = f"postgresql+psycopg2://psydef:{SECRET}@127.0.0.1:{free_port()}/optuna"
    result = CliRunner().invoke(cli, ["tune", "--train-runs", "a,b", "--storage", storage, "--tracking-uri",
                                      tracking_uri])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    expected = f"Error: Optuna storage {tracking.redact_uri(storage)} does not answer (TCP "
    assert result.output.startswith(expected), result.output
    assert "--storage (-P storage)" in result.output and "s3cr" not in result.output
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")  # refused before any run


def test_a_postgresql_storage_login_is_checked_and_never_logged(tracking_uri, experiment_id, tmp_path):
    """A real cluster: a wrong password is one line saying where the password belongs; the right one in
    the URI works, and the tune run's param, tags and description hold it masked."""
    fake = Store(tmp_path, experiment_id)
    prepare = fake.prepare()
    members = ",".join(fake.train(prepare, seed) for seed in (1, 2))
    with postgres_cluster() as (uri, password):
        wrong = uri.replace(f":{password}@", ":wrong@")
        result = CliRunner().invoke(cli, ["tune", "--train-runs", members, "--storage", wrong])
        assert result.exit_code == 1, result.output
        error = result.output.strip()
        assert error.startswith(f"Error: Optuna storage {tracking.redact_uri(wrong)} refused the connection ("), error
        assert "password authentication failed" in error and "PGPASSWORD or ~/.pgpass" in error
        assert "\n" not in error and "wrong" not in error

        result = CliRunner().invoke(cli, ["tune", "--train-runs", members, "--storage", uri, "--n-trials", "4",
                                          "--inner-trials", "2", "--sampler", "random", "--n-jobs", "1"])
        assert result.exit_code == 0, result.output
        assert password not in result.output
        [run] = mlflow.search_runs(filter_string=f"tags.`{tracking.STAGE}` = '{tracking.TUNE}'", output_format="list")
        assert run.data.params["storage"] == tracking.redact_uri(uri) != uri
        assert not any(password in value for value in (*run.data.params.values(), *run.data.tags.values()))
