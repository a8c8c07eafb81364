"""The ``register`` stage: a tune run's ensemble as a new version of ``psydef-ensemble``.

The ensemble (a pyfunc logged by a ``register`` run, see :mod:`psydef.ensemble`) carries every member's
fold adapters and the calibration, and the tune metrics (``tracking.MODEL_METRICS``: the experiment's Models
tab filters logged models by them, ``promote`` gates on them); the version's tags carry its lineage. The
logged model must load and predict (the smoke test ``promote`` runs too) before a version is created:
a version that cannot serve is never registered."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from psydef import tracking
from psydef.calibration.rule import EnsembleSpec
from psydef.stages.config import RegisterConfig

logger = logging.getLogger(__name__)


def _load_spec(tune_run_id: str) -> EnsembleSpec:
    """The tune run's ensemble.json; a one-line ValueError naming the run, the file and the field at fault."""
    import json

    import mlflow
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=tune_run_id, artifact_path=tracking.ENSEMBLE_JSON,
                                                        dst_path=tmp)
        except (MlflowException, OSError) as err:
            raise ValueError(f"tune run {tune_run_id} has no {tracking.ENSEMBLE_JSON}: it did not finish; "
                             "run tune again and register its run") from err
        text = Path(local).read_text(errors="replace")
    where, again = f"tune run {tune_run_id}: its {tracking.ENSEMBLE_JSON}", "run tune again and register its new run"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON ({err}; cut short?); {again}") from err
    try:
        return EnsembleSpec.from_dict(data)
    except ValueError as err:
        raise ValueError(f"{where} is not a valid ensemble: {err}; {again}") from err


def _download_adapter(fold_run, member_run_id: str, dst: Path) -> str:
    import mlflow

    fold_run_id = fold_run.info.run_id
    if not tracking.client().list_artifacts(fold_run_id, tracking.ADAPTER_DIR):
        raise ValueError(f"fold run {fold_run_id} (fold {fold_run.data.tags.get(tracking.FOLD)} of train run "
                         f"{member_run_id}) has no {tracking.ADAPTER_DIR}/ artifact; train that fold again")
    return mlflow.artifacts.download_artifacts(run_id=fold_run_id, artifact_path=tracking.ADAPTER_DIR,
                                               dst_path=str(dst))


def _broken_file(adapter_dir: Path) -> str:
    """The first file of an adapter folder that does not parse (safetensors, JSON), else the folder."""
    import json

    from safetensors import safe_open

    for path in sorted(Path(adapter_dir).rglob("*")):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="numpy") as f:
                    for key in f.keys():
                        f.get_tensor(key)
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception as err:  # noqa: BLE001 - the message names whatever is wrong with the file
            return f"{tracking.ADAPTER_DIR}/{path.relative_to(adapter_dir)} ({type(err).__name__}: {err})"
    return f"{tracking.ADAPTER_DIR}/"


def _diagnose(adapter_dirs, members, folds_of) -> str:
    """Which fold run's adapter breaks the model, and which of its files: each adapter is loaded and
    predicts the built-in example on its own."""
    from psydef.backbones import load_adapter
    from psydef.core.data import example_input, input_table

    rows = input_table(example_input())
    for member, dirs, folds in zip(members, adapter_dirs, folds_of):
        for fold, adapter_dir in zip(folds, dirs):
            try:
                load_adapter(adapter_dir).predict_logits(rows)
            except Exception:  # noqa: BLE001 - found the culprit; its file is named below
                return (f"fold run {fold.info.run_id} (fold {fold.data.tags.get(tracking.FOLD)} of train run "
                        f"{member.info.run_id}): {_broken_file(Path(adapter_dir))}; train that fold again")
    return "every adapter loads on its own"


def _one(values: set, what: str, spec: EnsembleSpec) -> str:
    if len(values) != 1:
        raise ValueError(f"the members {spec.run_ids} disagree on {what}: {sorted(map(str, values))}")
    return values.pop()


def _description(spec: EnsembleSpec, members: list, tags: dict, metrics: dict, n_adapters: int, choice: str) -> str:
    """What a version is, in one paragraph: members, backbone, decision rule (tune's choice), scores."""
    rule = (f"calibrated rule (tune estimated a positive gain on unseen rows): per-level biases delta, level-7 gate "
            f"tau7 {'off' if spec.tau7 is None else f'{spec.tau7:.3f}'}" if choice == tracking.CALIBRATED else
            "plain blend (tune estimated no gain from calibrating on unseen rows): equal weights, plain argmax")
    listed = ", ".join(f"{m.info.run_id} ({tracking.member_of(m)}, seed {m.data.tags.get(tracking.SEED)}, weight "
                       f"{w:.3f})" for m, w in zip(members, spec.weights))
    return (f"Ensemble of {len(members)} member(s), backbone {tags[tracking.V_BACKBONE]}: {listed}; {n_adapters} fold "
            f"adapters. {rule[0].upper() + rule[1:]}, tuned in tune run {tags[tracking.V_TUNE_RUN_ID]}. OOF macro-F1 "
            f"(levels 1..8): estimated on unseen rows {metrics[tracking.GATE_METRIC]:.4f}, which the promote gate "
            f"compares; calibrated rule in-sample (optimistic) "
            f"{metrics[tracking.CALIBRATED_F1]:.4f}. Data digest {tags[tracking.V_DATA_DIGEST]}.")


def run_register(config: RegisterConfig):
    """Log the ensemble of tune run ``config.tune_run`` as a pyfunc (in a ``register`` run) and
    register it as a new version of ``config.name``; returns the ``ModelVersion``."""
    import mlflow

    from psydef.core.data import InputLimits

    tune_run_id, name = config.tune_run, config.name
    InputLimits.from_env()  # the limits the smoke test's model loads with: a bad one is the setting's fault
    tune = tracking.get_run(tune_run_id, tracking.TUNE)
    spec = _load_spec(tune_run_id)
    missing = [m for m in (tracking.ESTIMATED_F1, tracking.CALIBRATED_F1) if m not in tune.data.metrics]
    if missing:
        raise ValueError(f"tune run {tune_run_id} has no metric(s) {missing}: it did not finish; run tune again")
    metrics = {metric: tune.data.metrics[metric] for metric in tracking.MODEL_METRICS if metric in tune.data.metrics}
    members = [tracking.get_run(run_id, tracking.TRAIN, what="ensemble member (train run)") for run_id in spec.run_ids]
    tags = {
        tracking.V_TUNE_RUN_ID: tune_run_id,
        tracking.V_TRAIN_RUN_IDS: ",".join(spec.run_ids),
        tracking.V_DATA_DIGEST: _one({m.data.tags.get(tracking.DATA_DIGEST) for m in members}, "the data digest", spec),
        tracking.V_BACKBONE: ",".join(dict.fromkeys(m.data.tags.get(tracking.BACKBONE, "?") for m in members)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        folds_of = [tracking.complete_fold_runs(member) for member in members]
        adapter_dirs = [[_download_adapter(fold, member.info.run_id, Path(tmp) / f"member_{i}" / f"fold_{k}")
                         for k, fold in enumerate(folds)]
                        for i, (member, folds) in enumerate(zip(members, folds_of))]
        with tracking.stage_run(tracking.REGISTER, f"register {name}", {tracking.V_TUNE_RUN_ID: tune_run_id}) as run:
            from psydef.ensemble import log_ensemble_model

            tracking.log_new_params({**config.params(), "n_members": len(spec.members),
                                     "n_adapters": sum(map(len, adapter_dirs))})
            info = log_ensemble_model(spec, adapter_dirs)
            try:
                tracking.smoke_test(info.model_uri)
            except ValueError as err:
                from mlflow.entities import LoggedModelStatus

                tracking.client().finalize_logged_model(info.model_id, LoggedModelStatus.FAILED)
                raise ValueError(f"register: no version created: {err}; at fault: "
                                 f"{_diagnose(adapter_dirs, members, folds_of)}") from err
            mlflow.log_metrics(metrics, model_id=info.model_id)  # on the register run and on its logged model
            choice = tune.data.tags.get(tracking.CALIBRATION) or (
                tracking.CALIBRATED if any(spec.delta) or spec.tau7 is not None else tracking.PLAIN)
            text = _description(spec, members, tags, metrics, sum(map(len, adapter_dirs)), choice)
            version = tracking.create_version(name, info, tags=tags, description=text)
            tracking.describe(f"Version {version.version} of {name}: {text}")
    logger.info(f"register: {name} version {version.version} from tune run {tune_run_id} "
                f"({tracking.GATE_METRIC} {metrics[tracking.GATE_METRIC]:.6g}); register run {run.info.run_id}")
    return version
