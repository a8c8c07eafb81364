"""The ``register`` stage: a tune run's ensemble as a new version of ``psydef-ensemble``.

The ensemble (a pyfunc logged by a ``register`` run, see :mod:`psydef.ensemble`) carries every member's
fold adapters and the calibration; the version's tags carry its lineage and its tune metrics."""
from __future__ import annotations

import tempfile
from pathlib import Path

from psydef import tracking
from psydef.calibration.rule import EnsembleSpec


def _load_spec(tune_run_id: str) -> EnsembleSpec:
    from mlflow.exceptions import MlflowException

    try:
        return EnsembleSpec.from_dict(tracking.load_json(tune_run_id, tracking.ENSEMBLE_JSON))
    except (MlflowException, OSError) as err:
        raise ValueError(f"tune run {tune_run_id} has no {tracking.ENSEMBLE_JSON}: it did not finish; "
                         "run tune again and register its run") from err


def _member_folds(run) -> list:
    """The complete fold runs of a member (a train run), in fold order; every fold of its prepare
    run's split must be there."""
    run_id = run.info.run_id
    prepare = tracking.get_run(run.data.tags.get(tracking.PREPARE_RUN_ID, ""), what=f"prepare run of train run {run_id}")
    n_splits = int(prepare.data.params["n_splits"])
    folds = tracking.fold_runs(run_id)
    missing = sorted(set(range(n_splits)) - set(folds))
    if missing:
        raise ValueError(f"train run {run_id} has no complete fold run for folds {missing} (of {n_splits}); "
                         "finish its training (train -P resume=true) before registering")
    return [folds[k] for k in range(n_splits)]


def _download_adapter(fold_run, member_run_id: str, dst: Path) -> str:
    import mlflow

    fold_run_id = fold_run.info.run_id
    if not tracking.client().list_artifacts(fold_run_id, tracking.ADAPTER_DIR):
        raise ValueError(f"fold run {fold_run_id} (fold {fold_run.data.tags.get(tracking.FOLD)} of train run "
                         f"{member_run_id}) has no {tracking.ADAPTER_DIR}/ artifact; train that fold again")
    return mlflow.artifacts.download_artifacts(run_id=fold_run_id, artifact_path=tracking.ADAPTER_DIR,
                                               dst_path=str(dst))


def _one(values: set, what: str, spec: EnsembleSpec) -> str:
    if len(values) != 1:
        raise ValueError(f"the members {spec.run_ids} disagree on {what}: {sorted(map(str, values))}")
    return values.pop()


def register(tune_run_id: str, *, name: str = tracking.MODEL_NAME):
    """Log the ensemble of a tune run as a pyfunc (in a ``register`` run) and register it as a new
    version of ``name``; returns the ``ModelVersion``."""
    import mlflow

    tune = tracking.get_run(tune_run_id, tracking.TUNE)
    spec = _load_spec(tune_run_id)
    missing = [m for m in (tracking.ESTIMATED_F1, tracking.CALIBRATED_F1) if m not in tune.data.metrics]
    if missing:
        raise ValueError(f"tune run {tune_run_id} has no metric(s) {missing}: it did not finish; run tune again")
    members = [tracking.get_run(run_id, tracking.TRAIN, what="ensemble member (train run)") for run_id in spec.run_ids]
    tags = {
        tracking.V_TUNE_RUN_ID: tune_run_id,
        tracking.V_TRAIN_RUN_IDS: ",".join(spec.run_ids),
        tracking.V_DATA_DIGEST: _one({m.data.tags.get(tracking.DATA_DIGEST) for m in members}, "the data digest", spec),
        tracking.V_BACKBONE: ",".join(dict.fromkeys(m.data.tags.get(tracking.BACKBONE, "?") for m in members)),
        # repr: the promote gate compares exactly the numbers tune logged
        **{metric: repr(tune.data.metrics[metric]) for metric in (tracking.ESTIMATED_F1, tracking.CALIBRATED_F1)},
    }
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dirs = [[_download_adapter(fold, member.info.run_id, Path(tmp) / f"member_{i}" / f"fold_{k}")
                         for k, fold in enumerate(_member_folds(member))]
                        for i, member in enumerate(members)]
        with tracking.stage_run(tracking.REGISTER, f"register {name}", {tracking.V_TUNE_RUN_ID: tune_run_id}) as run:
            from psydef.ensemble import log_ensemble_model

            tracking.log_new_params({"tune_run_id": tune_run_id, "name": name, "n_members": len(spec.members),
                                     "n_adapters": sum(map(len, adapter_dirs))})
            info = log_ensemble_model(spec, adapter_dirs)
            version = mlflow.register_model(info.model_uri, name, tags=tags)
    print(f"register: {name} version {version.version} from tune run {tune_run_id} "
          f"({tracking.ESTIMATED_F1} {tags[tracking.ESTIMATED_F1]}); register run {run.info.run_id}")
    return version
