"""MLflow names in one place: experiment, tags, run names and artifact paths, plus the small
helpers that read and write them. Tracking code never does math."""
from __future__ import annotations

import os
import random
import signal
import socket
import tempfile
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

DEFAULT_EXPERIMENT = "psydef"
# The embedded default: MLflow's local SQLite store in the working directory, artifacts beside it.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# Tags
STAGE = "psydef.stage"
SEED = "psydef.seed"
BACKBONE = "psydef.backbone"
MEMBER = "psydef.member"  # a train run's member spec, canonical (psydef.stages.config.member_tag)
DATA_DIGEST = "psydef.data_digest"
PREPARE_RUN_ID = "psydef.prepare_run_id"
# How a new train run got its prepare run, when none was given: nested under it, or reused (FINISHED, same data
# and settings)
PREPARE_ORIGIN, PREPARE_NESTED, PREPARE_REUSED = "psydef.prepare_origin", "nested", "reused"
TRAIN_RUN_ID = "psydef.train_run_id"  # on an aggregate run: the train run it aggregated
FOLD = "psydef.fold"
FOLD_STATUS = "psydef.fold_status"  # FOLD_FINISHED only once every fold artifact is logged
FOLD_FINISHED = "finished"
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
PREPARE, TRAIN, FOLD_RUN, AGGREGATE, TUNE, REGISTER, PROMOTE, PREDICT, PIPELINE = (
    "prepare", "train", "fold", "aggregate", "tune", "register", "promote", "predict", "pipeline")

# Artifact paths
FOLDS_CSV = "folds.csv"
AUGMENTED_JSON = "augmented.json"  # the prepare run's variants, with their source ids
CLASS_PLOT = "plots/class_distribution.png"
OOF_IDS, OOF_LOGITS = "oof/ids.json", "oof/logits.npy"
TEST_IDS, TEST_LOGITS, TEST_PROBS = "test/ids.json", "test/logits.npy", "test/probs.npy"
ADAPTER_DIR = "adapter"
ENSEMBLE_JSON = "ensemble.json"
TRIALS_CSV = "trials.csv"
HISTORY_PLOT, IMPORTANCE_PLOT = "plots/optimization_history.png", "plots/param_importances.png"
MODEL_ARTIFACT = "model"  # the pyfunc logged by a register run
PREDICTION_JSON, PREDICTION_ZIP = "prediction.json", "prediction.zip"  # CodaBench submission
PREDICT_IDS, PREDICT_PROBS = "ids.json", "probs.npy"
CONFUSION_PLOT = "plots/confusion_matrix.png"

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
# (psydef.calibration.estimate); ESTIMATED_F1: that estimate for the rule tune chose. Register copies
# ESTIMATED_F1 and CALIBRATED_F1 to the version's tags; the promote gate compares GATE_METRIC.
RAW_F1, CALIBRATED_F1 = "oof_macro_f1_raw", "oof_macro_f1_calibrated"
CALIBRATED_ESTIMATED_F1 = "oof_macro_f1_calibrated_estimated"
ESTIMATED_GAIN, ESTIMATED_GAIN_STD = "calibration_gain_estimated", "calibration_gain_estimated_fold_std"
ESTIMATED_F1 = "oof_macro_f1_estimated"
OOF_LEVEL_F1 = "oof_f1_level_{}"  # per level, of the chosen rule on the OOF rows
# Tag of a tune run: which rule it chose (the calibrated one only when ESTIMATED_GAIN > 0)
CALIBRATION, CALIBRATED, PLAIN = "psydef.calibration", "calibrated", "plain"
GATE_METRIC = ESTIMATED_F1  # what the promote gate compares: rename in one line
# Model version tags (lineage)
V_TUNE_RUN_ID, V_TRAIN_RUN_IDS, V_DATA_DIGEST, V_BACKBONE = "tune_run_id", "train_run_ids", "data_digest", "backbone"


def configure(tracking_uri: str | None = None, experiment: str | None = None) -> str:
    """Point MLflow at ``tracking_uri`` (else $MLFLOW_TRACKING_URI, else the local SQLite default)
    and at ``experiment`` (else $MLFLOW_EXPERIMENT_NAME, else ``psydef``). Returns the experiment id.

    Under ``mlflow run`` the run is already open in MLflow's chosen experiment; keep it."""
    import mlflow

    from psydef import progress

    progress.line_buffered()  # psydef's lines in order with the bars, also when output goes to a file
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per tiny file is noise
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    probe(uri)
    mlflow.set_tracking_uri(uri)
    active_run_id = os.environ.get("MLFLOW_RUN_ID")
    if active_run_id and not experiment:  # launched by `mlflow run`: its run names the experiment
        found = mlflow.set_experiment(experiment_id=mlflow.get_run(active_run_id).info.experiment_id)
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


PROBE_TIMEOUT_S = 5  # the first contact with a tracking server; MLflow's own retries apply after it


class TrackingStoreUnreachable(ValueError):
    """The tracking server did not answer the first request."""


def probe(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """For an http(s) tracking URI: one request to ``/health`` with a short timeout, so that a server
    that is not there fails at once with one line (MLflow would retry for minutes, then print a
    chained traceback). An MLflow server answers 200 (401/403 behind a login); any other status
    means something else listens there."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError as err:
        if err.code not in (401, 403):
            raise TrackingStoreUnreachable(
                f"tracking server {uri} does not answer like an MLflow server (HTTP {err.code} for /health): check "
                "its host, port and path, and MLFLOW_TRACKING_URI / --tracking-uri") from None
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingStoreUnreachable(
            f"tracking server {uri} does not answer ({reason}): check that it is running (bash "
            "mlruns_config/start_server.sh), its host and port, and MLFLOW_TRACKING_URI / --tracking-uri") from None


def get_run(run_id: str, stage: str | None = None, *, what: str | None = None):
    """The run ``run_id``, checked to be a ``stage`` run when a stage is given; a ValueError that
    names the run (and the tracking store) otherwise. ``what`` names the run in that message."""
    import mlflow
    from mlflow.exceptions import MlflowException

    what = what or (f"{stage} run" if stage else "run")
    try:
        run = mlflow.get_run(run_id)
    except MlflowException as err:
        raise ValueError(f"{what} {run_id!r} does not exist in {mlflow.get_tracking_uri()}") from err
    found = run.data.tags.get(STAGE)
    if stage and found != stage:
        hint = " (a fold run: pass its parent train run)" if found == FOLD_RUN else ""
        raise ValueError(f"run {run_id} is not a {stage} run (tag {STAGE}={found!r}){hint}")
    return run


def train_tags(seed: int, backbone: str, data_digest: str, prepare_run_id: str,
               member: str | None = None) -> dict[str, str]:
    """The tags of a train parent run: what tune, register and a resume look it up by. ``member``:
    the canonical member spec (default: the backbone with its defaults, spelled as its name)."""
    return {STAGE: TRAIN, SEED: str(seed), BACKBONE: backbone, MEMBER: member or backbone, DATA_DIGEST: data_digest,
            PREPARE_RUN_ID: prepare_run_id}


def member_of(run) -> str:
    """A train run's member spec: its tag, or its backbone for runs logged before members were tagged."""
    return run.data.tags.get(MEMBER) or run.data.tags.get(BACKBONE, "")


def fold_tags(parent_run_id: str, fold: int, **train: object) -> dict[str, str]:
    """The tags of fold run ``fold`` under a train parent (``train``: :func:`train_tags`' arguments)."""
    return {**train_tags(**train), STAGE: FOLD_RUN, FOLD: str(fold), PARENT_RUN_ID: parent_run_id}


def complete_fold() -> None:
    """Mark the active fold run complete: called after its last artifact is logged."""
    import mlflow

    mlflow.set_tag(FOLD_STATUS, FOLD_FINISHED)


@contextmanager
def stage_run(stage: str, run_name: str, tags: dict | None = None):
    """Open the run of one stage: nested under the active run (the pipeline's) when there is one;
    under ``mlflow run`` the first stage takes over the run that ``mlflow run`` created."""
    import mlflow

    from psydef import progress

    mark_dead_runs_failed()
    with _failed_on_sigterm(), mlflow.start_run(run_name=run_name, nested=mlflow.active_run() is not None) as run:
        mlflow.set_tags({STAGE: stage, **(tags or {})})  # start_run ignores tags when resuming a run
        progress.banner(f"{stage}: {run_name} (run {run.info.run_id})")
        with heartbeat(run.info.run_id):
            yield run


def log_new_params(params: dict, run_id: str | None = None) -> None:
    """Log the params the run (default: the active one) does not hold yet. Under ``mlflow run`` the
    ``-P`` values are already the run's params (as strings), and MLflow refuses to change a value."""
    import mlflow
    from mlflow.entities import Param

    run_id = run_id or mlflow.active_run().info.run_id
    given = mlflow.get_run(run_id).data.params
    new = [Param(key, str(value)) for key, value in params.items() if key not in given]
    mlflow.MlflowClient().log_batch(run_id, params=new)


def describe(text: str, run_id: str | None = None) -> None:
    """The run's description (default: the active run's), shown in the UI's run page and runs table."""
    import mlflow

    client().set_tag(run_id or mlflow.active_run().info.run_id, NOTE, text)


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


def find_parent(seed: int, backbone: str, prepare_run_id: str, member: str | None = None) -> str | None:
    """The latest train parent run of this seed, member (default: the plain backbone) and prepare run, if any."""
    import mlflow

    runs = mlflow.search_runs(
        filter_string=f"tags.`{STAGE}` = '{TRAIN}' and tags.`{SEED}` = '{seed}' "
                      f"and tags.`{BACKBONE}` = '{backbone}' "
                      f"and tags.`{PREPARE_RUN_ID}` = '{prepare_run_id}'",
        order_by=["attributes.start_time DESC"], output_format="list")
    return next((run.info.run_id for run in runs if member_of(run) == (member or backbone)), None)


def find_finished_run(stage: str, data_digest: str, *, tags: dict[str, str] | None = None,
                      params: dict[str, str] | None = None, experiment_id: str | None = None):
    """The latest FINISHED ``stage`` run of the experiment (default: the current one) made from data
    ``data_digest`` whose tags and params hold the values given (the settings it was made with), or
    None: the finished work a stage can reuse. Values are compared here, not in the filter string,
    so any text (a member spec, a path) matches exactly."""
    import mlflow

    runs = mlflow.search_runs([experiment_id] if experiment_id else None, output_format="list",
                              filter_string=f"tags.`{STAGE}` = '{stage}' and tags.`{DATA_DIGEST}` = '{data_digest}' "
                                            "and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    for run in runs:
        if all(run.data.tags.get(k) == str(v) for k, v in (tags or {}).items()) and \
                all(run.data.params.get(k) == str(v) for k, v in (params or {}).items()):
            return run
    return None


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


def describe_version(name: str, version: str | int, text: str) -> None:
    """A model version's description, shown on the UI's model and version pages."""
    client().update_model_version(name, str(version), description=text)


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
            raise ValueError(f"{model_uri} does not resolve to a model: {err}") from err
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
        print(f"{run.data.tags.get(STAGE, 'run')} run {run_id} was left RUNNING: {reason}; marked FAILED"
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
                    print(f"promote: the lease {self.name} of {current.tags.get(LEASE_OWNER)} expired; taking it over")
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
        raise ValueError(f"{model_uri} failed to load: {_one_line(err)}") from err


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
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
        raise ValueError(f"{model_uri} failed to predict on the built-in example: {_one_line(err)}") from err
    if list(out["id"]) != list(example["id"]) or not np.allclose(out[list(PROB_COLUMNS)].sum(axis=1), 1.0):
        raise ValueError(f"{model_uri} answered the built-in example with an invalid prediction:\n{out}")
