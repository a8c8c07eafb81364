"""The ``prepare`` stage: validate the data, augment minority targets, assign folds, log it all.

Later stages read the folds (``folds.csv``) and the augmented variants (``augmented.json``) from this
run by its id: every member trained for a seed trains on that seed's split (another seed, another split)."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from psydef import tracking
from psydef.core.augment import MINORITY_LEVELS, VARIANTS_PER_SOURCE, augment_minority
from psydef.core.data import TABLE_COLUMNS, dataset_digest, read_split, records_to_table
from psydef.core.folds import check_no_leakage, fold_table, leaked_dialogues, n_folds
from psydef.core.metrics import plot_class_distribution
from psydef.stages.config import PrepareConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """What training needs from a prepare run."""
    run_id: str
    train: pd.DataFrame      # real records
    augmented: pd.DataFrame  # variants, with ``source_id``
    folds: pd.DataFrame      # the folds.csv table
    test: pd.DataFrame | None
    digest: str

    @property
    def n_splits(self) -> int:
        return n_folds(self.folds)


def read_data_dir(data_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """``train.json`` (labelled) and ``test.json`` (optional, labels ignored) from ``data_dir``."""
    data_dir = Path(data_dir)
    train = read_split(data_dir / "train.json", labelled=True)
    test_path = data_dir / "test.json"
    test = read_split(test_path, labelled=False) if test_path.exists() else None
    return train, test


def run_prepare(config: PrepareConfig) -> Prepared:
    """Validate, augment, fold and log one ``prepare`` run; returns what training needs."""
    data_dir, seed, n_splits, group_by = config.data_dir, config.seed, config.n_splits, config.group_by
    train, test = read_data_dir(data_dir)
    augmented = augment_minority(train, seed=seed)
    folds = fold_table(train, augmented, n_splits=n_splits, seed=seed, group_by=group_by)
    check_no_leakage(folds, group_by)
    digest = dataset_digest(train)

    with tracking.stage_run(tracking.PREPARE, f"prepare seed={seed}", {tracking.DATA_DIGEST: digest}) as run:
        tracking.log_dataset(train.drop(columns="dialogue"), data_dir / "train.json", targets="label",
                             name="psydefconv-train", digest=digest, context=tracking.TRAINING)
        if test is not None:
            tracking.log_dataset(test.drop(columns=["dialogue", "label"]), data_dir / "test.json",
                                 name="psydefconv-test", digest=dataset_digest(test), context="test")
        tracking.log_new_params({**config.params(), **settings_params(config)})
        mlflow.log_metrics({"n_records": len(train), "n_dialogues": train["dialogue_id"].nunique(),
                            "n_augmented": len(augmented), "n_test_records": 0 if test is None else len(test),
                            "leaked_dialogues": leaked_dialogues(folds)})
        for level, count in augmented["label"].value_counts().sort_index().items():
            mlflow.log_metric(f"n_augmented_level_{level}", int(count))
        with tempfile.TemporaryDirectory() as tmp:
            folds.to_csv(Path(tmp) / tracking.FOLDS_CSV, index=False)
            mlflow.log_artifact(str(Path(tmp) / tracking.FOLDS_CSV))
        tracking.log_figure(plot_class_distribution(train["label"], augmented_labels=augmented["label"]),
                            tracking.CLASS_PLOT)
        mlflow.log_dict(augmented.to_dict(orient="records"), tracking.AUGMENTED_JSON)
        logger.info(f"prepare: {len(train)} records, {train['dialogue_id'].nunique()} dialogues, "
                    f"{len(augmented)} augmented variants, {n_splits} folds by {group_by}, "
                    f"{leaked_dialogues(folds)} dialogues in more than one fold; run {run.info.run_id}")
        tracking.describe(f"Validated {len(train)} labelled records from {train['dialogue_id'].nunique()} dialogues of "
                          f"{data_dir} (data digest {digest}); {len(augmented)} augmented variants of levels "
                          f"{', '.join(map(str, MINORITY_LEVELS))}; {n_splits} folds grouped by {group_by}, "
                          f"{leaked_dialogues(folds)} dialogues split across folds. Train runs read "
                          f"{tracking.FOLDS_CSV} and {tracking.AUGMENTED_JSON} from this run.")
    return Prepared(run.info.run_id, train, augmented, folds, test, digest)


def settings_params(config: PrepareConfig) -> dict[str, str]:
    """The params of a prepare run that decide its folds and variants: its settings but the data folder
    (the data digest stands for the data) and the augmentation's constants."""
    return {**{k: v for k, v in config.params().items() if k != "data_dir"},
            "augment_levels": ",".join(map(str, MINORITY_LEVELS)), "augment_k": str(VARIANTS_PER_SOURCE)}


def find_prepared(config: PrepareConfig) -> Prepared | None:
    """The latest FINISHED prepare run of the data in ``config.data_dir`` with the same settings
    (:func:`settings_params`), loaded as :func:`load_prepared` does; None when there is none. Its folds
    are those :func:`run_prepare` would make again (the fold assignment and the augmentation are
    seeded)."""
    train, _ = read_data_dir(config.data_dir)
    run = tracking.find_finished_run(tracking.PREPARE, dataset_digest(train), params=settings_params(config))
    return None if run is None else load_prepared(run.info.run_id, config.data_dir)


def load_folds(run_id: str) -> pd.DataFrame:
    """The ``folds.csv`` table of prepare run ``run_id`` (the one parser of that file)."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=tracking.FOLDS_CSV,
                                                                   dst_path=tmp),
                               dtype={"id": str, "dialogue_id": str, "source_id": str})
    except (MlflowException, OSError) as err:
        raise ValueError(f"prepare run {run_id!r} has no readable {tracking.FOLDS_CSV}: it did not finish; "
                         "run prepare again") from err


def load_prepared(run_id: str, data_dir: str | Path) -> Prepared:
    """The folds and variants of a finished prepare run, with the records re-read from ``data_dir``
    and checked against the run's data digest; the folds checked for leakage again."""
    run = tracking.get_run(run_id, tracking.PREPARE)
    train, test = read_data_dir(data_dir)
    digest = dataset_digest(train)
    if digest != run.data.tags.get(tracking.DATA_DIGEST):
        raise ValueError(f"{data_dir}/train.json has digest {digest}, but prepare run {run_id} was made from "
                         f"data with digest {run.data.tags.get(tracking.DATA_DIGEST)}; run prepare on this data")
    folds = load_folds(run_id)
    check_no_leakage(folds, run.data.params.get("group_by", PrepareConfig.group_by))
    try:
        augmented = records_to_table_with_source(
            mlflow.artifacts.load_dict(tracking.artifact_uri(run_id, tracking.AUGMENTED_JSON)))
    except (MlflowException, OSError) as err:
        raise ValueError(f"prepare run {run_id} has no {tracking.AUGMENTED_JSON}: it did not finish; "
                         "run prepare again") from err
    return Prepared(run_id, train, augmented, folds, test, digest)


def records_to_table_with_source(records: list[dict]) -> pd.DataFrame:
    """The logged variants back into a table (real-record columns plus ``source_id``, ``is_augmented``)."""
    if not records:
        return pd.DataFrame(columns=[*TABLE_COLUMNS, "source_id", "is_augmented"])
    table = records_to_table(records, labelled=True)
    return table.assign(source_id=[r["source_id"] for r in records], is_augmented=True)
