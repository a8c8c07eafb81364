"""The model registry and loaded models: registered models and versions, a version's metrics, creating
a complete version, resolving a model URI, loading a model (one-line failures) and the smoke test that
register and promote share."""
from __future__ import annotations

import numpy as np

from psydef.core.secrets import redact_uri
from psydef.tracking.names import registered_model_uri
from psydef.tracking.store import client


def registered_model(name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client().get_registered_model(name)
    except MlflowException as err:
        raise ValueError(f"no registered model {name!r}: register one with "
                         "`psydef register --tune-run RUN_ID`") from err


def model_version(name: str, version: str | int | None):
    """A version of ``name``; ``None`` is the newest."""
    from mlflow.exceptions import MlflowException

    registered_model(name)
    if version is None:
        versions = client().search_model_versions(f"name = '{name}'")
        if not versions:
            raise ValueError(f"registered model {name!r} has no versions: register one with `psydef register`")
        return max(versions, key=lambda v: int(v.version))
    try:
        return client().get_model_version(name, str(version))
    except MlflowException as err:
        raise ValueError(f"registered model {name!r} has no version {version}") from err


def version_metrics(version) -> dict[str, float]:
    """The metrics of a model version's logged model (``register`` logs MODEL_METRICS there), the latest
    value of each; empty for a version registered without one. MLflow 3.17's registry answers leave the
    version's ``model_id`` unset (SQL store and server alike), so it is read from the version's
    ``models:/<model id>`` source."""
    from mlflow.store.artifact.utils.models import _parse_model_uri
    from mlflow.utils.uri import is_models_uri

    model_id = version.model_id
    if model_id is None and version.source and is_models_uri(version.source):
        model_id = _parse_model_uri(version.source).model_id
    if model_id is None:
        return {}
    latest = sorted(client().get_logged_model(model_id).metrics or [], key=lambda m: (m.step, m.timestamp))
    return {metric.key: metric.value for metric in latest}


def create_version(name: str, model, *, tags: dict[str, str], description: str):
    """A new version of registered model ``name`` (created when missing) from the logged model ``model``
    (a ``ModelInfo``), its tags and description (shown on the UI's model and version pages) written by
    the call that creates it, so a register killed at any moment leaves a complete version or none."""
    import json

    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    mlflow_client = client()
    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as err:  # it exists, or another register created it a moment ago
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = mlflow_client.create_model_version(name, model.model_uri, run_id=model.run_id, tags=tags,
                                                 description=redact_uri(description), model_id=model.model_id)
    # The logged model's link to its versions (its UI page lists them): a tracking server writes it,
    # a local store does not; as mlflow.register_model does.
    linked = json.loads(mlflow_client.get_logged_model(model.model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    entry = {"name": name, "version": str(version.version)}
    if entry not in [{k: str(v) for k, v in e.items()} for e in linked]:
        mlflow_client.set_logged_model_tags(model.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*linked, entry])})
    return version


def resolve_model_uri(model_uri: str) -> str:
    """``models:/name@alias``, ``models:/name/version`` (or ``/stage``, ``/latest``) ->
    ``models:/name/version``, the version it points to now, so a run can record exactly what it
    loaded; a clear ``ValueError`` if the model, alias or version does not exist. Other URIs
    (``runs:/...``, paths, ``models:/<logged model id>``) are returned as they are, once they are seen
    to hold a model (an MLmodel file)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import _parse_model_uri, get_model_name_and_version
    from mlflow.utils.uri import is_models_uri

    try:
        parsed = _parse_model_uri(model_uri) if is_models_uri(model_uri) else None
    except MlflowException as err:
        raise ValueError(err.message) from err
    if parsed is None or parsed.name is None:
        try:
            mlflow.models.get_model_info(model_uri)
        except (MlflowException, OSError) as err:
            raise ValueError(f"{redact_uri(model_uri)} does not resolve to a model: {redact_uri(err)}") from err
        return model_uri
    name, alias = parsed.name, parsed.alias
    if parsed.version is not None:  # MLflow's resolver does not check that the version exists
        return registered_model_uri(name, version=model_version(name, parsed.version).version)
    aliases = registered_model(name).aliases
    if alias is not None and alias not in aliases:
        raise ValueError(f"{model_uri} does not exist: model {name!r} has no alias {alias!r} (its aliases: "
                         f"{sorted(aliases) or 'none'}); promote a version with `psydef promote`")
    try:
        _, version = get_model_name_and_version(client(), model_uri)
    except MlflowException as err:
        wanted = f"in stage {parsed.stage!r}" if parsed.stage else "at all"
        raise ValueError(f"{model_uri} does not exist: registered model {name!r} has no version {wanted}") from err
    return registered_model_uri(name, version=version)




def load_model(model_uri: str):
    """``mlflow.pyfunc.load_model``, failures as a one-line ``ValueError`` naming ``model_uri``."""
    import mlflow

    try:
        return mlflow.pyfunc.load_model(model_uri)
    except Exception as err:  # whatever breaks loading: a broken file, a missing package, ...
        raise ValueError(f"{redact_uri(model_uri)} failed to load: {_one_line(err)}") from err


def _one_line(err: BaseException) -> str:
    text = redact_uri(" ".join(str(err).split()))
    return f"{type(err).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def smoke_test(model_uri: str) -> None:
    """Load the model and predict the built-in example; any failure means it cannot serve (a
    ``ValueError`` naming the URI)."""
    from psydef.core.data import example_input
    from psydef.core.labels import PROB_COLUMNS

    example = example_input()
    model = load_model(model_uri)
    try:
        out = model.predict(example)
    except Exception as err:  # whatever breaks predicting, the model is not servable
        raise ValueError(f"{redact_uri(model_uri)} failed to predict on the built-in example: "
                         f"{_one_line(err)}") from err
    if list(out["id"]) != list(example["id"]) or not np.allclose(out[list(PROB_COLUMNS)].sum(axis=1), 1.0):
        raise ValueError(f"{redact_uri(model_uri)} answered the built-in example with an invalid prediction:\n{out}")
