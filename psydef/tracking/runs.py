"""Opening and writing runs: a stage's run (``stage_run``), the tags of train and fold runs, params,
descriptions, datasets, arrays, figures, a fold's checkpoint, system metrics."""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from psydef.core.secrets import redact_uri
from psydef.tracking.liveness import failed_on_sigterm, heartbeat, mark_dead_runs_failed
from psydef.tracking.names import (BACKBONE, CHECKPOINT_DIR, CHECKPOINT_EPOCH, DATASET_CONTEXT, DATA_DIGEST, FOLD,
                                   FOLD_FINISHED, FOLD_RUN, FOLD_STATUS, MEMBER, NOTE, PARENT_RUN_ID, PREPARE_RUN_ID,
                                   RESUMED_FROM, SEED, STAGE, TRAIN, TRAINING)
from psydef.tracking.queries import fold_attempts
from psydef.tracking.store import client
from psydef.tracking.writes import run_tag, tolerate_concurrent_write

logger = logging.getLogger(__name__)


def train_tags(seed: int, backbone: str, data_digest: str, prepare_run_id: str,
               member: str | None = None) -> dict[str, str]:
    """The tags of a train parent run: what tune, register and a resume look it up by. ``member``:
    the canonical member spec (default: the backbone with its defaults, spelled as its name)."""
    return {STAGE: TRAIN, SEED: str(seed), BACKBONE: backbone, MEMBER: member or backbone, DATA_DIGEST: data_digest,
            PREPARE_RUN_ID: prepare_run_id}


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
    with failed_on_sigterm(), mlflow.start_run(run_name=run_name, nested=mlflow.active_run() is not None,
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
    Another process logging the same values at the same moment (fold jobs of one parent) is fine.
    Passwords in the values are masked (:func:`redact_uri`)."""
    import mlflow
    from mlflow.entities import Param

    run_id = run_id or mlflow.active_run().info.run_id
    given = client().get_run(run_id).data.params
    new = {key: redact_uri(str(value)) for key, value in params.items() if key not in given}
    if new:
        tolerate_concurrent_write(
            lambda: client().log_batch(run_id, params=[Param(key, value) for key, value in new.items()]),
            lambda: client().get_run(run_id).data.params, new, what=f"run {run_id}")


def set_run_tags(run_id: str, tags: dict[str, str]) -> None:
    """Tag run ``run_id``, also when other processes set the same tags at the same moment."""
    tolerate_concurrent_write(lambda: client().log_batch(run_id, tags=[run_tag(key, value) for key, value in tags.items()]),
                              lambda: client().get_run(run_id).data.tags, tags, what=f"run {run_id}")


def describe(text: str, run_id: str | None = None) -> None:
    """The run's description (default: the active run's), shown in the UI's run page and runs table."""
    import mlflow

    set_run_tags(run_id or mlflow.active_run().info.run_id, {NOTE: redact_uri(text)})


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
        run_id = mlflow.active_run().info.run_id
        tolerate_concurrent_write(lambda: mlflow.log_input(dataset, context=context), lambda: _dataset_inputs(run_id),
                                  {(name, digest): context}, what=f"run {run_id}")


def _dataset_inputs(run_id: str) -> dict[tuple[str, str], str | None]:
    """(name, digest) -> context of the dataset inputs of a run."""
    return {(i.dataset.name, i.dataset.digest): {t.key: t.value for t in i.tags}.get(DATASET_CONTEXT)
            for i in client().get_run(run_id).inputs.dataset_inputs}


def log_training_dataset(run_id: str, prepare_run_id: str) -> None:
    """Log on ``run_id`` the training dataset input of the prepare run (same name, digest, source and
    schema), so the runs table and the compare view show which data a run was trained on."""
    from mlflow.entities import DatasetInput, InputTag

    inputs = client().get_run(prepare_run_id).inputs.dataset_inputs
    training = [i.dataset for i in inputs if {t.key: t.value for t in i.tags}.get(DATASET_CONTEXT) == TRAINING]
    tolerate_concurrent_write(
        lambda: client().log_inputs(run_id, [DatasetInput(d, [InputTag(DATASET_CONTEXT, TRAINING)]) for d in training]),
        lambda: _dataset_inputs(run_id), {(d.name, d.digest): TRAINING for d in training}, what=f"run {run_id}")


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

    for run in fold_attempts(parent_run_id, fold):
        if CHECKPOINT_EPOCH not in run.data.tags:
            continue
        try:
            get_artifact_repository(run.info.artifact_uri).delete_artifacts(CHECKPOINT_DIR)
        except (MlflowException, OSError, NotImplementedError) as err:
            warnings.warn(f"fold run {run.info.run_id}: its {CHECKPOINT_DIR}/ artifacts stay ({err})")
            continue
        client().delete_tag(run.info.run_id, CHECKPOINT_EPOCH)
