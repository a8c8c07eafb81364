"""The ``predict`` stage: a registered ensemble labels an official-format file for CodaBench.

Writes ``prediction.json`` (``[{"id", "label"}, ...]``, one entry per record, in file order) and
``prediction.zip`` holding it, and logs both, the blended probabilities and, when the file is
labelled, the official metrics and a confusion matrix in a ``predict`` run.

``out_dir`` is checked before anything is read. Once the model URI resolves, a previous run's
outputs in ``out_dir`` are renamed to ``prediction.previous.json``/``.zip`` (every predict run also
logs its own), so the current names only ever hold this run's outputs: both appear, each written
atomically, once every record is labelled (the zip first); a predict that fails or is killed leaves
neither, and the previous pair intact under its set-aside names.
"""
from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from psydef import tracking
from psydef.core.data import INPUT_COLUMNS, dataset_digest, is_labelled, read_split
from psydef.core.files import atomic_files, writable_folder
from psydef.core.labels import PROB_COLUMNS
from psydef.core.metrics import evaluate, plot_confusion_matrix
from psydef.stages.config import PredictConfig

logger = logging.getLogger(__name__)

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


def output_paths(out_dir: Path) -> tuple[Path, Path]:
    """Where predict writes: ``prediction.json`` and ``prediction.zip`` of ``out_dir``."""
    return out_dir / tracking.PREDICTION_JSON, out_dir / tracking.PREDICTION_ZIP


def set_aside(path: Path) -> Path:
    """Where a previous run's output waits while a new predict runs: ``prediction.previous.json``."""
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def _set_aside_previous_outputs(out_dir: Path) -> None:
    """Rename the outputs in ``out_dir`` to their set-aside names (replacing an older set-aside pair)."""
    current = [p for p in output_paths(out_dir) if p.exists()]
    if not current:
        return
    for path in output_paths(out_dir):
        set_aside(path).unlink(missing_ok=True)
    for path in current:
        os.replace(path, set_aside(path))
    logger.info(f"predict: the previous {' and '.join(p.name for p in current)} in {out_dir} are set aside as "
                f"{' and '.join(set_aside(p).name for p in current)} until this prediction is complete")


def _write_outputs(out_dir: Path, predictions: pd.DataFrame) -> tuple[Path, Path]:
    """prediction.json and the zip holding it, both replaced at once when both are written."""
    prediction_json, prediction_zip = output_paths(out_dir)
    try:
        with atomic_files(prediction_zip, prediction_json) as (zip_tmp, json_tmp):
            json_tmp.write_text(json.dumps(
                [{"id": i, "label": int(label)} for i, label in zip(predictions["id"], predictions["label"])],
                indent=1))
            with zipfile.ZipFile(zip_tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                archive.write(json_tmp, arcname=tracking.PREDICTION_JSON)
    except OSError as err:
        raise ValueError(f"--out-dir {out_dir}: writing {prediction_json.name} and {prediction_zip.name} failed "
                         f"({err}); nothing was written (a previous pair stays as "
                         f"{set_aside(prediction_json).name} and {set_aside(prediction_zip).name})") from err
    for path in output_paths(out_dir):
        set_aside(path).unlink(missing_ok=True)
    return prediction_json, prediction_zip


def run_predict(config: PredictConfig) -> Predicted:
    """Label every record of ``config.data_dir`` (a split file, or a folder holding ``test.json``)
    with the model at ``config.model_uri``; labels in the file are optional and only used for metrics."""
    out_dir = writable_folder(config.out_dir, "--out-dir")
    path = split_path(config.data_dir)
    table = read_split(path)
    loaded_uri = tracking.resolve_model_uri(config.model_uri)
    _set_aside_previous_outputs(out_dir)
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

        prediction_json, prediction_zip = _write_outputs(out_dir, predictions)
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
    logger.info(f"predict: {len(predictions)} predictions by {loaded_uri} written to {prediction_json.resolve()} "
                f"and {prediction_zip.resolve()}{score}; run {run.info.run_id}")
    return Predicted(run.info.run_id, loaded_uri, prediction_json, prediction_zip, predictions, metrics)
