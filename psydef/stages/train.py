"""The ``train`` stage: one parent run per seed, one nested run per fold, OOF logits aggregated.

One path: open the parent (a new one, or the latest matching one for ``resume`` and single-fold jobs,
or the one given), train its missing folds (or the one fold asked for), and once every fold is
complete aggregate and end the parent FINISHED, which is what ``tune`` looks for.

A fold run is complete only when it is FINISHED *and* carries ``psydef.fold_status=finished``, set
after its last artifact is logged, so a fold killed mid-way is never taken for a finished one. Folds
trained as separate jobs (``fold=k``) share a parent left RUNNING; the job completing the last fold
aggregates.
"""
from __future__ import annotations

import logging
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from psydef import progress, tracking
from psydef.backbones import backbone_class
from psydef.backbones.base import Checkpoint
from psydef.calibration.rule import fold_mean_probs
from psydef.core.augment import with_provenance
from psydef.core.folds import oof_fold_mismatch, split_fold
from psydef.core.labels import ALL_LABELS
from psydef.core.metrics import evaluate, plot_confusion_matrix, plot_per_class_f1
from psydef.stages.config import AggregateConfig, PrepareConfig, TrainConfig
from psydef.stages.prepare import Prepared, find_prepared, load_prepared, run_prepare

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldResult:
    """What a fold run logged: kept in memory by the process that trained it, for its aggregate."""
    run_id: str
    oof_ids: list[str]
    oof_logits: np.ndarray
    test_ids: list[str] | None
    test_logits: np.ndarray | None

    @classmethod
    def download(cls, run_id: str, *, with_test: bool) -> FoldResult:
        """The logged result of a fold trained by another process (or before a resume)."""
        def load(ids: str, logits: str):
            return mlflow.artifacts.load_dict(tracking.artifact_uri(run_id, ids)), tracking.load_npy(run_id, logits)

        test = load(tracking.TEST_IDS, tracking.TEST_LOGITS) if with_test else (None, None)
        return cls(run_id, *load(tracking.OOF_IDS, tracking.OOF_LOGITS), *test)


def _rows(prepared: Prepared) -> pd.DataFrame:
    """Every trainable row (real records and augmented variants) indexed by id."""
    return pd.concat([with_provenance(prepared.train), prepared.augmented], ignore_index=True).set_index("id", drop=False)


def train_fold(prepared: Prepared, k: int, *, backbone: str, seed: int, hyper: dict, member: str,
               parent_run_id: str, resume_from=None) -> FoldResult:
    """Train fold ``k`` in its own run nested under the parent, continuing the checkpoint of fold run
    ``resume_from`` when given; returns what it logged."""
    progress.fold_banner(seed, k, prepared.n_splits)
    train_ids, valid_ids = split_fold(prepared.folds, k)
    rows = _rows(prepared)
    train_rows, valid_rows = rows.loc[train_ids["id"]], rows.loc[valid_ids["id"]]
    model = backbone_class(backbone)(**hyper)
    model.warm_up(pd.concat([rows, prepared.test]) if prepared.test is not None else rows)
    # MLflow's own system metrics monitor off: psydef's also logs a fold shorter than its sampling interval
    with (mlflow.start_run(run_name=f"fold {k}", nested=mlflow.active_run() is not None,
                           log_system_metrics=False) as run,
          tracking.system_metrics(run.info.run_id),
          tempfile.TemporaryDirectory() as scratch):
        mlflow.set_tags(tracking.fold_tags(parent_run_id, k, seed=seed, backbone=backbone, member=member,
                                           data_digest=prepared.digest, prepare_run_id=prepared.run_id))
        tracking.log_new_params({**model.config(), "fold": k, "seed": seed, "n_train_rows": len(train_rows),
                                 "n_valid_rows": len(valid_rows)})
        y_valid = valid_rows["label"].to_numpy()
        last = {}  # the latest epoch's metrics: one console line per fold, every epoch in MLflow

        def on_epoch(epoch: int, loss: float, valid_logits):
            metrics = {tracking.TRAIN_LOSS: loss}
            if valid_logits is not None:
                scores = evaluate(y_valid, valid_logits.argmax(1))
                metrics |= {tracking.VAL_PREFIX + name: scores[name] for name in ("macro_f1", "macro_f1_all", "accuracy")}
            mlflow.log_metrics(metrics, step=epoch)
            last.update(metrics, epoch=epoch)

        model.fit(train_rows, seed=seed, valid=valid_rows, on_epoch=on_epoch,
                  checkpoint=_fold_checkpoint(Path(scratch), resume_from))
        logger.info(f"fold {k}: {last.pop('epoch', 0)} epochs, " + ", ".join(f"{n} {v:.4f}" for n, v in last.items()))
        oof_ids, oof_logits = list(valid_rows["id"]), model.predict_logits(valid_rows)
        mlflow.log_dict(oof_ids, tracking.OOF_IDS)
        tracking.log_npy(oof_logits, tracking.OOF_LOGITS)
        test_ids = test_logits = None
        if prepared.test is not None:
            test_ids, test_logits = list(prepared.test["id"]), model.predict_logits(prepared.test)
            mlflow.log_dict(test_ids, tracking.TEST_IDS)
            tracking.log_npy(test_logits, tracking.TEST_LOGITS)
        mlflow.log_artifacts(str(model.save(Path(scratch) / "adapter")), tracking.ADAPTER_DIR)
        tracking.complete_fold()
        tracking.delete_checkpoints(parent_run_id, k)
    return FoldResult(run.info.run_id, oof_ids, oof_logits, test_ids, test_logits)


def _fold_checkpoint(scratch: Path, resume_from) -> Checkpoint:
    """The active fold run's checkpoint: the backbone saves its training state in a local folder,
    which is logged to the fold run (``checkpoint/``) after each save, so a resumed job on any machine
    continues from it; with ``resume_from`` (a killed fold run) the folder starts as its checkpoint."""
    if resume_from is None:
        return Checkpoint(scratch / tracking.CHECKPOINT_DIR,
                          on_save=lambda epoch: tracking.log_checkpoint(scratch / tracking.CHECKPOINT_DIR, epoch))
    folder = tracking.continue_fold_run(resume_from, scratch)
    return Checkpoint(folder, on_save=lambda epoch: tracking.log_checkpoint(folder, epoch),
                      origin=f"of fold run {resume_from.info.run_id}")


def aggregate(parent_run_id: str, prepared: Prepared, trained: dict[int, FoldResult] | None = None) -> dict[str, float]:
    """Log the parent's OOF logits (every real record once), fold-averaged test probabilities, OOF
    metrics and plots from its complete fold runs: ``trained`` holds those this process trained (in
    memory), the others are downloaded."""
    trained = dict(trained or {})
    folds = tracking.complete_fold_runs(tracking.client().get_run(parent_run_id))
    n_splits = len(folds)
    results = [trained[k] if k in trained and trained[k].run_id == fold.info.run_id
               else FoldResult.download(fold.info.run_id, with_test=prepared.test is not None)
               for k, fold in enumerate(folds)]
    for k, result in enumerate(results):  # each OOF row from the one fold model that never saw it
        mismatch = oof_fold_mismatch(prepared.folds, k, result.oof_ids)
        if mismatch:
            raise ValueError(f"fold run {result.run_id} (fold {k} of train run {parent_run_id}): its OOF ids are not "
                             f"the real records of fold {k} of prepare run {prepared.run_id} ({mismatch})")
    ids = [i for result in results for i in result.oof_ids]
    logits = np.concatenate([result.oof_logits for result in results])
    if set(ids) != set(prepared.train["id"]):
        raise ValueError(f"train run {parent_run_id}: the fold runs' OOF ids do not cover each real record of "
                         f"prepare run {prepared.run_id} once")
    y = prepared.train.set_index("id").loc[ids, "label"].to_numpy()
    scores = evaluate(y, logits.argmax(1))
    metrics = {tracking.OOF_F1: scores["macro_f1"], tracking.OOF_F1_ALL: scores["macro_f1_all"],
               tracking.OOF_ACCURACY: scores["accuracy"],
               **{tracking.OOF_LEVEL_F1.format(level): scores[f"f1_level_{level}"] for level in ALL_LABELS}}
    active = mlflow.active_run()
    reopen = active is None or active.info.run_id != parent_run_id  # a fold job aggregating another's parent
    with mlflow.start_run(run_id=parent_run_id, nested=active is not None) if reopen else nullcontext():
        mlflow.log_dict(ids, tracking.OOF_IDS)
        tracking.log_npy(logits, tracking.OOF_LOGITS)
        if prepared.test is not None:
            probs = fold_mean_probs([result.test_logits for result in results]).astype(np.float32)
            mlflow.log_dict(results[0].test_ids, tracking.TEST_IDS)
            tracking.log_npy(probs, tracking.TEST_PROBS)
        mlflow.log_metrics(metrics)
        tracking.log_figure(plot_confusion_matrix(
            y, logits.argmax(1), title=f"OOF confusion matrix (macro-F1 1..8 = {scores['macro_f1']:.3f})"),
            tracking.CONFUSION_PLOT)
        tracking.log_figure(plot_per_class_f1(y, logits.argmax(1)), tracking.PER_CLASS_F1_PLOT)
    summary = (f"OOF macro-F1 (levels 1..8) {metrics[tracking.OOF_F1]:.4f}, macro-F1 (0..8) "
               f"{metrics[tracking.OOF_F1_ALL]:.4f}, accuracy {metrics[tracking.OOF_ACCURACY]:.4f}")
    parent = tracking.client().get_run(parent_run_id)
    origin = {tracking.PREPARE_NESTED: ", nested under this run",
              tracking.PREPARE_REUSED: ", a FINISHED prepare run of the same data and settings, reused"}.get(
        parent.data.tags.get(tracking.PREPARE_ORIGIN), "")
    tracking.describe(f"Seed {parent.data.tags.get(tracking.SEED)}, member {tracking.member_of(parent)}: {n_splits} "
                      f"fold runs on the folds of prepare run {prepared.run_id}{origin} (data digest {prepared.digest}). "
                      f"{summary}. {tracking.OOF_LOGITS} holds the out-of-fold logits that tune calibrates.",
                      parent_run_id)
    logger.info(f"train {parent_run_id}: {summary}")
    return metrics


def run_train(config: TrainConfig, *, experiment_id: str, prepared: Prepared | None = None) -> str:
    """Train one member for one seed; returns the parent run id.

    The parent is ``config.parent_run_id``, else (``resume``, or a single ``fold``) the latest parent
    of this seed, member and prepare run, else a new one in experiment ``experiment_id``. Its
    missing folds (or fold ``config.fold``) are trained; once all are complete the parent is
    aggregated and ends FINISHED. ``prepared`` is the prepare stage's result when the caller holds it
    (``main``); otherwise it is read from ``config.prepare_run_id``, or (a new parent) the parent takes
    the latest FINISHED prepare run of the same data and settings, else prepares in a run nested under
    itself. A new parent is the stage's own run: under ``mlflow run``, the run it created."""
    backbone, hyper, member = config.backbone_name(), config.backbone_hyper(), config.member_tag()
    logger.info(f"train: member {member}, seed {config.seed} (asked: backbone {config.backbone})")
    run_name = f"train seed={config.seed} {member}"
    if prepared is None and config.prepare_run_id is None:  # a new parent; its folds come from a prepare run
        with tracking.stage_run(tracking.TRAIN, run_name) as parent:
            prepared, origin = _prepare_for(config)
            _train_missing_folds(parent.info.run_id, config, prepared, backbone, hyper, member, origin)
        return parent.info.run_id
    if prepared is None:
        prepared = load_prepared(config.prepare_run_id, config.data_dir)
    if config.fold is not None and config.fold >= prepared.n_splits:
        raise ValueError(f"--fold: {config.fold} is out of range: the folds of prepare run {prepared.run_id} are "
                         f"0..{prepared.n_splits - 1}")
    parent_id = config.parent_run_id
    if parent_id is None and (config.resume or config.fold is not None):
        parent_id = tracking.find_parent(config.seed, backbone, prepared.run_id, member)
        if parent_id is None and config.resume:
            raise ValueError(f"nothing to resume: no train run for seed {config.seed}, member {member}, prepare "
                             f"run {prepared.run_id}")
    if parent_id is None and config.fold is None:  # a new parent that this process trains to the end
        with tracking.stage_run(tracking.TRAIN, run_name) as parent:
            _train_missing_folds(parent.info.run_id, config, prepared, backbone, hyper, member)
        return parent.info.run_id
    if parent_id is None:  # left RUNNING: the fold job that completes the last fold aggregates and ends it
        parent_id = tracking.client().create_run(experiment_id, run_name=run_name).info.run_id
    if _train_missing_folds(parent_id, config, prepared, backbone, hyper, member):
        tracking.client().set_terminated(parent_id, "FINISHED")
    return parent_id


def _prepare_for(config: TrainConfig) -> tuple[Prepared, str]:
    """The folds of a new train parent (the active run) without a prepare run given: the latest
    FINISHED prepare run of the same data and settings, else a new one nested under the parent."""
    prepare = PrepareConfig(data_dir=config.data_dir, seed=config.seed)
    found = find_prepared(prepare)
    if found is None:
        return run_prepare(prepare), tracking.PREPARE_NESTED
    logger.info(f"train: reusing prepare run {found.run_id} (FINISHED, data digest {found.digest}, the same settings: "
                f"seed {prepare.seed}, {prepare.n_splits} folds by {prepare.group_by})")
    return found, tracking.PREPARE_REUSED


def _train_missing_folds(parent_id: str, config: TrainConfig, prepared: Prepared, backbone: str, hyper: dict,
                         member: str, origin: str | None = None) -> bool:
    """Tag the parent, train its missing folds (or ``config.fold``) and aggregate it once every fold
    is complete; True when it is."""
    _tag_parent(parent_id, config, prepared, backbone, hyper, member, origin)
    tracking.mark_stale_folds_failed(parent_id, config.fold)
    done = tracking.fold_runs(parent_id)
    todo = [config.fold] if config.fold is not None else [k for k in range(prepared.n_splits) if k not in done]
    # resume: a fold killed mid-way continues from the checkpoint of its last run
    trained = {k: train_fold(prepared, k, backbone=backbone, seed=config.seed, hyper=hyper, member=member,
                             parent_run_id=parent_id,
                             resume_from=tracking.checkpointed_fold_run(parent_id, k) if config.resume else None)
               for k in todo}
    if len(tracking.fold_runs(parent_id)) < prepared.n_splits:
        return False
    aggregate(parent_id, prepared, trained)
    return True


def _tag_parent(parent_id: str, config: TrainConfig, prepared: Prepared, backbone: str, hyper: dict, member: str,
                origin: str | None) -> None:
    """``origin``: how a new parent got its prepare run (tracking.PREPARE_NESTED or PREPARE_REUSED); None
    for a prepare run given (a resume or a fold job keeps the tag its parent has)."""
    tags = tracking.train_tags(config.seed, backbone, prepared.digest, prepared.run_id, member)
    if origin is not None:
        tags[tracking.PREPARE_ORIGIN] = origin
    tracking.set_run_tags(parent_id, tags)
    # The settings as given, then every hyper-parameter the backbone trains with, defaults included, so
    # the compare view shows what differs between two runs (a setting already logged keeps its value).
    # Only what every job of the parent shares: not fold, resume or parent_run_id.
    shared = {k: v for k, v in config.params().items() if k in ("data_dir", "seed", "hyper")}
    tracking.log_new_params({**shared, "prepare_run_id": prepared.run_id, "backbone": backbone,
                             **backbone_class(backbone)(**hyper).config()}, parent_id)
    tracking.log_training_dataset(parent_id, prepared.run_id)


def run_aggregate(config: AggregateConfig) -> dict[str, float]:
    """Aggregate a train run whose folds were trained as separate jobs and end it FINISHED (what the
    job completing the last fold does), from an ``aggregate`` run nested under it (the stage's own run:
    under ``mlflow run``, the run it created); running it again rewrites the same results."""
    parent = tracking.get_run(config.parent_run_id, tracking.TRAIN)
    tagged = parent.data.tags.get(tracking.PREPARE_RUN_ID, "")
    if config.prepare_run_id and tagged and config.prepare_run_id != tagged:
        raise ValueError(f"train run {config.parent_run_id} was trained on the folds of prepare run {tagged}, "
                         f"not {config.prepare_run_id}")
    prepared = load_prepared(config.prepare_run_id or tagged, config.data_dir)
    tags = {tracking.TRAIN_RUN_ID: config.parent_run_id, tracking.PARENT_RUN_ID: config.parent_run_id}
    with tracking.stage_run(tracking.AGGREGATE, f"aggregate {parent.info.run_name}", tags):
        tracking.log_new_params(config.params())
        metrics = aggregate(config.parent_run_id, prepared)
        tracking.describe(f"Aggregated train run {config.parent_run_id} from its complete fold runs and ended it "
                          f"FINISHED: OOF macro-F1 (levels 1..8) {metrics[tracking.OOF_F1]:.4f}.")
    return metrics
