"""MLflow names in one place: experiment, tags, run names and artifact paths, plus the small
helpers that read and write them. Tracking code never does math."""
from __future__ import annotations

import logging
import os
import random
import signal
import socket
import tempfile
import threading
import time
import uuid
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from psydef.core.labels import ALL_LABELS
from psydef.core.secrets import redact_uri  # noqa: F401 (also tracking.redact_uri for callers)

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "psydef"
# The embedded default: MLflow's local SQLite store in the working directory, artifacts beside it.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# Tags
STAGE = "psydef.stage"
SEED = "psydef.seed"
BACKBONE = "psydef.backbone"
DATA_DIGEST = "psydef.data_digest"
PREPARE_RUN_ID = "psydef.prepare_run_id"
FOLD = "psydef.fold"
FOLD_STATUS = "psydef.fold_status"  # FOLD_FINISHED only once every fold artifact is logged
FOLD_FINISHED = "finished"
CHECKPOINT_EPOCH = "psydef.checkpoint_epoch"  # a fold run's epoch whose checkpoint/ is fully logged
RESUMED_FROM = "psydef.resumed_from"  # a fold run that continued the checkpoint of this killed fold run
MEMBER_RUN_IDS = "psydef.member_run_ids"  # a tune run's train runs, comma-separated, in ensemble order
STUDY_NAME = "psydef.study_name"  # a tune run's Optuna study (in its storage param)
PIPELINE_TUNE_RUN_ID, PIPELINE_MODEL_VERSION = "psydef.tune_run_id", "psydef.model_version"  # on a pipeline run
# MLflow's own tags
PARENT_RUN_ID = "mlflow.parentRunId"  # on nested runs
RUN_NAME = "mlflow.runName"
NOTE = "mlflow.note.content"  # a run's description (the UI's Description box)
# The experiment's kind: model training, not GenAI. MLflow 3.17's UI picks its view from the link
# instead (ui_runs_url); clients that read the kind see it here.
EXPERIMENT_KIND, CUSTOM_MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"
DATASET_CONTEXT, TRAINING = "mlflow.data.context", "training"  # a dataset input's role
# Liveness of a stage run (see "Heartbeat" below): unix time of the last beat, and who beats
HEARTBEAT, HEARTBEAT_PID, HEARTBEAT_HOST = "psydef.heartbeat", "psydef.pid", "psydef.host"
END_REASON = "psydef.end_reason"  # why a run was ended by another process

# Stages (values of the STAGE tag)
PREPARE, TRAIN, FOLD_RUN, TUNE, REGISTER, PROMOTE, PREDICT, PIPELINE = (
    "prepare", "train", "fold", "tune", "register", "promote", "predict", "pipeline")

# Artifact paths
FOLDS_CSV = "folds.csv"
AUGMENTED_JSON = "augmented.json"  # the prepare run's variants, with their source ids
CLASS_PLOT = "plots/class_distribution.png"
OOF_IDS, OOF_LOGITS = "oof/ids.json", "oof/logits.npy"
TEST_IDS, TEST_LOGITS, TEST_PROBS = "test/ids.json", "test/logits.npy", "test/probs.npy"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoint"  # a fold run's training state while it trains (deleted once the fold completes)
ENSEMBLE_JSON = "ensemble.json"
TRIALS_CSV = "trials.csv"
HISTORY_PLOT, IMPORTANCE_PLOT = "plots/optimization_history.png", "plots/param_importances.png"
HISTORY_HTML, IMPORTANCE_HTML = "plots/optimization_history.html", "plots/param_importances.html"  # with plotly
MODEL_ARTIFACT = "model"  # the pyfunc logged by a register run
PREDICTION_JSON, PREDICTION_ZIP = "prediction.json", "prediction.zip"  # CodaBench submission
PREDICT_IDS, PREDICT_PROBS = "ids.json", "probs.npy"
CONFUSION_PLOT = "plots/confusion_matrix.png"
PER_CLASS_F1_PLOT = "plots/per_class_f1.png"
# MLflow's system metrics (SystemMetricsMonitor's names; GPUs add system/gpu_<i>_...), on fold and pipeline runs
SYSTEM_CPU, SYSTEM_MEMORY = "system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"

# Model registry: the ensemble's name, its aliases, the deprecated stage set on request
MODEL_NAME = "psydef-ensemble"
PRODUCTION, PREVIOUS = "production", "previous"  # the champion and the one it replaced


def registered_model_uri(name: str, *, version: str | int | None = None, alias: str | None = None) -> str:
    """``models:/name/version`` or ``models:/name@alias``."""
    return f"models:/{name}/{version}" if alias is None else f"models:/{name}@{alias}"


PRODUCTION_URI = registered_model_uri(MODEL_NAME, alias=PRODUCTION)
LEGACY_STAGE = "Production"

# Tune metrics. RAW_F1: the plain blend (equal weights, delta 0, no gate) on the OOF rows; CALIBRATED_F1: the
# searched rule on the rows it was searched on (optimistic); CALIBRATED_ESTIMATED_F1 and ESTIMATED_GAIN (with the
# spread of its folds): the searched rule's macro-F1 and gain over the plain blend on rows its search never saw
# (psydef.calibration.estimate); ESTIMATED_F1: that estimate for the rule tune chose. Register logs MODEL_METRICS
# on the logged model it registers; the promote gate compares GATE_METRIC (the version tag of older versions).
RAW_F1, CALIBRATED_F1 = "oof_macro_f1_raw", "oof_macro_f1_calibrated"
CALIBRATED_ESTIMATED_F1 = "oof_macro_f1_calibrated_estimated"
ESTIMATED_GAIN, ESTIMATED_GAIN_STD = "calibration_gain_estimated", "calibration_gain_estimated_fold_std"
ESTIMATED_F1 = "oof_macro_f1_estimated"
OOF_LEVEL_F1 = "oof_f1_level_{}"  # per level, of the chosen rule on the OOF rows
# Tag of a tune run: which rule it chose (the calibrated one only when ESTIMATED_GAIN > 0)
CALIBRATION, CALIBRATED, PLAIN = "psydef.calibration", "calibrated", "plain"
GATE_METRIC = ESTIMATED_F1  # what the promote gate compares: rename in one line
MODEL_METRICS = (RAW_F1, CALIBRATED_F1, CALIBRATED_ESTIMATED_F1, ESTIMATED_GAIN, ESTIMATED_GAIN_STD, ESTIMATED_F1,
                 *(OOF_LEVEL_F1.format(level) for level in ALL_LABELS))
# Model version tags (lineage)
V_TUNE_RUN_ID, V_TRAIN_RUN_IDS, V_DATA_DIGEST, V_BACKBONE = "tune_run_id", "train_run_ids", "data_digest", "backbone"


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
        root = sqlite_artifact_root(uri)
        if root is not None and mlflow.get_experiment_by_name(name) is None:
            from mlflow.exceptions import MlflowException

            try:
                mlflow.create_experiment(name, artifact_location=root)
            except MlflowException as err:  # another process created it first
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        found = mlflow.set_experiment(name)
    if EXPERIMENT_KIND not in found.tags:  # a kind someone chose in the UI stays
        client().set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, CUSTOM_MODEL_DEVELOPMENT)
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
                    f"{experiment.artifact_location}, which every SQLite store of that folder shares) now keeps them "
                    f"in {root}")


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


def get_run(run_id: str, stage: str | None = None, *, what: str | None = None):
    """The run ``run_id``, checked to be a ``stage`` run when a stage is given; a ValueError that
    names the run (and the tracking store) otherwise. ``what`` names the run in that message."""
    import mlflow
    from mlflow.exceptions import MlflowException

    what = what or (f"{stage} run" if stage else "run")
    try:
        run = mlflow.get_run(run_id)
    except MlflowException as err:
        raise ValueError(f"{what} {run_id!r} does not exist in {redact_uri(mlflow.get_tracking_uri())}") from err
    found = run.data.tags.get(STAGE)
    if stage and found != stage:
        hint = " (a fold run: pass its parent train run)" if found == FOLD_RUN else ""
        raise ValueError(f"run {run_id} is not a {stage} run (tag {STAGE}={found!r}){hint}")
    return run


def train_tags(seed: int, backbone: str, data_digest: str, prepare_run_id: str) -> dict[str, str]:
    """The tags of a train parent run: what tune, register and a resume look it up by."""
    return {STAGE: TRAIN, SEED: str(seed), BACKBONE: backbone, DATA_DIGEST: data_digest, PREPARE_RUN_ID: prepare_run_id}


def fold_tags(parent_run_id: str, fold: int, **train: object) -> dict[str, str]:
    """The tags of fold run ``fold`` under a train parent (``train``: :func:`train_tags`' arguments)."""
    return {**train_tags(**train), STAGE: FOLD_RUN, FOLD: str(fold), PARENT_RUN_ID: parent_run_id}


def complete_fold() -> None:
    """Mark the active fold run complete: called after its last artifact is logged."""
    import mlflow

    mlflow.set_tag(FOLD_STATUS, FOLD_FINISHED)


@contextmanager
def stage_run(stage: str, run_name: str, tags: dict | None = None, *, log_system_metrics: bool = False):
    """Open the run of one stage: nested under the active run (the pipeline's) when there is one;
    under ``mlflow run`` the first stage takes over the run that ``mlflow run`` created.
    ``log_system_metrics``: the run logs :func:`system_metrics`."""
    import mlflow

    from psydef import progress

    mark_dead_runs_failed()
    # MLflow's own monitor (MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true) would log the same metrics twice
    with _failed_on_sigterm(), mlflow.start_run(run_name=run_name, nested=mlflow.active_run() is not None,
                                                log_system_metrics=False if log_system_metrics else None) as run:
        mlflow.set_tags({STAGE: stage, **(tags or {})})  # start_run ignores tags when resuming a run
        _warn_exposed_params(run)
        progress.banner(f"{stage}: {run_name} (run {run.info.run_id})")
        with heartbeat(run.info.run_id), system_metrics(run.info.run_id) if log_system_metrics else nullcontext():
            yield run


def _warn_exposed_params(run) -> None:
    """Say so when the run holds a password in a param: only ``mlflow run`` logs one (from ``-P``, before
    psydef starts), and a param can be neither changed nor deleted."""
    exposed = sorted(key for key, value in run.data.params.items() if redact_uri(value) != value)
    if exposed:
        logger.warning(f"run {run.info.run_id} holds a password in its param(s) {', '.join(exposed)}, logged by "
                       "`mlflow run` from -P: change that password, and pass it through the environment (PGPASSWORD or "
                       "~/.pgpass for PostgreSQL, MLFLOW_TRACKING_PASSWORD for a tracking server), never in -P values")


@contextmanager
def system_metrics(run_id: str):
    """Log MLflow's system metrics (``system/...``: CPU, memory, disk and network; each GPU's use,
    memory and power with the ``gpu`` extra) on ``run_id`` while inside. MLflow's monitor thread
    samples every 10 s ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) and drops the samples of the interval
    it is in when stopped; on leaving, the thread is stopped and joined, and those samples are logged
    with one taken then, so a run shorter than one interval has them too.
    ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`` turns them off."""
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
    from mlflow.exceptions import MlflowException
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    if MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.defined and not MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get():
        yield
        return
    monitor_log = logging.getLogger("mlflow.system_metrics")
    if monitor_log.level == logging.NOTSET:  # four INFO lines a run (start, stop, no GPU) beside one a fold
        monitor_log.setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(run_id)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        try:
            if held := monitor.aggregate_metrics():
                monitor.publish_metrics(held)
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except (MlflowException, OSError) as err:  # a server away: only these samples are lost
            logger.warning("run %s: the last system metrics were not logged: %s", run_id, err)


def log_new_params(params: dict, run_id: str | None = None) -> None:
    """Log the params the run (default: the active one) does not hold yet. Under ``mlflow run`` the
    ``-P`` values are already the run's params (as strings), and MLflow refuses to change a value.
    Passwords in the values are masked (:func:`redact_uri`)."""
    import mlflow
    from mlflow.entities import Param

    run_id = run_id or mlflow.active_run().info.run_id
    given = mlflow.get_run(run_id).data.params
    new = [Param(key, redact_uri(str(value))) for key, value in params.items() if key not in given]
    mlflow.MlflowClient().log_batch(run_id, params=new)


def describe(text: str, run_id: str | None = None) -> None:
    """The run's description (default: the active run's), shown in the UI's run page and runs table."""
    import mlflow

    client().set_tag(run_id or mlflow.active_run().info.run_id, NOTE, redact_uri(text))


def log_dataset(table, path: str | Path, *, name: str, digest: str, context: str, targets: str | None = None) -> None:
    """Log ``table`` (read from the file ``path``) as a dataset input of the active run."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():
        # MLflow registers the same local-file source twice (schemes "" and "file") and warns that it
        # picked one; and it hints that integer columns cannot hold missing values, which only matters
        # for a model's input schema, not for a dataset that is recorded.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
        dataset = mlflow.data.from_pandas(table, source=resolve_dataset_source(str(path)), targets=targets,
                                          name=name, digest=digest)
        mlflow.log_input(dataset, context=context)


def log_training_dataset(run_id: str, prepare_run_id: str) -> None:
    """Log on ``run_id`` the training dataset input of the prepare run (same name, digest, source and
    schema), so the runs table and the compare view show which data a run was trained on."""
    from mlflow.entities import DatasetInput, InputTag

    inputs = client().get_run(prepare_run_id).inputs.dataset_inputs
    training = [i.dataset for i in inputs if {t.key: t.value for t in i.tags}.get(DATASET_CONTEXT) == TRAINING]
    client().log_inputs(run_id, [DatasetInput(d, [InputTag(DATASET_CONTEXT, TRAINING)]) for d in training])


def log_npy(array: np.ndarray, artifact_path: str) -> None:
    import mlflow

    directory, name = os.path.split(artifact_path)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / name, array)
        mlflow.log_artifact(str(Path(tmp) / name), artifact_path=directory or None)


def log_figure(figure, artifact_path: str) -> None:
    """Log a matplotlib figure as a PNG, or a plotly one as HTML that holds plotly.js (it opens without
    network), on the active run at ``artifact_path``."""
    import mlflow

    html = artifact_path.endswith(".html")
    mlflow.log_figure(figure, artifact_path,
                      save_kwargs={"include_plotlyjs": True} if html else {"dpi": 120, "bbox_inches": "tight"})


def artifact_uri(run_id: str, artifact_path: str) -> str:
    """The URI of a run's artifact, for ``mlflow.artifacts.load_dict`` and friends."""
    return f"runs:/{run_id}/{artifact_path}"


def load_npy(run_id: str, artifact_path: str) -> np.ndarray:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=tmp)
        return np.load(local, allow_pickle=False)


# ---------------------------------------------------------------------------------------------
# Run and registry queries: the only place that builds filter strings


def client():
    from mlflow import MlflowClient

    return MlflowClient()


def fold_runs(parent_run_id: str) -> dict[int, object]:
    """The newest complete fold run of each fold under a parent."""
    runs = client().search_runs(
        [client().get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.`{PARENT_RUN_ID}` = '{parent_run_id}' and tags.`{STAGE}` = '{FOLD_RUN}' "
                      f"and tags.`{FOLD_STATUS}` = '{FOLD_FINISHED}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"])
    complete: dict[int, object] = {}
    for run in runs:
        complete.setdefault(int(run.data.tags[FOLD]), run)
    return complete


def complete_fold_runs(run) -> list:
    """The complete fold runs of train run ``run`` in fold order, one per fold of its prepare run;
    a ValueError naming the folds that are not complete."""
    run_id = run.info.run_id
    prepare = get_run(run.data.tags.get(PREPARE_RUN_ID, ""), what=f"prepare run of train run {run_id}")
    n_splits = int(prepare.data.params["n_splits"])
    folds = fold_runs(run_id)
    missing = sorted(set(range(n_splits)) - set(folds))
    if missing:
        raise ValueError(f"train run {run_id} has no complete fold run for folds {missing} (of {n_splits}); "
                         "finish its training (train -P resume=true, or -P fold=k) first")
    return [folds[k] for k in range(n_splits)]


def mark_stale_folds_failed(parent_run_id: str, fold: int | None = None) -> None:
    """Fold runs left RUNNING by a killed process are marked FAILED before a resume (all of them), or
    before fold ``fold`` is trained again (only that fold's: other folds may be training right now in
    parallel jobs)."""
    mlflow_client = client()
    only_fold = "" if fold is None else f" and tags.`{FOLD}` = '{fold}'"
    for run in mlflow_client.search_runs([mlflow_client.get_run(parent_run_id).info.experiment_id],
                                  filter_string=f"tags.`{PARENT_RUN_ID}` = '{parent_run_id}' "
                                                "and attributes.status = 'RUNNING'" + only_fold):
        mlflow_client.set_terminated(run.info.run_id, "FAILED")


def _fold_attempts(parent_run_id: str, fold: int) -> list:
    """Every fold run of fold ``fold`` under a parent, newest first."""
    mlflow_client = client()
    return mlflow_client.search_runs(
        [mlflow_client.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.`{PARENT_RUN_ID}` = '{parent_run_id}' and tags.`{STAGE}` = '{FOLD_RUN}' "
                      f"and tags.`{FOLD}` = '{fold}'",
        order_by=["attributes.start_time DESC"])


def checkpointed_fold_run(parent_run_id: str, fold: int):
    """The newest fold run of fold ``fold`` under a parent that did not finish and logged a
    checkpoint (what a resume continues), or None."""
    return next((run for run in _fold_attempts(parent_run_id, fold)
                 if CHECKPOINT_EPOCH in run.data.tags and run.info.status != "FINISHED"), None)


def log_checkpoint(folder: Path, epoch: int) -> None:
    """Log a fold's training state to the active fold run (``checkpoint/``, replacing the previous
    epoch's), then tag the epoch: the tag says a checkpoint was fully logged."""
    import mlflow

    mlflow.log_artifacts(str(folder), CHECKPOINT_DIR)
    mlflow.set_tag(CHECKPOINT_EPOCH, str(epoch))


def continue_fold_run(run, dst: Path) -> Path:
    """Continue killed fold run ``run`` in the active run: download its checkpoint into ``dst``, copy
    its per-epoch metrics up to the checkpoint's epoch, tag the active run as resumed from it. Returns
    the checkpoint folder."""
    import mlflow

    folder = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=CHECKPOINT_DIR,
                                                      dst_path=str(dst)))
    epoch = int(run.data.tags[CHECKPOINT_EPOCH])
    mlflow_client = client()
    per_epoch = [key for key in run.data.metrics if not key.startswith("system/")]  # system metrics step by sample
    history = [metric for key in per_epoch for metric in mlflow_client.get_metric_history(run.info.run_id, key)
               if metric.step <= epoch]
    mlflow_client.log_batch(mlflow.active_run().info.run_id, metrics=history)
    mlflow.set_tag(RESUMED_FROM, run.info.run_id)
    return folder


def delete_checkpoints(parent_run_id: str, fold: int) -> None:
    """Delete the ``checkpoint/`` of every run of fold ``fold`` under a parent (once the fold is
    complete: a checkpoint of an 8B fold is gigabytes). An artifact store that cannot delete keeps them,
    with a warning."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    for run in _fold_attempts(parent_run_id, fold):
        if CHECKPOINT_EPOCH not in run.data.tags:
            continue
        try:
            get_artifact_repository(run.info.artifact_uri).delete_artifacts(CHECKPOINT_DIR)
        except (MlflowException, OSError, NotImplementedError) as err:
            warnings.warn(f"fold run {run.info.run_id}: its {CHECKPOINT_DIR}/ artifacts stay ({err})")
            continue
        client().delete_tag(run.info.run_id, CHECKPOINT_EPOCH)


def find_parent(seed: int, backbone: str, prepare_run_id: str) -> str | None:
    """The latest train parent run of this seed, backbone and prepare run, if any."""
    import mlflow

    runs = mlflow.search_runs(
        filter_string=f"tags.`{STAGE}` = '{TRAIN}' and tags.`{SEED}` = '{seed}' "
                      f"and tags.`{BACKBONE}` = '{backbone}' "
                      f"and tags.`{PREPARE_RUN_ID}` = '{prepare_run_id}'",
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    return runs[0].info.run_id if runs else None


def finished_train_runs(experiment_id: str) -> list:
    """Every FINISHED train parent run of the experiment, newest first."""
    import mlflow

    return mlflow.search_runs([experiment_id], filter_string=f"tags.`{STAGE}` = '{TRAIN}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], output_format="list")


def registered_model(name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client().get_registered_model(name)
    except MlflowException as err:
        raise ValueError(f"no registered model {name!r}: register one with "
                         "`psydef register --tune-run RUN_ID`") from err


def model_version(name: str, version: str | int | None):
    """A version of ``name``; ``None`` is the newest."""
    from mlflow.exceptions import MlflowException

    registered_model(name)
    if version is None:
        versions = client().search_model_versions(f"name = '{name}'")
        if not versions:
            raise ValueError(f"registered model {name!r} has no versions: register one with `psydef register`")
        return max(versions, key=lambda v: int(v.version))
    try:
        return client().get_model_version(name, str(version))
    except MlflowException as err:
        raise ValueError(f"registered model {name!r} has no version {version}") from err


def version_metrics(version) -> dict[str, float]:
    """The metrics of a model version's logged model (``register`` logs MODEL_METRICS there), the latest
    value of each; empty for a version registered without one. MLflow 3.17's registry answers leave the
    version's ``model_id`` unset (SQL store and server alike), so it is read from the version's
    ``models:/<model id>`` source."""
    from mlflow.store.artifact.utils.models import _parse_model_uri
    from mlflow.utils.uri import is_models_uri

    model_id = version.model_id
    if model_id is None and version.source and is_models_uri(version.source):
        model_id = _parse_model_uri(version.source).model_id
    if model_id is None:
        return {}
    latest = sorted(client().get_logged_model(model_id).metrics or [], key=lambda m: (m.step, m.timestamp))
    return {metric.key: metric.value for metric in latest}


def describe_version(name: str, version: str | int, text: str) -> None:
    """A model version's description, shown on the UI's model and version pages."""
    client().update_model_version(name, str(version), description=redact_uri(text))


def resolve_model_uri(model_uri: str) -> str:
    """``models:/name@alias``, ``models:/name/version`` (or ``/stage``, ``/latest``) ->
    ``models:/name/version``, the version it points to now, so a run can record exactly what it
    loaded; a clear ``ValueError`` if the model, alias or version does not exist. Other URIs
    (``runs:/...``, paths, ``models:/<logged model id>``) are returned as they are, once they are seen
    to hold a model (an MLmodel file)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import _parse_model_uri, get_model_name_and_version
    from mlflow.utils.uri import is_models_uri

    try:
        parsed = _parse_model_uri(model_uri) if is_models_uri(model_uri) else None
    except MlflowException as err:
        raise ValueError(err.message) from err
    if parsed is None or parsed.name is None:
        try:
            mlflow.models.get_model_info(model_uri)
        except (MlflowException, OSError) as err:
            raise ValueError(f"{redact_uri(model_uri)} does not resolve to a model: {redact_uri(err)}") from err
        return model_uri
    name, alias = parsed.name, parsed.alias
    if parsed.version is not None:  # MLflow's resolver does not check that the version exists
        return registered_model_uri(name, version=model_version(name, parsed.version).version)
    aliases = registered_model(name).aliases
    if alias is not None and alias not in aliases:
        raise ValueError(f"{model_uri} does not exist: model {name!r} has no alias {alias!r} (its aliases: "
                         f"{sorted(aliases) or 'none'}); promote a version with `psydef promote`")
    try:
        _, version = get_model_name_and_version(client(), model_uri)
    except MlflowException as err:
        wanted = f"in stage {parsed.stage!r}" if parsed.stage else "at all"
        raise ValueError(f"{model_uri} does not exist: registered model {name!r} has no version {wanted}") from err
    return registered_model_uri(name, version=version)


# ---------------------------------------------------------------------------------------------
# Heartbeat: no run stays RUNNING after its process is gone
#
# Every stage run (stage_run) carries the pid and host of its process and a heartbeat tag that a
# daemon thread refreshes every HEARTBEAT_S seconds. SIGINT and SIGTERM end it FAILED (the run's
# context exits with an exception). For SIGKILL or a lost machine, every stage first marks FAILED
# the RUNNING runs of its experiment whose process is gone: same host and no such pid, or no beat
# for STALE_AFTER_S seconds (another machine). Runs without a heartbeat (fold runs of parallel fold
# jobs, the parent they share) are left to the train stage (mark_stale_folds_failed), except the
# nested runs of a dead stage run.

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

    client().log_batch(run_id, tags=[_tag(HEARTBEAT, str(int(time.time()))), _tag(HEARTBEAT_PID, str(os.getpid())),
                                     _tag(HEARTBEAT_HOST, socket.gethostname())])
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


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, value)


@contextmanager
def _failed_on_sigterm():
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def why_dead(run, now: float | None = None) -> str | None:
    """Why a RUNNING run's process is gone (see above), or None while it may be alive."""
    tags = run.data.tags
    if HEARTBEAT not in tags:
        return None
    host, pid = tags.get(HEARTBEAT_HOST), tags.get(HEARTBEAT_PID, "")
    if host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
        return f"its process (pid {pid} on {host}) is gone"
    silent = (now or time.time()) - float(tags[HEARTBEAT])
    if silent > STALE_AFTER_S:
        return f"no heartbeat from pid {pid} on {host} for {silent:.0f} s"
    return None


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
            mlflow_client.set_tag(dead, END_REASON, f"marked FAILED by pid {os.getpid()} on {socket.gethostname()}: "
                                                    + (reason if dead == run_id else f"parent run {run_id}: {reason}"))
            mlflow_client.set_terminated(dead, "FAILED")
            for model in mlflow_client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{dead}'"):
                if model.status == LoggedModelStatus.PENDING:
                    mlflow_client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            ended.append(dead)
        logger.info(f"{run.data.tags.get(STAGE, 'run')} run {run_id} was left RUNNING: {reason}; marked FAILED"
                    + (f" with its nested runs {orphans}" if orphans else ""))
    return ended


# ---------------------------------------------------------------------------------------------
# Promotion lease: one promote at a time per registered model, across machines
#
# MLflow has no compare-and-set for aliases, but creating a registered model is atomic: the store's
# unique key on the name lets exactly one of several concurrent creates succeed (the others get
# RESOURCE_ALREADY_EXISTS), on SQLite, PostgreSQL and through a tracking server alike. The lease on
# model NAME is the registered model ``NAME.promote-lease``, tagged with its owner and expiry; it is
# deleted when the promote ends. Others wait with jittered exponential backoff; a lease past its
# expiry (its owner died) is deleted and contested again. The owner re-reads the lease before and
# after it moves the aliases, so a promote that lost its lease never reports success.

LEASE_SUFFIX = ".promote-lease"
LEASE_OWNER, LEASE_EXPIRES = "psydef.lease_owner", "psydef.lease_expires"
LEASE_TTL_S = 120.0  # far above the seconds a promote holds it (a few registry calls)
LEASE_WAIT_S = 600.0


class LeaseLost(ValueError):
    """Another process holds the promotion lease this process thought it held."""


def lease_name(name: str) -> str:
    return f"{name}{LEASE_SUFFIX}"


class PromotionLease:
    def __init__(self, name: str, ttl: float = LEASE_TTL_S):
        self.name, self.ttl = lease_name(name), ttl
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"

    def _read(self):
        """The lease's registered model, or None when nobody holds it."""
        from mlflow.exceptions import MlflowException

        try:
            return client().get_registered_model(self.name)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def acquire(self, wait: float = LEASE_WAIT_S) -> "PromotionLease":
        from mlflow.exceptions import MlflowException

        deadline, delay = time.monotonic() + wait, 0.05
        while True:
            try:
                client().create_registered_model(
                    self.name, tags={LEASE_OWNER: self.owner, LEASE_EXPIRES: repr(time.time() + self.ttl)},
                    description="Held while `psydef promote` moves the aliases; deleted when it ends.")
                if self.held():
                    return self
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            current = self._read()
            if current is not None and float(current.tags.get(LEASE_EXPIRES, "0")) < time.time():
                again = self._read()  # delete only the lease seen expired, not one taken since
                if again is not None and again.tags.get(LEASE_OWNER) == current.tags.get(LEASE_OWNER):
                    logger.info(f"promote: the lease {self.name} of {current.tags.get(LEASE_OWNER)} expired; "
                                "taking it over")
                    self._delete()
                continue
            if time.monotonic() > deadline:
                holder = current.tags.get(LEASE_OWNER) if current is not None else "?"
                raise ValueError(f"promote: registered model {self.name} (the promotion lease) is held by {holder} "
                                 f"for more than {wait:.0f} s; if that process is gone it expires by itself")
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(2 * delay, 2.0)

    def held(self) -> bool:
        current = self._read()
        return (current is not None and current.tags.get(LEASE_OWNER) == self.owner
                and float(current.tags.get(LEASE_EXPIRES, "0")) > time.time())

    def check(self, what: str) -> None:
        if not self.held():
            raise LeaseLost(f"promote: lost the promotion lease {self.name} {what}; another promote took over. "
                            "Check the aliases of the model and promote again")

    def _delete(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            client().delete_registered_model(self.name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise

    def release(self) -> None:
        if self.held():
            self._delete()


@contextmanager
def promotion_lease(name: str, *, ttl: float = LEASE_TTL_S, wait: float = LEASE_WAIT_S):
    """Hold the promotion lease of registered model ``name`` inside the block."""
    lease = PromotionLease(name, ttl).acquire(wait)
    try:
        yield lease
    finally:
        lease.release()


# ---------------------------------------------------------------------------------------------
# Loading a model: one line when it fails, and the smoke test that register and promote share


def load_model(model_uri: str):
    """``mlflow.pyfunc.load_model``, failures as a one-line ``ValueError`` naming ``model_uri``."""
    import mlflow

    try:
        return mlflow.pyfunc.load_model(model_uri)
    except Exception as err:  # whatever breaks loading: a broken file, a missing package, ...
        raise ValueError(f"{redact_uri(model_uri)} failed to load: {_one_line(err)}") from err


def _one_line(err: BaseException) -> str:
    text = redact_uri(" ".join(str(err).split()))
    return f"{type(err).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def smoke_test(model_uri: str) -> None:
    """Load the model and predict the built-in example; any failure means it cannot serve (a
    ``ValueError`` naming the URI)."""
    from psydef.core.data import example_input
    from psydef.core.labels import PROB_COLUMNS

    example = example_input()
    model = load_model(model_uri)
    try:
        out = model.predict(example)
    except Exception as err:  # whatever breaks predicting, the model is not servable
        raise ValueError(f"{redact_uri(model_uri)} failed to predict on the built-in example: "
                         f"{_one_line(err)}") from err
    if list(out["id"]) != list(example["id"]) or not np.allclose(out[list(PROB_COLUMNS)].sum(axis=1), 1.0):
        raise ValueError(f"{redact_uri(model_uri)} answered the built-in example with an invalid prediction:\n{out}")
