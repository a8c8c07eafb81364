"""Where to track: pointing MLflow at a tracking store (``configure``), the per-store artifact root of
SQLite stores, the fast probe of a store that does not answer, and the MLflow client."""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from psydef.core.secrets import redact_uri
from psydef.tracking.names import CUSTOM_MODEL_DEVELOPMENT, DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI, EXPERIMENT_KIND
from psydef.tracking.writes import tolerate_concurrent_write

logger = logging.getLogger(__name__)


def configure(tracking_uri: str | None = None, experiment: str | None = None) -> str:
    """Point MLflow at ``tracking_uri`` (else $MLFLOW_TRACKING_URI, else the local SQLite default)
    and at ``experiment`` (else $MLFLOW_EXPERIMENT_NAME, else ``psydef``). Returns the experiment id.

    Under ``mlflow run`` the run is already open in MLflow's chosen experiment; keep it (in a SQLite store
    with this store's own artifact root: :func:`_store_artifact_root_under_mlflow_run`). The store is
    probed first (:func:`probe`); an http(s) URI's ``user:password@`` goes to MLflow as its login
    (:func:`_credentials_to_env`), not in the URI."""
    import mlflow

    from psydef import progress

    progress.line_buffered()  # psydef's lines in order with the bars, also when output goes to a file
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per tiny file is noise
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    probe(uri)
    mlflow.set_tracking_uri(_credentials_to_env(uri))
    active_run_id = os.environ.get("MLFLOW_RUN_ID")
    if active_run_id and not experiment:  # launched by `mlflow run`: its run names the experiment
        launched = mlflow.get_run(active_run_id)
        _store_artifact_root_under_mlflow_run(uri, launched)
        found = mlflow.set_experiment(experiment_id=launched.info.experiment_id)
    else:
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        # Created here, not by mlflow.set_experiment: when another process creates it at the same moment,
        # set_experiment returns it without making it the active experiment (the runs would land elsewhere).
        if mlflow.get_experiment_by_name(name) is None:
            from mlflow.exceptions import MlflowException

            try:
                mlflow.create_experiment(name, artifact_location=sqlite_artifact_root(uri))
            except MlflowException as err:  # another process created it first
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        found = mlflow.set_experiment(name)
    if EXPERIMENT_KIND not in found.tags:  # a kind someone chose in the UI stays
        experiment_id = found.experiment_id
        tolerate_concurrent_write(
            lambda: client().set_experiment_tag(experiment_id, EXPERIMENT_KIND, CUSTOM_MODEL_DEVELOPMENT),
            lambda: client().get_experiment(experiment_id).tags, {EXPERIMENT_KIND: CUSTOM_MODEL_DEVELOPMENT},
            what=f"experiment {found.name!r}")
    return found.experiment_id


def ui_runs_url(server: str, experiment_id: str) -> str:
    """The experiment's training-runs table in the MLflow UI at ``server``. MLflow 3.17's UI opens an
    experiment in the GenAI view (traces) unless the link or the browser's last choice says
    ``workflowType=machine_learning``; it does not read the experiment's kind tag for that."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def sqlite_artifact_root(uri: str) -> str | None:
    """The artifact root of new experiments in a SQLite store: ``mlruns/<store name>`` beside the
    database file (``sqlite:///a/mlflow.db`` -> ``a/mlruns/mlflow``), so two stores in one folder
    never share artifacts. None for other stores (a server chooses its own)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    if str(db) in ("", ":memory:"):
        return None
    return (db.resolve().parent / "mlruns" / db.stem).as_uri()


def _is_mlflow_default_root(location: str, experiment_id: str) -> bool:
    """Whether ``location`` is MLflow's default artifact root of a SQLite store's experiment,
    ``<working directory>/mlruns/<experiment id>``, which every SQLite store in that folder shares."""
    import urllib.parse

    path = Path(urllib.parse.urlparse(location).path)
    return path.name == str(experiment_id) and path.parent.name == "mlruns"


def _store_artifact_root_under_mlflow_run(uri: str, run) -> None:
    """Under ``mlflow run`` in a SQLite store: ``mlflow run`` created a new experiment with MLflow's default
    artifact root (``./mlruns/<id>``, shared by every SQLite store in the folder) and the run in it before
    psydef starts. Give the experiment this store's own root (:func:`sqlite_artifact_root`), and the run
    its place there while it holds no artifact yet, so that two stores in one folder never mix artifacts.
    MLflow has no API to change an artifact location: the two columns are written through MLflow's own
    SQLAlchemy models, in the store's own session."""
    root = sqlite_artifact_root(uri)
    if root is None:
        return
    from mlflow.store.tracking.dbmodels.models import SqlExperiment, SqlRun
    from mlflow.tracking._tracking_service.utils import _get_store
    from mlflow.utils.file_utils import local_file_uri_to_path

    experiment_id, run_id = run.info.experiment_id, run.info.run_id
    experiment = client().get_experiment(experiment_id)
    move_experiment = experiment.artifact_location != root and _is_mlflow_default_root(experiment.artifact_location,
                                                                                       experiment_id)
    run_root = run.info.artifact_uri.removesuffix(f"/{run_id}/artifacts")  # it may predate a sibling's move
    folder = Path(local_file_uri_to_path(run.info.artifact_uri))
    move_run = run_root != root and _is_mlflow_default_root(run_root, experiment_id) and not (
        folder.is_dir() and any(folder.iterdir()))
    if not (move_experiment or move_run):
        return
    with _get_store().ManagedSessionMaker() as session:
        if move_experiment:
            session.query(SqlExperiment).filter(SqlExperiment.experiment_id == int(experiment_id)).update(
                {SqlExperiment.artifact_location: root})
        if move_run:
            session.query(SqlRun).filter(SqlRun.run_uuid == run_id).update(
                {SqlRun.artifact_uri: f"{root}/{run_id}/artifacts"})
    if move_experiment:
        logger.info(f"experiment {experiment.name!r} (created by `mlflow run` with artifacts in "
                    f"{experiment.artifact_location}, which every SQLite store of that folder shares) now keeps "
                    f"them in {root}")


PROBE_TIMEOUT_S = 5  # the first contact with a tracking server or database; MLflow's own retries apply after it

def split_userinfo(uri: str) -> tuple[str, str | None, str | None]:
    """An http(s) URI without its ``user:password@``, and the (percent-decoded) user and password."""
    import urllib.parse

    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri, None, None
    host = parts.netloc.rpartition("@")[2]
    plain = urllib.parse.urlunsplit(parts._replace(netloc=host))
    unquote = urllib.parse.unquote
    return plain, unquote(parts.username or ""), None if parts.password is None else unquote(parts.password)


def _credentials_to_env(uri: str) -> str:
    """An http(s) tracking URI with its ``user:password@`` moved to MLFLOW_TRACKING_USERNAME/PASSWORD
    (unless those are set: MLflow lets them win over the URI), so that MLflow's client, which prints
    and hands on its tracking URI (run links, subprocesses), never holds the password in it."""
    if not uri.startswith(("http://", "https://")):
        return uri
    plain, user, password = split_userinfo(uri)
    if user is not None and password is not None:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user)
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password)
    return plain


class TrackingStoreUnreachable(ValueError):
    """The tracking server or database did not answer the first request."""


# SQLAlchemy database stores (MLflow's and Optuna's): the default port of each, for the probe
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def probe(uri: str, timeout: float = PROBE_TIMEOUT_S, *, setting: str = "MLFLOW_TRACKING_URI / --tracking-uri",
          what: str = "tracking store") -> None:
    """One first contact with a short timeout, so that a store that is not there fails at once with one
    line (MLflow and Optuna retry for minutes, then print chained tracebacks): ``/health`` of an http(s)
    tracking server (with basic auth from the URI's ``user:password@`` or MLFLOW_TRACKING_USERNAME/
    PASSWORD), one connection to a PostgreSQL, MySQL or SQL Server database. ``setting`` names where the
    URI came from, ``what`` the store, in the message; the URI is printed with its password masked."""
    if uri.startswith(("http://", "https://")):
        _probe_http(uri, timeout, setting)
    elif uri.split(":", 1)[0].split("+", 1)[0] in DATABASE_PORTS:
        _probe_database(uri, timeout, setting, what)


def _probe_http(uri: str, timeout: float, setting: str) -> None:
    """An MLflow server answers /health with 200 (401/403 behind a login); any other status means
    something else listens there."""
    import base64
    import urllib.error
    import urllib.request

    plain, user, password = split_userinfo(uri)
    user, password = (os.environ.get("MLFLOW_TRACKING_USERNAME", user),
                      os.environ.get("MLFLOW_TRACKING_PASSWORD", password))
    request = urllib.request.Request(f"{plain.rstrip('/')}/health")
    if user is not None and password is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    shown = redact_uri(uri)
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError as err:
        if err.code not in (401, 403):
            raise TrackingStoreUnreachable(
                f"tracking server {shown} does not answer like an MLflow server (HTTP {err.code} for /health): check "
                f"its host, port and path, and {setting}") from None
    except (OSError, ValueError) as err:
        reason = redact_uri(getattr(err, "reason", err))
        raise TrackingStoreUnreachable(
            f"tracking server {shown} does not answer ({reason}): check that it is running (bash "
            f"mlruns_config/start_server.sh), its host and port, and {setting}") from None


def _probe_database(uri: str, timeout: float, setting: str, what: str) -> None:
    """A TCP connection to the database's host and port, then one login through SQLAlchemy: an
    unreachable server, a wrong password, a missing database or driver fail here in one line."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    shown = redact_uri(uri)
    try:
        url = make_url(uri)
    except (sqlalchemy.exc.ArgumentError, ValueError) as err:
        raise TrackingStoreUnreachable(f"{what} {shown} is not a valid database URI ({redact_uri(err)}); "
                                       f"check {setting}") from None
    if url.host and not url.host.startswith("/"):  # else a unix socket (libpq's host=/path): the login below
        port = url.port or DATABASE_PORTS[url.get_backend_name()]
        try:
            socket.create_connection((url.host, port), timeout=timeout).close()
        except OSError as err:
            raise TrackingStoreUnreachable(
                f"{what} {shown} does not answer (TCP {url.host}:{port}: {err.strerror or err}): check that the "
                f"database server is running, its host and port, and {setting}") from None
    # psycopg2 and the MySQL drivers take connect_timeout (seconds); a server that accepted TCP answers a login
    timeouts = {"connect_timeout": int(timeout)} if url.get_driver_name() in (
        "psycopg2", "psycopg", "pymysql", "mysqldb") else {}
    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args=timeouts)
        try:
            engine.connect().close()
        finally:
            engine.dispose()
    except ImportError as err:
        raise TrackingStoreUnreachable(f"{what} {shown}: its database driver is not installed ({err}); "
                                       'pip install -e ".[postgres]" for postgresql+psycopg2') from None
    except sqlalchemy.exc.SQLAlchemyError as err:
        reason = " ".join(str(getattr(err, "orig", None) or err).split())
        raise TrackingStoreUnreachable(
            f"{what} {shown} refused the connection ({redact_uri(reason)[:300]}): check the user, the database "
            f"and the password (keep it out of the URI: libpq reads PGPASSWORD or ~/.pgpass), and {setting}") from None


# ---------------------------------------------------------------------------------------------
# Run and registry queries: the only place that builds filter strings


def client():
    from mlflow import MlflowClient

    return MlflowClient()
