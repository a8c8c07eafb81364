"""The model registry: register a tuned ensemble, promote a version to production, resolve model URIs.

``register`` turns a tune run into a version of ``psydef-ensemble`` (a pyfunc logged by a
``register`` run, see :mod:`psydef.ensemble`) whose tags carry its lineage and its tune metrics.
``promote`` moves the alias ``production`` to a version once the version has loaded and predicted,
and only if its honest (nested) OOF macro-F1 is not below the current champion's; the champion it
replaces gets the alias ``previous``. Every check comes before the registry is changed, so a failure
leaves ``production`` where it was.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np

from psydef import tracking
from psydef.calibrate import EnsembleSpec

# models:/<name>@<alias> or models:/<name>/<version>
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


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
    from psydef.trainer import fold_runs

    run_id = run.info.run_id
    prepare = tracking.get_run(run.data.tags.get(tracking.PREPARE_RUN_ID, ""), what=f"prepare run of train run {run_id}")
    n_splits = int(prepare.data.params["n_splits"])
    folds = fold_runs(run_id)
    missing = sorted(set(range(n_splits)) - set(folds))
    if missing:
        raise ValueError(f"train run {run_id} has no complete fold run for folds {missing} (of {n_splits}); "
                         "finish its training (train -P resume=true) before registering")
    return [folds[k] for k in range(n_splits)]


def _download_adapter(fold_run, member_run_id: str, dst: Path) -> str:
    import mlflow

    fold_run_id = fold_run.info.run_id
    if not _client().list_artifacts(fold_run_id, tracking.ADAPTER_DIR):
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
    missing = [m for m in (tracking.NESTED_F1, tracking.CALIBRATED_F1) if m not in tune.data.metrics]
    if missing:
        raise ValueError(f"tune run {tune_run_id} has no metric(s) {missing}: it did not finish; run tune again")
    members = [tracking.get_run(run_id, tracking.TRAIN, what="ensemble member (train run)") for run_id in spec.run_ids]
    tags = {
        tracking.V_TUNE_RUN_ID: tune_run_id,
        tracking.V_TRAIN_RUN_IDS: ",".join(spec.run_ids),
        tracking.V_DATA_DIGEST: _one({m.data.tags.get(tracking.DATA_DIGEST) for m in members}, "the data digest", spec),
        tracking.V_BACKBONE: ",".join(dict.fromkeys(m.data.tags.get(tracking.BACKBONE, "?") for m in members)),
        # repr: the promote gate compares exactly the numbers tune logged
        **{metric: repr(tune.data.metrics[metric]) for metric in (tracking.NESTED_F1, tracking.CALIBRATED_F1)},
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
          f"({tracking.NESTED_F1} {tags[tracking.NESTED_F1]}); register run {run.info.run_id}")
    return version


def _registered_model(name: str):
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_registered_model(name)
    except MlflowException as err:
        raise ValueError(f"no registered model {name!r}: register one with "
                         "`psydef register --tune-run RUN_ID`") from err


def _version(name: str, version: str | int | None):
    """A version of ``name``; ``None`` is the newest."""
    from mlflow.exceptions import MlflowException

    _registered_model(name)
    if version is None:
        versions = _client().search_model_versions(f"name = '{name}'")
        if not versions:
            raise ValueError(f"registered model {name!r} has no versions: register one with `psydef register`")
        return max(versions, key=lambda v: int(v.version))
    try:
        return _client().get_model_version(name, str(version))
    except MlflowException as err:
        raise ValueError(f"registered model {name!r} has no version {version}") from err


def resolve(model_uri: str) -> str:
    """``models:/name@alias`` or ``models:/name/version`` -> ``models:/name/version``, the version it
    points to now, so a run can record exactly what it loaded; a clear ``ValueError`` if the model,
    alias or version does not exist. Other URIs (``runs:/...``, paths) are returned as they are, once
    they are seen to hold a model (an MLmodel file)."""
    match = _REGISTRY_URI.match(model_uri)
    if not match:
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            mlflow.models.get_model_info(model_uri)
        except (MlflowException, OSError) as err:
            raise ValueError(f"{model_uri} does not resolve to a model: {err}") from err
        return model_uri
    name, alias = match["name"], match["alias"]
    if alias is None:
        return f"models:/{name}/{_version(name, match['version']).version}"
    aliases = _registered_model(name).aliases
    if alias not in aliases:
        raise ValueError(f"{model_uri} does not exist: model {name!r} has no alias {alias!r} (its aliases: "
                         f"{sorted(aliases) or 'none'}); promote a version with `psydef promote`")
    return f"models:/{name}/{aliases[alias]}"


def _smoke_test(model_uri: str) -> None:
    """Load the model and predict on the built-in example; any failure means it cannot serve."""
    import mlflow

    from psydef.ensemble import PROB_COLUMNS, example_input

    example = example_input()
    try:
        out = mlflow.pyfunc.load_model(model_uri).predict(example)
    except Exception as err:  # whatever breaks loading or predicting, the version is not promotable
        raise ValueError(f"{model_uri} failed to load or to predict on the built-in example: {err}") from err
    if list(out["id"]) != list(example["id"]) or not np.allclose(out[list(PROB_COLUMNS)].sum(axis=1), 1.0):
        raise ValueError(f"{model_uri} answered the built-in example with an invalid prediction:\n{out}")


class PromotionRefused(ValueError):
    """The champion/challenger gate kept the current production version."""


def _gate_metric(version) -> float:
    value = version.tags.get(tracking.NESTED_F1)
    if value is None:
        raise ValueError(f"version {version.version} of {version.name!r} has no tag {tracking.NESTED_F1}, which "
                         "the promote gate compares; register it with `psydef register`, or pass --force")
    return float(value)


def promote(version: str | int | None = None, *, name: str = tracking.MODEL_NAME, force: bool = False,
            legacy_stage: bool = False):
    """Point the alias ``production`` at ``version`` (default: the newest) once it has loaded and
    predicted on the built-in example, and unless its ``oof_macro_f1_nested`` is below the current
    champion's (``force`` skips that gate). The replaced champion gets the alias ``previous``;
    ``legacy_stage`` also moves the version to the deprecated stage ``Production``. Returns the
    promoted ``ModelVersion``."""
    import mlflow

    client = _client()
    candidate = _version(name, version)
    # MLflow returns version numbers as int here and str there: compare them as str
    number = str(candidate.version)
    champion = _registered_model(name).aliases.get(tracking.PRODUCTION)
    champion = None if champion is None else str(champion)
    with tracking.stage_run(tracking.PROMOTE, f"promote {name} v{number}"):
        tracking.log_new_params({"version": version or "", "name": name, "force": force,
                                 "legacy_stage": legacy_stage, "promoted_version": number,
                                 "champion_version": champion or ""})
        _smoke_test(f"models:/{name}/{number}")
        moves = champion != number
        if moves and champion is not None and not force:
            new, old = _gate_metric(candidate), _gate_metric(client.get_model_version(name, champion))
            mlflow.log_metrics({f"challenger_{tracking.NESTED_F1}": new, f"champion_{tracking.NESTED_F1}": old})
            if new < old:
                raise PromotionRefused(f"version {number} has {tracking.NESTED_F1} {new:.6g}, below {old:.6g} of "
                                       f"production version {champion}: not promoted (pass --force to promote "
                                       "it anyway)")
        if legacy_stage:
            client.transition_model_version_stage(name, number, tracking.LEGACY_STAGE,
                                                  archive_existing_versions=True)
        if moves:
            if champion is not None:
                client.set_registered_model_alias(name, tracking.PREVIOUS, champion)
            client.set_registered_model_alias(name, tracking.PRODUCTION, number)
    print(f"promote: {name} version {number} is {tracking.PRODUCTION}"
          + (f" (was version {champion}, now {tracking.PREVIOUS})" if moves and champion else "")
          + ("" if moves else " already"))
    return client.get_model_version(name, number)
