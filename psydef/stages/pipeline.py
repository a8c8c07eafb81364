"""The main chain: prepare -> train (each seed) -> tune -> register -> promote -> predict, as nested
runs of one pipeline run. Each step hands the next the run id it logged."""
from __future__ import annotations

import logging

import mlflow

from psydef import progress, tracking
from psydef.core.files import writable_folder
from psydef.stages.config import MainConfig
from psydef.stages.predict import Predicted, run_predict
from psydef.stages.prepare import run_prepare
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
    seeds, model_name, backbone, data_dir = config.seeds, config.model_name, config.backbone, config.data_dir
    writable_folder(config.out_dir, "--out-dir")  # where predict writes at the end, checked before anything runs
    with tracking.stage_run(tracking.PIPELINE, f"main seeds={','.join(map(str, seeds))}", log_system_metrics=True) as run:
        tracking.log_new_params(config.params())
        prepared = run_prepare(config.prepare())
        progress.plan_main(seeds=len(seeds), n_splits=prepared.n_splits, backbone=backbone, n_trials=config.n_trials,
                           inner_trials=config.inner_trials)
        train_runs = [run_train(config.train(seed, prepared.run_id), experiment_id=experiment_id, prepared=prepared)
                      for seed in seeds]
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
        tracking.describe(f"The whole chain on {data_dir}: prepare run {prepared.run_id}; train runs "
                          f"{', '.join(train_runs)} (seeds {', '.join(map(str, seeds))}, backbone {backbone}); tune run "
                          f"{tune_run}; version {version.version} of {model_name} {promoted}; predict run "
                          f"{predicted.run_id} labelled {len(predicted.predictions)} records with {predicted.model_uri}.")
    logger.info(f"main: pipeline run {run.info.run_id}; registered {model_name} version {version.version}; "
                f"prediction file {predicted.prediction_json.resolve()} (zip: {predicted.prediction_zip.resolve()})")
    uri = mlflow.get_tracking_uri()
    served = uri.startswith(("http://", "https://"))
    link = tracking.ui_runs_url(uri if served else "http://127.0.0.1:5000", run.info.experiment_id)
    logger.info(f"main: the runs in the MLflow UI: {link}"
                + ("" if served else f" once mlruns_config/start_server.sh serves {tracking.redact_uri(uri)}"))
    return predicted
