"""Run queries: the only place that builds filter strings for runs (stage runs, train parents, fold
runs, their checkpoints, finished runs to reuse)."""
from __future__ import annotations

from psydef.core.secrets import redact_uri
from psydef.tracking.names import (BACKBONE, CHECKPOINT_EPOCH, DATA_DIGEST, FOLD, FOLD_FINISHED, FOLD_RUN, FOLD_STATUS,
                                   MEMBER, PARENT_RUN_ID, PREPARE_RUN_ID, SEED, STAGE, TRAIN)
from psydef.tracking.store import client


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


def member_of(run) -> str:
    """A train run's member spec: its tag, or its backbone for runs logged before members were tagged."""
    return run.data.tags.get(MEMBER) or run.data.tags.get(BACKBONE, "")


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


def fold_attempts(parent_run_id: str, fold: int) -> list:
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
    return next((run for run in fold_attempts(parent_run_id, fold)
                 if CHECKPOINT_EPOCH in run.data.tags and run.info.status != "FINISHED"), None)


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
