"""MLflow names in one place: experiment, tags, run names and artifact paths, plus the small
helpers that read and write them. Tracking code never does math."""
from __future__ import annotations

import os
import tempfile
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
DATA_DIGEST = "psydef.data_digest"
PREPARE_RUN_ID = "psydef.prepare_run_id"
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

# Tune metrics, also copied to model version tags; the promote gate compares NESTED_F1
NESTED_F1, CALIBRATED_F1 = "oof_macro_f1_nested", "oof_macro_f1_calibrated"
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
        found = mlflow.set_experiment(experiment_id=mlflow.get_run(active_run_id).info.experiment_id)
    else:
        found = mlflow.set_experiment(experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)
    if EXPERIMENT_KIND not in found.tags:  # a kind someone chose in the UI stays
        client().set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, CUSTOM_MODEL_DEVELOPMENT)
    return found.experiment_id


def ui_runs_url(server: str, experiment_id: str) -> str:
    """The experiment's training-runs table in the MLflow UI at ``server``. MLflow 3.17's UI opens an
    experiment in the GenAI view (traces) unless the link or the browser's last choice says
    ``workflowType=machine_learning``; it does not read the experiment's kind tag for that."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


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
