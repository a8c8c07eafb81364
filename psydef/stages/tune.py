"""The ``tune`` stage: calibrate the ensemble of logged train runs on their out-of-fold logits.

Nothing is trained or recomputed: each member's OOF ids and logits are downloaded from its ``train``
parent run, the labels and dialogues of those ids from the ``folds.csv`` of its prepare run. The
search, the estimate of its gain on unseen rows and the choice between the calibrated rule and the plain
blend are :func:`psydef.calibration.calibrate.calibrate_oof`'s; this module fetches, aligns, calls and logs the
outcome in a ``tune`` run: the OOF macro-F1s and the estimated gain, the choice (tag ``psydef.calibration``)
and why (the run description), the chosen rule's per-level F1, ``ensemble.json`` (the chosen
:class:`~psydef.calibration.rule.EnsembleSpec`), the trials and the plots.
"""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
from mlflow.exceptions import MlflowException

from psydef import tracking
from psydef.calibration.calibrate import calibrate_oof
from psydef.calibration.study import interactive_plots
from psydef.core.labels import N_LEVELS
from psydef.core.metrics import plot_confusion_matrix
from psydef.backbones import resolve_backbone_name
from psydef.stages.config import MemberSpec, TuneConfig, member_tag
from psydef.stages.prepare import load_folds

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OOFBundle:
    """The members' OOF logits, aligned on one id order, with the labels and dialogues of those ids."""
    run_ids: list[str]
    backbones: list[str]  # per member
    members: list[str]  # per member: its spec (tracking.member_of)
    data_digest: str
    ids: list[str]
    logits: list[np.ndarray]  # per member, (n, 9), rows in ``ids`` order
    y: np.ndarray
    groups: np.ndarray  # dialogue ids


def pick_train_runs(experiment_id: str, members: tuple[MemberSpec, ...] = ()) -> list:
    """The latest FINISHED ``train`` parent run of each member and seed in experiment ``experiment_id``,
    newest first: of the members ``members`` (default: the newest train run's member), among the runs
    that share the data digest of the newest one of them. Members trained on different fold partitions
    (each seed its own) blend: tune aligns them by record id."""
    experiment = mlflow.get_experiment(experiment_id)
    runs = tracking.finished_train_runs(experiment.experiment_id)
    wanted = [member_tag(resolve_backbone_name(m.backbone), m.hyper) for m in members]
    if wanted:
        runs = [run for run in runs if tracking.member_of(run) in wanted]
    if not runs:
        what = f" of member(s) {', '.join(wanted)}" if wanted else ""
        raise ValueError(f"no FINISHED train run{what} in experiment {experiment.name!r} of "
                         f"{tracking.redact_uri(mlflow.get_tracking_uri())}: train first, or pass "
                         "train_runs=RUN_ID,RUN_ID")
    digest = runs[0].data.tags.get(tracking.DATA_DIGEST)
    wanted = wanted or [tracking.member_of(runs[0])]
    latest: dict[tuple[str, str], object] = {}
    for run in runs:
        if run.data.tags.get(tracking.DATA_DIGEST) == digest and tracking.member_of(run) in wanted:
            latest.setdefault((tracking.member_of(run), run.data.tags.get(tracking.SEED)), run)
    missing = [m for m in wanted if m not in {member for member, _ in latest}]
    if missing:
        raise ValueError(f"no FINISHED train run of member(s) {', '.join(missing)} with data digest {digest} (that of "
                         f"the newest train run of the members asked for) in experiment {experiment.name!r}")
    picked = list(latest.values())
    logger.info(f"tune: picked the latest FINISHED train run of each member and seed with data digest {digest}: "
                + ", ".join(f"{r.info.run_id} ({tracking.member_of(r)}, seed {r.data.tags.get(tracking.SEED)})"
                            for r in picked))
    return picked


def _train_run(run_id: str):
    """The train parent run ``run_id``, once it is a complete training: FINISHED, with a complete fold
    run for every fold of its prepare run."""
    run = tracking.get_run(run_id, tracking.TRAIN)
    if run.info.status != "FINISHED":
        raise ValueError(f"train run {run_id} is {run.info.status}, not FINISHED: its folds are not all trained "
                         "and aggregated (train -P resume=true finishes it)")
    tracking.complete_fold_runs(run)
    return run


def _download(run_id: str, artifact_path: str):
    """A run's JSON or ``.npy`` artifact, or None when the run has no such artifact."""
    try:
        if artifact_path.endswith(".npy"):
            return tracking.load_npy(run_id, artifact_path)
        return mlflow.artifacts.load_dict(tracking.artifact_uri(run_id, artifact_path))
    except (MlflowException, OSError):
        return None


def _real_records(prepare_run_id: str, train_run_id: str) -> pd.DataFrame:
    """The real (not augmented) rows of the prepare run's folds.csv, indexed by record id."""
    try:
        folds = load_folds(prepare_run_id)
    except ValueError as err:
        raise ValueError(f"{err} (tag {tracking.PREPARE_RUN_ID} of train run {train_run_id})") from err
    return folds[~folds["is_augmented"].astype(bool)].set_index("id")


def align_members(members: Sequence[tuple[str, Sequence, np.ndarray | None]]) -> tuple[list, list[np.ndarray]]:
    """``[(run_id, ids, logits), ...]`` -> (ids, [logits per member]) with every member's rows in
    the first member's id order. Refuses members without (n, 9) logits, with duplicate ids, or
    whose set of ids differs from the first member's."""
    if not members:
        raise ValueError("align_members needs at least one member.")
    ref_run, ref_ids = members[0][0], list(members[0][1])
    aligned = []
    for run_id, ids, logits in members:
        ids = list(ids)
        if logits is None or np.size(logits) == 0:
            raise ValueError(f"Run {run_id} has no OOF logits.")
        logits = np.asarray(logits, dtype=np.float64)
        if logits.shape != (len(ids), N_LEVELS) or not np.isfinite(logits).all():
            raise ValueError(f"Run {run_id}'s OOF logits must be finite with shape ({len(ids)}, {N_LEVELS}) "
                             f"(one row per OOF id); got shape {logits.shape}.")
        position = {i: row for row, i in enumerate(ids)}
        if len(position) != len(ids):
            raise ValueError(f"Run {run_id} has {len(ids) - len(position)} duplicate OOF ids.")
        missing = [i for i in ref_ids if i not in position]
        extra = len(ids) - (len(ref_ids) - len(missing))
        if missing or extra:
            raise ValueError(
                f"Runs {ref_run} and {run_id} have different OOF ids: {len(missing)} of {ref_run}'s ids are "
                f"missing from {run_id} and {extra} of {run_id}'s are not in {ref_run} "
                f"(e.g. {(missing or [i for i in ids if i not in set(ref_ids)])[:3]}).")
        aligned.append(logits[[position[i] for i in ref_ids]])
    return ref_ids, aligned


def load_oof(run_ids: list[str]) -> OOFBundle:
    """The OOF logits of the train runs ``run_ids``, aligned by record id, with their labels and
    dialogues. Refuses runs that are not FINISHED train parents, that disagree on the data digest,
    that have no OOF logits or whose OOF ids differ."""
    if not run_ids:
        raise ValueError("no train run given")
    repeated = sorted({r for r in run_ids if run_ids.count(r) > 1})
    if repeated:
        raise ValueError(f"train runs listed more than once: {repeated}")
    runs = [_train_run(run_id) for run_id in run_ids]
    digests = {run.info.run_id: run.data.tags.get(tracking.DATA_DIGEST) for run in runs}
    if len(set(digests.values())) != 1:
        raise ValueError("the train runs were trained on different data (tag "
                         f"{tracking.DATA_DIGEST}): {digests}; calibrate runs of one data digest")
    ids, logits = align_members([(run_id, _download(run_id, tracking.OOF_IDS) or [],
                                  _download(run_id, tracking.OOF_LOGITS)) for run_id in run_ids])
    # Same digest: every member's prepare run holds the same records, so the first one's labels serve all.
    prepare_run_id = runs[0].data.tags.get(tracking.PREPARE_RUN_ID, "")
    records = _real_records(prepare_run_id, run_ids[0])
    unknown = [i for i in ids if i not in records.index]
    if unknown:
        raise ValueError(f"{len(unknown)} OOF ids of train run {run_ids[0]} are not real records of its prepare run "
                         f"{prepare_run_id} (e.g. {unknown[:3]})")
    rows = records.loc[ids]
    return OOFBundle(run_ids=list(run_ids), backbones=[run.data.tags.get(tracking.BACKBONE, "") for run in runs],
                     members=[tracking.member_of(run) for run in runs],
                     data_digest=digests[run_ids[0]], ids=ids, logits=logits,
                     y=rows["label"].to_numpy(dtype=np.int64), groups=rows["dialogue_id"].to_numpy())


def default_study_name(run_ids: list[str]) -> str:
    """One study per ensemble: a stored study is only resumed or shared by tunes of the same members."""
    return "calibration-" + "-".join(run_id[:8] for run_id in run_ids)


def run_tune(config: TuneConfig, *, experiment_id: str) -> str:
    """Calibrate the ensemble of ``config.train_runs`` (default: :func:`pick_train_runs` of experiment
    ``experiment_id``) on their OOF logits, estimate the calibration's gain over the plain blend on unseen
    rows, and log the chosen rule (the calibrated one only when that gain is positive) in a ``tune`` run;
    returns its id.

    ``storage`` (``sqlite:///optuna.db``, ``path.journal``; in memory when None) keeps the study, so a
    second tune of the same members resumes it (``n_trials`` is the study's total) and tunes running at
    once share it. ``study_name`` defaults to :func:`default_study_name`. ``inner_trials``: the trials of
    each search rerun inside the gain estimate."""
    train_runs, n_trials, sampler, gate, seed = list(config.train_runs), config.n_trials, config.sampler, config.gate, config.seed
    storage, study_name, inner_trials = config.storage, config.study_name, config.inner_trials
    if storage:  # an unreachable database fails here in one line, before the members are read
        tracking.probe(storage, setting="--storage (-P storage)", what="Optuna storage")
    run_ids = train_runs or [run.info.run_id for run in pick_train_runs(experiment_id, config.members)]
    oof = load_oof(run_ids)
    study = study_name or default_study_name(run_ids)
    backbone = ",".join(dict.fromkeys(oof.backbones))
    n_dialogues = len(np.unique(oof.groups))
    logger.info(f"tune: {len(run_ids)} member(s) {run_ids} ({', '.join(oof.members)}), data digest {oof.data_digest}: "
                f"{len(oof.ids)} OOF rows from {n_dialogues} dialogues")
    tags = {tracking.DATA_DIGEST: oof.data_digest, tracking.BACKBONE: backbone,
            tracking.MEMBER_RUN_IDS: ",".join(run_ids), tracking.STUDY_NAME: study}
    # As given (what `mlflow run` logs from -P); the resolved members and study are the tags above.
    params = config.params()
    with tracking.stage_run(tracking.TUNE, f"tune {sampler} n_trials={n_trials}", tags) as run:
        tracking.log_new_params(params | {"n_members": len(run_ids), "n_oof_rows": len(oof.ids),
                                          "n_dialogues": n_dialogues})
        logger.info(f"tune: {n_trials} {sampler} trials on all OOF rows (study {study!r}, storage "
                    f"{tracking.redact_uri(storage) if storage else 'in-memory'}), then the gain estimate: the search "
                    f"rerun with {inner_trials} trials in each fold of repeated record-level K-fold splits")
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar stands for Optuna's line per trial
        try:
            report = calibrate_oof(oof.logits, oof.y, run_ids=run_ids, data_digest=oof.data_digest,
                                   sampler=sampler, n_trials=n_trials, inner_n_trials=inner_trials, gate=gate,
                                   seed=seed, storage=storage, study_name=study, n_jobs=config.n_jobs)
        finally:
            optuna.logging.set_verbosity(verbosity)
        estimate = report.estimate
        tracking.log_new_params({"estimate_repeats": estimate.fold_gain.shape[0],
                                 "estimate_splits": estimate.fold_gain.shape[1]})
        metrics = _metrics(report)
        choice = tracking.CALIBRATED if report.calibrated else tracking.PLAIN
        mlflow.log_metrics(metrics)
        mlflow.set_tag(tracking.CALIBRATION, choice)
        tracking.describe(_description(report, oof, choice))
        _log_artifacts(report, oof, metrics)
    logger.info(f"tune: OOF macro-F1 (levels 1..8) plain blend {report.raw_f1:.4f}, calibrated in-sample "
                f"{report.calibrated_in_sample_f1:.4f}, calibrated estimated {estimate.calibrated_f1:.4f}; "
                f"{report.reason}; tune run {run.info.run_id}")
    return run.info.run_id


def _metrics(report) -> dict[str, float]:
    estimate = report.estimate
    return {tracking.RAW_F1: report.raw_f1, tracking.CALIBRATED_F1: report.calibrated_in_sample_f1,
            tracking.CALIBRATED_ESTIMATED_F1: estimate.calibrated_f1, tracking.ESTIMATED_GAIN: estimate.gain,
            tracking.ESTIMATED_GAIN_STD: estimate.gain_fold_std, tracking.ESTIMATED_F1: report.estimated_f1,
            **{tracking.OOF_LEVEL_F1.format(c): f for c, f in report.per_class_f1.items()}}


def _description(report, oof: OOFBundle, choice: str) -> str:
    return (f"Calibration of {len(oof.run_ids)} member(s) ({', '.join(dict.fromkeys(oof.members))}) on "
            f"{len(oof.ids)} OOF rows. Chosen rule: {choice}. The {report.reason}. The chosen rule's estimated "
            f"macro-F1 (levels 1..8) on unseen rows, which the promote gate compares: {report.estimated_f1:.4f}.")


def _log_artifacts(report, oof: OOFBundle, metrics: dict[str, float]) -> None:
    """ensemble.json (the chosen rule, each member with its backbone and spec), the trials table and the plots."""
    spec = replace(report.spec, metrics=metrics).to_dict()
    for member, backbone, member_spec in zip(spec["members"], oof.backbones, oof.members):
        member.update(backbone=backbone, member=member_spec)  # EnsembleSpec.from_dict keeps run_id and weight only
    with tempfile.TemporaryDirectory() as tmp:
        report.trials_dataframe().to_csv(Path(tmp) / tracking.TRIALS_CSV, index=False)
        mlflow.log_artifact(str(Path(tmp) / tracking.TRIALS_CSV))
    search, rule = report.search, "calibrated rule" if report.calibrated else "plain blend"
    in_sample = report.calibrated_in_sample_f1 if report.calibrated else report.raw_f1
    # Optuna's default PED-ANOVA evaluator: ~2 s for 22,000 trials, so every trial is used.
    figures = {tracking.HISTORY_PLOT: search.plot_history(), tracking.IMPORTANCE_PLOT: search.plot_importances()}
    if interactive_plots():
        figures |= {tracking.HISTORY_HTML: search.plot_history(interactive=True),
                    tracking.IMPORTANCE_HTML: search.plot_importances(interactive=True)}
    figures[tracking.CONFUSION_PLOT] = plot_confusion_matrix(
        oof.y, report.spec.decode_logits(oof.logits),
        title=f"OOF confusion matrix of the {rule} (macro-F1 1..8 = {in_sample:.3f})")
    for path, figure in figures.items():
        tracking.log_figure(figure, path)
    mlflow.log_dict(spec, tracking.ENSEMBLE_JSON)  # last: a tune run with ensemble.json is complete
