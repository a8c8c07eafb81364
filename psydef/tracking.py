"""MLflow names in one place: experiment, tags, run names and artifact paths, plus the small
helpers that read and write them. Tracking code never does math."""
from __future__ import annotations

import json
import os
import re
import tempfile
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
DATA_DIGEST = "psydef.data_digest"
PREPARE_RUN_ID = "psydef.prepare_run_id"
FOLD = "psydef.fold"
FOLD_STATUS = "psydef.fold_status"  # "finished" only once every fold artifact is logged
MEMBER_RUN_IDS = "psydef.member_run_ids"  # a tune run's train runs, comma-separated, in ensemble order
STUDY_NAME = "psydef.study_name"  # a tune run's Optuna study (in its storage param)
PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's own tag on nested runs

# Stages (values of the STAGE tag)
PREPARE, TRAIN, FOLD_RUN, TUNE, REGISTER, PROMOTE, PREDICT, PIPELINE = (
    "prepare", "train", "fold", "tune", "register", "promote", "predict", "pipeline")

# Artifact paths
FOLDS_CSV = "folds.csv"
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
PRODUCTION_URI = f"models:/{MODEL_NAME}@{PRODUCTION}"
LEGACY_STAGE = "Production"
# models:/<name>@<alias> or models:/<name>/<version>
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")

# Tune metrics. RAW_F1: the plain blend (equal weights, delta 0, no gate) on the OOF rows; CALIBRATED_F1: the
# searched rule on the rows it was searched on (optimistic); CALIBRATED_ESTIMATED_F1 and ESTIMATED_GAIN (with the
# spread of its folds): the searched rule's macro-F1 and gain over the plain blend on rows its search never saw
# (psydef.calibration.estimate); ESTIMATED_F1: that estimate for the rule tune chose. Register copies
# ESTIMATED_F1 and CALIBRATED_F1 to the version's tags; the promote gate compares ESTIMATED_F1.
RAW_F1, CALIBRATED_F1 = "oof_macro_f1_raw", "oof_macro_f1_calibrated"
CALIBRATED_ESTIMATED_F1 = "oof_macro_f1_calibrated_estimated"
ESTIMATED_GAIN, ESTIMATED_GAIN_STD = "calibration_gain_estimated", "calibration_gain_estimated_fold_std"
ESTIMATED_F1 = "oof_macro_f1_estimated"
OOF_LEVEL_F1 = "oof_f1_level_{}"  # per level, of the chosen rule on the OOF rows
# Tag of a tune run: which rule it chose (the calibrated one only when ESTIMATED_GAIN > 0)
CALIBRATION, CALIBRATED, PLAIN = "psydef.calibration", "calibrated", "plain"
NOTE = "mlflow.note.content"  # MLflow's run description
# Model version tags (lineage)
V_TUNE_RUN_ID, V_TRAIN_RUN_IDS, V_DATA_DIGEST, V_BACKBONE = "tune_run_id", "train_run_ids", "data_digest", "backbone"


def configure(tracking_uri: str | None = None, experiment: str | None = None) -> str:
    """Point MLflow at ``tracking_uri`` (else $MLFLOW_TRACKING_URI, else the local SQLite default)
    and at ``experiment`` (else $MLFLOW_EXPERIMENT_NAME, else ``psydef``). Returns the experiment id.

    Under ``mlflow run`` the run is already open in MLflow's chosen experiment; keep it."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per tiny file is noise
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    active_run_id = os.environ.get("MLFLOW_RUN_ID")
    if active_run_id and not experiment:  # launched by `mlflow run`: its run names the experiment
        return mlflow.set_experiment(experiment_id=mlflow.get_run(active_run_id).info.experiment_id).experiment_id
    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    return mlflow.set_experiment(name).experiment_id


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


@contextmanager
def stage_run(stage: str, run_name: str, tags: dict | None = None):
    """Open the run of one stage: nested under the active run (the pipeline's) when there is one;
    under ``mlflow run`` the first stage takes over the run that ``mlflow run`` created."""
    import mlflow

    with mlflow.start_run(run_name=run_name, nested=mlflow.active_run() is not None) as run:
        mlflow.set_tags({STAGE: stage, **(tags or {})})  # start_run ignores tags when resuming a run
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


def log_json(obj, artifact_path: str) -> None:
    import mlflow

    mlflow.log_text(json.dumps(obj, indent=1), artifact_path)


def log_npy(array: np.ndarray, artifact_path: str) -> None:
    import mlflow

    directory, name = os.path.split(artifact_path)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / name, array)
        mlflow.log_artifact(str(Path(tmp) / name), artifact_path=directory or None)


def load_json(run_id: str, artifact_path: str):
    import mlflow

    return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact_path}"))


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
                      f"and tags.`{FOLD_STATUS}` = 'finished' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"])
    complete: dict[int, object] = {}
    for run in runs:
        complete.setdefault(int(run.data.tags[FOLD]), run)
    return complete


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


def resolve_model_uri(model_uri: str) -> str:
    """``models:/name@alias`` or ``models:/name/version`` -> ``models:/name/version``, the version it
    points to now, so a run can record exactly what it loaded; a clear ``ValueError`` if the model,
    alias or version does not exist. Other URIs (``runs:/...``, paths) are returned as they are, once
    they are seen to hold a model (an MLmodel file)."""
    match = _REGISTRY_URI.match(model_uri)
    if not match:
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            mlflow.models.get_model_info(model_uri)
        except (MlflowException, OSError) as err:
            raise ValueError(f"{model_uri} does not resolve to a model: {err}") from err
        return model_uri
    name, alias = match["name"], match["alias"]
    if alias is None:
        return f"models:/{name}/{model_version(name, match['version']).version}"
    aliases = registered_model(name).aliases
    if alias not in aliases:
        raise ValueError(f"{model_uri} does not exist: model {name!r} has no alias {alias!r} (its aliases: "
                         f"{sorted(aliases) or 'none'}); promote a version with `psydef promote`")
    return f"models:/{name}/{aliases[alias]}"
