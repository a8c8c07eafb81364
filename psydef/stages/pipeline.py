"""The main chain: prepare -> train (each seed) -> tune -> register -> promote -> predict, as nested
runs of one pipeline run. Each step hands the next the run id it logged."""
from __future__ import annotations

from pathlib import Path

from psydef import tracking
from psydef.stages.predict import Predicted, run_predict
from psydef.stages.prepare import run_prepare
from psydef.stages.promote import PromotionRefused, promote
from psydef.stages.register import register
from psydef.stages.train import run_train
from psydef.stages.tune import run_tune


def run_main(data_dir: str | Path, *, seeds: tuple[int, ...] = (42, 20260407), backbone: str = "auto",
             model: str | None = None, hyper: dict | None = None, n_trials: int = 2000, sampler: str = "tpe",
             gate: bool = True, inner_trials: int = 500, model_name: str = tracking.MODEL_NAME,
             out_dir: str | Path = ".") -> Predicted:
    """Run the whole chain on ``data_dir`` (train.json + test.json); returns the prediction.

    The new version becomes ``production`` unless the champion/challenger gate refuses it (a worse
    estimated OOF macro-F1 than the current champion's); the prediction then comes from the champion."""
    import mlflow

    if not seeds:
        raise ValueError("give at least one seed")
    with tracking.stage_run(tracking.PIPELINE, f"main seeds={','.join(map(str, seeds))}") as run:
        tracking.log_new_params({"data_dir": str(data_dir), "seeds": ",".join(map(str, seeds)), "backbone": backbone,
                           "n_trials": n_trials, "sampler": sampler, "gate": gate, "model_name": model_name})
        prepared = run_prepare(data_dir, seed=seeds[0])
        train_runs = [run_train(data_dir, seed=seed, prepare_run_id=prepared.run_id, backbone=backbone,
                                model=model, hyper=hyper) for seed in seeds]
        tune_run = run_tune(train_runs, n_trials=n_trials, sampler=sampler, gate=gate, seed=seeds[0],
                            inner_trials=inner_trials)
        version = register(tune_run, name=model_name)
        try:
            promote(version.version, name=model_name)
        except PromotionRefused as refused:
            print(f"main: {refused}; predicting with the current production model")
        predicted = run_predict(data_dir, model_uri=f"models:/{model_name}@{tracking.PRODUCTION}", out_dir=out_dir)
        mlflow.set_tags({"psydef.tune_run_id": tune_run, "psydef.model_version": version.version})
    print(f"main: pipeline run {run.info.run_id}; registered {model_name} version {version.version}; "
          f"prediction file {predicted.prediction_json.resolve()} (zip: {predicted.prediction_zip.resolve()})")
    return predicted
