"""The ``train`` stage: one parent run per seed, one nested run per fold, OOF logits aggregated.

A fold run is complete only when it is FINISHED *and* carries ``psydef.fold_status=finished``, set
after its last artifact is logged, so a fold killed mid-way is never taken for a finished one. The
parent aggregates once every fold is complete and only then ends FINISHED, which is what ``tune``
looks for. ``fold=k`` trains one fold under an existing parent (folds as separate jobs); the job that
completes the last fold aggregates.
"""
from __future__ import annotations

import inspect
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd

from psydef import progress, tracking
from psydef.backbones import backbone_class, resolve_backbone_name
from psydef.calibration.rule import softmax
from psydef.core.folds import check_no_leakage, split_fold
from psydef.core.metrics import evaluate, plot_confusion_matrix, plot_per_class_f1
from psydef.stages.prepare import Prepared, load_prepared, run_prepare

def _rows(prepared: Prepared) -> pd.DataFrame:
    """Every trainable row (real records and augmented variants) indexed by id."""
    real = prepared.train.assign(source_id=prepared.train["id"], is_augmented=False)
    return pd.concat([real, prepared.augmented], ignore_index=True).set_index("id", drop=False)


def train_fold(prepared: Prepared, k: int, *, backbone: str, seed: int, hyper: dict, parent_run_id: str) -> str:
    """Train fold ``k`` in its own run nested under the parent; returns the fold run id."""
    import mlflow

    progress.fold_banner(seed, k, _n_splits(prepared))
    train_ids, valid_ids = split_fold(prepared.folds, k)
    rows = _rows(prepared)
    train_rows, valid_rows = rows.loc[train_ids["id"]], rows.loc[valid_ids["id"]]
    model = backbone_class(backbone)(**hyper)
    model.warm_up(pd.concat([rows, prepared.test]) if prepared.test is not None else rows)
    with mlflow.start_run(run_name=f"fold {k}", nested=mlflow.active_run() is not None) as run:
        mlflow.set_tags({tracking.STAGE: tracking.FOLD_RUN, tracking.FOLD: str(k), tracking.PARENT_RUN_ID: parent_run_id,
                         tracking.SEED: str(seed), tracking.BACKBONE: backbone,
                         tracking.DATA_DIGEST: prepared.digest, tracking.PREPARE_RUN_ID: prepared.run_id})
        tracking.log_new_params({**model.config(), "fold": k, "seed": seed, "n_train_rows": len(train_rows),
                           "n_valid_rows": len(valid_rows)})
        y_valid = valid_rows["label"].to_numpy()

        def on_epoch(epoch: int, loss: float, valid_logits):
            metrics = {"train_loss": loss}
            if valid_logits is not None:
                scores = evaluate(y_valid, valid_logits.argmax(1))
                metrics |= {f"val_{name}": scores[name] for name in ("macro_f1", "macro_f1_all", "accuracy")}
            mlflow.log_metrics(metrics, step=epoch)
            print(f"fold {k} epoch {epoch}: " + ", ".join(f"{n} {v:.4f}" for n, v in metrics.items()))

        model.fit(train_rows, seed=seed, valid=valid_rows, on_epoch=on_epoch)
        tracking.log_json(list(valid_rows["id"]), tracking.OOF_IDS)
        tracking.log_npy(model.predict_logits(valid_rows), tracking.OOF_LOGITS)
        if prepared.test is not None:
            tracking.log_json(list(prepared.test["id"]), tracking.TEST_IDS)
            tracking.log_npy(model.predict_logits(prepared.test), tracking.TEST_LOGITS)
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifacts(str(model.save(Path(tmp) / "adapter")), tracking.ADAPTER_DIR)
        mlflow.set_tag(tracking.FOLD_STATUS, "finished")
    return run.info.run_id


def aggregate(parent_run_id: str, prepared: Prepared) -> dict[str, float]:
    """Log the parent's OOF logits (every real record once), fold-averaged test probabilities, OOF
    metrics and plots, computed from the fold runs' logged logits; end the parent FINISHED."""
    import mlflow

    n_splits = int(prepared.folds["fold"].max()) + 1
    folds = tracking.fold_runs(parent_run_id)
    missing = sorted(set(range(n_splits)) - set(folds))
    if missing:
        raise ValueError(f"train run {parent_run_id}: folds {missing} are not complete; train them "
                         "(-P fold=k, or -P resume=true) before aggregating")
    ids = [i for k in range(n_splits) for i in tracking.load_json(folds[k].info.run_id, tracking.OOF_IDS)]
    logits = np.concatenate([tracking.load_npy(folds[k].info.run_id, tracking.OOF_LOGITS) for k in range(n_splits)])
    real_ids = set(prepared.train["id"])
    if len(ids) != len(real_ids) or set(ids) != real_ids:
        raise ValueError(f"train run {parent_run_id}: the fold runs' OOF ids do not cover each real record once")
    y = prepared.train.set_index("id").loc[ids, "label"].to_numpy()
    scores = evaluate(y, logits.argmax(1))
    metrics = {"oof_macro_f1": scores["macro_f1"], "oof_macro_f1_all": scores["macro_f1_all"],
               "oof_accuracy": scores["accuracy"],
               **{name.replace("f1_level", "oof_f1_level"): v for name, v in scores.items() if name.startswith("f1_level")}}
    active = mlflow.active_run()
    reopen = active is None or active.info.run_id != parent_run_id  # a fold job aggregating another's parent
    with mlflow.start_run(run_id=parent_run_id, nested=active is not None) if reopen else nullcontext():
        tracking.log_json(ids, tracking.OOF_IDS)
        tracking.log_npy(logits, tracking.OOF_LOGITS)
        if prepared.test is not None:
            test_ids = tracking.load_json(folds[0].info.run_id, tracking.TEST_IDS)
            probs = np.mean([softmax(tracking.load_npy(folds[k].info.run_id, tracking.TEST_LOGITS))
                             for k in range(n_splits)], axis=0).astype(np.float32)
            tracking.log_json(test_ids, tracking.TEST_IDS)
            tracking.log_npy(probs, tracking.TEST_PROBS)
        mlflow.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            plot_confusion_matrix(y, logits.argmax(1), Path(tmp) / "confusion_matrix.png",
                                  title=f"OOF confusion matrix (macro-F1 1..8 = {scores['macro_f1']:.3f})")
            plot_per_class_f1(y, logits.argmax(1), Path(tmp) / "per_class_f1.png")
            mlflow.log_artifacts(tmp, "plots")
    print(f"train {parent_run_id}: OOF macro-F1 (levels 1..8) {metrics['oof_macro_f1']:.4f}, "
          f"macro-F1 (0..8) {metrics['oof_macro_f1_all']:.4f}, accuracy {metrics['oof_accuracy']:.4f}")
    return metrics


def run_train(data_dir: str | Path, *, seed: int = 42, prepare_run_id: str | None = None, backbone: str = "auto",
              model: str | None = None, fold: int | None = None, parent_run_id: str | None = None, resume: bool = False,
              hyper: dict | None = None) -> str:
    """Train one seed; returns the parent run id.

    ``fold=None`` trains every fold (``resume=True`` reopens the latest matching parent and trains only
    its incomplete folds). ``fold=k`` trains fold k under ``parent_run_id`` (else the latest matching
    parent, else a new one) and aggregates if that completes the parent. ``model`` (an HF id or path)
    goes to backbones that take one (the LLM)."""
    import mlflow

    hyper = dict(hyper or {})
    if fold is None and not resume:
        with tracking.stage_run(tracking.TRAIN, f"train seed={seed}") as parent:
            name = _resolve(backbone, hyper, model)  # bad input leaves this run FAILED, with nothing logged
            mlflow.set_tag("mlflow.runName", f"train seed={seed} {name}")
            prepared = _prepared(data_dir, seed, prepare_run_id)
            _tag_parent(parent.info.run_id, prepared, seed, name, hyper)
            for k in range(_n_splits(prepared)):
                train_fold(prepared, k, backbone=name, seed=seed, hyper=hyper, parent_run_id=parent.info.run_id)
            aggregate(parent.info.run_id, prepared)
        return parent.info.run_id

    name = _resolve(backbone, hyper, model)
    if prepare_run_id is None:
        raise ValueError("resume and single-fold training need -P prepare_run_id (the folds the parent was trained on)")
    prepared = _prepared(data_dir, seed, prepare_run_id)
    if fold is not None and not 0 <= fold < _n_splits(prepared):
        raise ValueError(f"fold {fold} is out of range: the folds are 0..{_n_splits(prepared) - 1}")
    parent_id = parent_run_id or tracking.find_parent(seed, name, prepare_run_id)
    if parent_id is None:
        if resume:
            raise ValueError(f"nothing to resume: no train run for seed {seed}, backbone {name}, prepare run "
                             f"{prepare_run_id}")
        # Left RUNNING: the job that completes the last fold aggregates and ends it.
        from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID  # the experiment configure() set

        parent_id = tracking.client().create_run(MLFLOW_EXPERIMENT_ID.get(), run_name=f"train seed={seed} {name}").info.run_id
    _tag_parent(parent_id, prepared, seed, name, hyper)
    tracking.mark_stale_folds_failed(parent_id, fold)
    todo = [fold] if fold is not None else [k for k in range(_n_splits(prepared)) if k not in tracking.fold_runs(parent_id)]
    for k in todo:
        train_fold(prepared, k, backbone=name, seed=seed, hyper=hyper, parent_run_id=parent_id)
    if len(tracking.fold_runs(parent_id)) == _n_splits(prepared):
        aggregate(parent_id, prepared)
        tracking.client().set_terminated(parent_id, "FINISHED")
    return parent_id


def _resolve(backbone: str, hyper: dict, model: str | None) -> str:
    """The backbone's name; completes ``hyper`` in place with ``model`` where the backbone takes one."""
    name = resolve_backbone_name(backbone)
    cls = backbone_class(name)
    if model and "model" in inspect.signature(cls).parameters:
        hyper.setdefault("model", model)
    print(f"train: backbone {name} (asked: {backbone})")
    try:
        cls(**hyper)  # unknown hyper-parameters fail here, before any training
    except TypeError as err:
        raise ValueError(f"bad hyper-parameters {sorted(hyper)} for backbone {name}: {err}") from err
    return name


def _prepared(data_dir, seed: int, prepare_run_id: str | None) -> Prepared:
    if prepare_run_id is None:
        return run_prepare(data_dir, seed=seed)
    prepared = load_prepared(prepare_run_id, data_dir)
    check_no_leakage(prepared.folds, _group_by(prepare_run_id))
    return prepared


def _group_by(prepare_run_id: str) -> str:
    return tracking.client().get_run(prepare_run_id).data.params.get("group_by", "dialogue")


def _n_splits(prepared: Prepared) -> int:
    return int(prepared.folds["fold"].max()) + 1


def _tag_parent(parent_id: str, prepared: Prepared, seed: int, backbone: str, hyper: dict) -> None:
    client = tracking.client()
    for key, value in {tracking.STAGE: tracking.TRAIN, tracking.SEED: str(seed), tracking.BACKBONE: backbone,
                       tracking.DATA_DIGEST: prepared.digest, tracking.PREPARE_RUN_ID: prepared.run_id}.items():
        client.set_tag(parent_id, key, value)
    tracking.log_new_params({"seed": seed, "backbone": backbone, **hyper}, parent_id)
