"""The main chain: prepare (each seed) -> train (each member x seed) -> tune -> register -> promote ->
predict, as nested runs of one pipeline run. Each step hands the next the run id it logged.

Each seed prepares its own fold partition and every member trains on the partition of its seed, so
two seeds give two different trainings of a member; tune blends them all, aligned by record id. With
``resume`` the FINISHED prepare and train runs of the same data, seeds, members and settings are
reused (:func:`psydef.tracking.find_finished_run`), so a rerun after a failure trains only what is
missing."""
from __future__ import annotations

import logging
from contextlib import contextmanager

import mlflow

from psydef import progress, tracking
from psydef.core.files import writable_folder
from psydef.stages.config import MainConfig, PrepareConfig, TrainConfig
from psydef.stages.predict import Predicted, run_predict
from psydef.stages.prepare import Prepared, find_prepared, run_prepare
from psydef.stages.promote import PromotionRefused, run_promote
from psydef.stages.register import run_register
from psydef.stages.train import run_train
from psydef.stages.tune import run_tune

logger = logging.getLogger(__name__)


def run_main(config: MainConfig, *, experiment_id: str) -> Predicted:
    """Run the whole chain on ``config.data_dir`` (train.json + test.json) in experiment
    ``experiment_id``; returns the prediction.

    The new version becomes ``production`` unless the champion/challenger gate refuses it (a worse
    estimated OOF macro-F1 than the current champion's); the prediction then comes from the champion."""
    seeds, members, model_name, data_dir = config.seeds, config.members, config.model_name, config.data_dir
    writable_folder(config.out_dir, "--out-dir")  # where predict writes at the end, checked before anything runs
    with _resume_hint(config), tracking.stage_run(
            tracking.PIPELINE, f"main seeds={','.join(map(str, seeds))} members={len(members)}",
            log_system_metrics=True) as run:
        tracking.log_new_params(config.params())
        reused: list[str] = []  # what resume took over, one line each
        prepared = {seed: _prepare(config.prepare(seed), config.resume, reused) for seed in seeds}
        trainings = [config.train(seed, member, prepared[seed].run_id) for seed in seeds for member in members]
        found = {i: _finished_training(t, prepared[t.seed], reused) for i, t in enumerate(trainings) if config.resume}
        progress.plan_main(trainings=len(trainings) - sum(run_id is not None for run_id in found.values()),
                           n_splits=config.prepare(seeds[0]).n_splits, members=[str(m) for m in members],
                           n_trials=config.n_trials, inner_trials=config.inner_trials)
        train_runs = [found.get(i) or run_train(t, experiment_id=experiment_id, prepared=prepared[t.seed])
                      for i, t in enumerate(trainings)]
        tune_run = run_tune(config.tune(train_runs), experiment_id=experiment_id)
        version = run_register(config.register(tune_run))
        try:
            run_promote(config.promote(int(version.version)))
            promoted = "became production"
        except PromotionRefused as refused:
            logger.info(f"main: {refused}; predicting with the current production model")
            promoted = f"was not promoted ({refused})"
        predicted = run_predict(config.predict())
        mlflow.set_tags({tracking.PIPELINE_TUNE_RUN_ID: tune_run, tracking.PIPELINE_MODEL_VERSION: version.version})
        listed = ", ".join(f"{run_id} ({t.member_tag()}, seed {t.seed})" for run_id, t in zip(train_runs, trainings))
        tracking.describe(f"The whole chain on {data_dir}: prepare runs "
                          f"{', '.join(f'{p.run_id} (seed {seed})' for seed, p in prepared.items())}; train runs "
                          f"{listed}; " + (f"reused (resume): {'; '.join(reused)}; " if reused else "") +
                          f"tune run {tune_run}; version {version.version} of {model_name} {promoted}; predict run "
                          f"{predicted.run_id} labelled {len(predicted.predictions)} records with {predicted.model_uri}.")
    logger.info(f"main: pipeline run {run.info.run_id}; registered {model_name} version {version.version}; "
                f"prediction file {predicted.prediction_json.resolve()} (zip: {predicted.prediction_zip.resolve()})")
    uri = mlflow.get_tracking_uri()
    served = uri.startswith(("http://", "https://"))
    link = tracking.ui_runs_url(uri if served else "http://127.0.0.1:5000", run.info.experiment_id)
    logger.info(f"main: the runs in the MLflow UI: {link}"
                + ("" if served else f" once mlruns_config/start_server.sh serves {tracking.redact_uri(uri)}"))
    return predicted


def _prepare(config: PrepareConfig, resume: bool, reused: list[str]) -> Prepared:
    """The seed's folds: with ``resume`` the latest FINISHED prepare run of the same data and settings
    when there is one, else a new prepare run."""
    found = find_prepared(config) if resume else None
    if found is None:
        return run_prepare(config)
    reused.append(f"prepare run {found.run_id} (seed {config.seed}, data digest {found.digest})")
    logger.info(f"main: reusing {reused[-1]}: FINISHED, the same data and settings")
    return found


def _finished_training(config: TrainConfig, prepared: Prepared, reused: list[str]) -> str | None:
    """The latest FINISHED train run of this member and seed on ``prepared``'s folds, every fold complete."""
    run = tracking.find_finished_run(tracking.TRAIN, prepared.digest, tags={
        tracking.SEED: config.seed, tracking.MEMBER: config.member_tag(), tracking.PREPARE_RUN_ID: prepared.run_id})
    if run is None:
        return None
    try:
        tracking.complete_fold_runs(run)
    except ValueError:
        return None
    reused.append(f"train run {run.info.run_id} ({config.member_tag()}, seed {config.seed})")
    logger.info(f"main: reusing {reused[-1]}: FINISHED on the folds of prepare run {prepared.run_id}, every fold "
                "complete")
    return run.info.run_id


@contextmanager
def _resume_hint(config: MainConfig):
    """On a failure or an interrupt, how to rerun without redoing the finished trainings."""
    try:
        yield
    except BaseException:
        if not config.resume:
            logger.info("main: stopped before the end; run it again with -P resume=true (--resume true) to reuse its "
                        "FINISHED prepare and train runs")
        raise
