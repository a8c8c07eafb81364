"""The ``predict`` stage: a registered ensemble labels an official-format file for CodaBench.

Writes ``prediction.json`` (``[{"id", "label"}, ...]``, one entry per record, in file order) and
``prediction.zip`` holding it, and logs both, the blended probabilities and, when the file is
labelled, the official metrics and a confusion matrix in a ``predict`` run.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from psydef import tracking
from psydef.core.data import INPUT_COLUMNS, dataset_digest, is_labelled, read_split
from psydef.core.labels import PROB_COLUMNS
from psydef.core.metrics import evaluate, plot_confusion_matrix
from psydef.stages.config import PredictConfig

CHUNK_ROWS = 64  # rows per predict call: the progress bar's step


@dataclass(frozen=True)
class Predicted:
    run_id: str
    model_uri: str  # the version actually loaded (models:/name/version for registry URIs)
    prediction_json: Path
    prediction_zip: Path
    predictions: pd.DataFrame  # id, label, prob_0..prob_8
    metrics: dict[str, float] | None  # when the file is labelled


def split_path(data_path_or_dir: str | Path) -> Path:
    """A split file as given, or the ``test.json`` of a folder."""
    path = Path(data_path_or_dir)
    return path / "test.json" if path.is_dir() else path


def run_predict(config: PredictConfig) -> Predicted:
    """Label every record of ``config.data_dir`` (a split file, or a folder holding ``test.json``)
    with the model at ``config.model_uri``; labels in the file are optional and only used for metrics."""
    path = split_path(config.data_dir)
    table = read_split(path)
    loaded_uri = tracking.resolve_model_uri(config.model_uri)
    out_dir = config.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    with tracking.stage_run(tracking.PREDICT, f"predict {path.name}") as run:
        tracking.log_new_params({**config.params(), "data": str(path), "loaded_model_uri": loaded_uri,
                                 "n_records": len(table)})
        tracking.log_dataset(table.drop(columns="dialogue"), path, name=f"psydefconv-{path.stem}",
                             digest=dataset_digest(table), context="inference")
        model = tracking.load_model(loaded_uri)
        inputs = table.loc[:, list(INPUT_COLUMNS)]
        chunks = []
        with tqdm(total=len(table), desc="predict", unit="utt", disable=len(table) <= CHUNK_ROWS) as bar:
            for start in range(0, len(table), CHUNK_ROWS):
                chunks.append(model.predict(inputs.iloc[start:start + CHUNK_ROWS]))
                bar.update(len(chunks[-1]))
        predictions = pd.concat(chunks, ignore_index=True)
        if list(predictions["id"]) != list(table["id"]):
            raise ValueError(f"{loaded_uri} returned predictions for other ids or in another order than {path}")

        prediction_json = out_dir / tracking.PREDICTION_JSON
        prediction_json.write_text(json.dumps(
            [{"id": i, "label": int(label)} for i, label in zip(predictions["id"], predictions["label"])], indent=1))
        prediction_zip = out_dir / tracking.PREDICTION_ZIP
        with zipfile.ZipFile(prediction_zip, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.write(prediction_json, arcname=tracking.PREDICTION_JSON)
        mlflow.log_artifact(str(prediction_json))
        mlflow.log_artifact(str(prediction_zip))
        mlflow.log_dict(list(predictions["id"]), tracking.PREDICT_IDS)
        tracking.log_npy(predictions[list(PROB_COLUMNS)].to_numpy(np.float32), tracking.PREDICT_PROBS)

        metrics = None
        if is_labelled(table):
            y_true, y_pred = table["label"].to_numpy(), predictions["label"].to_numpy()
            metrics = evaluate(y_true, y_pred)
            mlflow.log_metrics(metrics)
            tracking.log_figure(plot_confusion_matrix(
                y_true, y_pred, title=f"{path.name}: macro-F1 (levels 1..8) = {metrics['macro_f1']:.3f}"),
                tracking.CONFUSION_PLOT)
        score = f", macro-F1 (levels 1..8) {metrics['macro_f1']:.4f}" if metrics else ""
        tracking.describe(f"Labelled the {len(predictions)} records of {path} with {loaded_uri} (asked for "
                          f"{config.model_uri}){score}. {tracking.PREDICTION_ZIP} is the CodaBench submission.")
    print(f"predict: {len(predictions)} predictions by {loaded_uri} written to {prediction_json.resolve()} "
          f"and {prediction_zip.resolve()}{score}; run {run.info.run_id}")
    return Predicted(run.info.run_id, loaded_uri, prediction_json, prediction_zip, predictions, metrics)
