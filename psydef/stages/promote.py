"""The ``promote`` stage: move the alias ``production`` to a version once the version has loaded and
predicted, and only if its estimated OOF macro-F1 on unseen rows is not below the current champion's; the
champion it replaces gets the alias ``previous``. Every check comes before the registry is changed, so a failure
leaves ``production`` where it was.
"""
from __future__ import annotations

import numpy as np

from psydef import tracking


def _smoke_test(model_uri: str) -> None:
    """Load the model and predict on the built-in example; any failure means it cannot serve."""
    import mlflow

    from psydef.core.data import example_input
    from psydef.core.labels import PROB_COLUMNS

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
    value = version.tags.get(tracking.ESTIMATED_F1)
    if value is None:
        raise ValueError(f"version {version.version} of {version.name!r} has no tag {tracking.ESTIMATED_F1}, which "
                         "the promote gate compares; register it with `psydef register`, or pass --force")
    return float(value)


def promote(version: str | int | None = None, *, name: str = tracking.MODEL_NAME, force: bool = False,
            legacy_stage: bool = False):
    """Point the alias ``production`` at ``version`` (default: the newest) once it has loaded and
    predicted on the built-in example, and unless its ``oof_macro_f1_estimated`` is below the current
    champion's (``force`` skips that gate). The replaced champion gets the alias ``previous``;
    ``legacy_stage`` also moves the version to the deprecated stage ``Production``. Returns the
    promoted ``ModelVersion``."""
    import mlflow

    client = tracking.client()
    candidate = tracking.model_version(name, version)
    # MLflow returns version numbers as int here and str there: compare them as str
    number = str(candidate.version)
    champion = tracking.registered_model(name).aliases.get(tracking.PRODUCTION)
    champion = None if champion is None else str(champion)
    with tracking.stage_run(tracking.PROMOTE, f"promote {name} v{number}"):
        tracking.log_new_params({"version": version or "", "name": name, "force": force,
                                 "legacy_stage": legacy_stage, "promoted_version": number,
                                 "champion_version": champion or ""})
        _smoke_test(f"models:/{name}/{number}")
        moves = champion != number
        if moves and champion is not None and not force:
            new, old = _gate_metric(candidate), _gate_metric(client.get_model_version(name, champion))
            mlflow.log_metrics({f"challenger_{tracking.ESTIMATED_F1}": new, f"champion_{tracking.ESTIMATED_F1}": old})
            if new < old:
                raise PromotionRefused(f"version {number} has {tracking.ESTIMATED_F1} {new:.6g}, below {old:.6g} of "
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
