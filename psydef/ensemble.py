"""The calibrated ensemble as an MLflow pyfunc model, logged as code (models-from-code).

This file is the model: :func:`log_ensemble_model` logs it with ``python_model=<this file>``, and
MLflow runs it again wherever the model is loaded; its last line hands MLflow the model object.
Nothing is pickled. The model carries:

* ``model_config``: ``{"ensemble": EnsembleSpec.to_dict(), "adapters": [[artifact key, ...] per
  member]}``; YAML (the MLmodel file) round-trips Python floats exactly, so the weights, ``delta``
  and ``tau7`` are those tune wrote;
* ``artifacts``: the members' fold adapter folders (``Backbone.save``), one key per distinct folder:
  byte-identical folders (one training listed in two members) are logged once, under
  the key of the first, and every member that has one names that key;
* ``code_paths``: the ``psydef`` package as it was when the model was logged.

A member's prediction is the mean over its fold adapters of softmax(fold logits)
(:func:`psydef.calibration.rule.fold_mean_probs`); the decision rule is :mod:`psydef.calibration.rule`'s:
:meth:`EnsembleSpec.blend_probs` gives the blended probabilities and :meth:`EnsembleSpec.decode_probs`
the labels. Every distinct fold adapter is loaded once, all in one :func:`psydef.backbones.load_adapters`
call (the LLM's ten fold adapters share one base model), and predicts once per request.
"""
from __future__ import annotations

import warnings
from importlib.metadata import requires, version
from pathlib import Path
from typing import Sequence

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import AnyType, ColSpec, Schema
from packaging.requirements import Requirement
from packaging.version import Version

from psydef import tracking
from psydef.backbones import load_adapters
from psydef.backbones.base import folder_digest
from psydef.calibration.rule import EnsembleSpec, fold_mean_probs
from psydef.core.data import DataError, InputLimits, input_table
from psydef.core.labels import PROB_COLUMNS

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "id"), ColSpec(AnyType(), "dialogue"), ColSpec("string", "current_text")]),
    outputs=Schema([ColSpec("string", "id"), ColSpec("long", "label"),
                    *(ColSpec("double", column) for column in PROB_COLUMNS)]),
)


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """Rows ``id, dialogue, current_text`` -> ``id, label, prob_0..prob_8`` (calibrated blend)."""

    def load_context(self, context):
        # Read once, here: a bad PSYDEF_MAX_* stops the model server from starting (one line naming the
        # variable) rather than turning every request into an HTTP 400 that blames the client.
        self.limits = InputLimits.from_env()
        config = context.model_config
        self.spec = EnsembleSpec.from_dict(config["ensemble"])
        keys = list(dict.fromkeys(key for member in config["adapters"] for key in member))
        adapter_of = dict(zip(keys, load_adapters([context.artifacts[key] for key in keys]), strict=True))
        self.members = [[adapter_of[key] for key in member] for member in config["adapters"]]

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        try:
            rows = input_table(model_input, self.limits)
        except DataError as err:  # an MlflowException is what the scoring server answers with a 400
            raise MlflowException.invalid_parameter_value(str(err)) from err
        logits: dict[int, np.ndarray] = {}  # one prediction per adapter object (members may share one)

        def fold_logits(adapter) -> np.ndarray:
            if id(adapter) not in logits:
                logits[id(adapter)] = adapter.predict_logits(rows)
            return logits[id(adapter)]

        probs = [fold_mean_probs([fold_logits(adapter) for adapter in folds]) for folds in self.members]
        out = pd.DataFrame(self.spec.blend_probs(probs), columns=list(PROB_COLUMNS))
        out.insert(0, "label", self.spec.decode_probs(probs))
        out.insert(0, "id", rows["id"].to_numpy())
        return out


def _pip_requirements() -> list[str]:
    """psydef's own runtime dependencies, pinned to the installed versions (without local labels such
    as ``+cpu``, which PyPI does not serve). Given explicitly, so MLflow does not load the model in a
    subprocess to infer them; psydef itself travels in ``code_paths``."""
    reqs = [Requirement(line) for line in requires("psydef")]
    # A marker means an extra (dev, postgres): not needed to serve.
    return [f"{req.name}=={Version(version(req.name)).public}" for req in reqs if req.marker is None]


def log_ensemble_model(spec: EnsembleSpec, member_adapter_dirs: Sequence[Sequence[str | Path]], *,
                       name: str = tracking.MODEL_ARTIFACT):
    """Log the ensemble in the active run; returns MLflow's ``ModelInfo``.

    ``member_adapter_dirs[i]`` are the fold adapter folders of ``spec.members[i]``; byte-identical folders
    are logged once (see the module docstring). No input example is
    logged: MLflow would load the whole ensemble to check it (and only warn when that fails), where
    ``register`` already loads it once for its smoke test, which fails loudly."""
    if len(member_adapter_dirs) != len(spec.members):
        raise ValueError(f"{len(member_adapter_dirs)} lists of adapter folders for {len(spec.members)} members "
                         f"({spec.run_ids}); give one list per member, in the spec's order")
    artifacts, adapters, key_of_digest = {}, [], {}
    for i, dirs in enumerate(member_adapter_dirs):
        if not dirs:
            raise ValueError(f"member {i} (run {spec.run_ids[i]}) has no fold adapter folders")
        keys = [key_of_digest.setdefault(folder_digest(Path(folder)), f"member_{i}_fold_{k}")
                for k, folder in enumerate(dirs)]
        for key, folder in zip(keys, dirs):
            artifacts.setdefault(key, str(folder))
        adapters.append(keys)
    with warnings.catch_warnings():  # MLflow's advice to log an input example: left out on purpose (above)
        warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
        return mlflow.pyfunc.log_model(
            name=name, python_model=__file__, artifacts=artifacts,
            model_config={"ensemble": spec.to_dict(), "adapters": adapters},
            code_paths=[str(Path(__file__).parent)], pip_requirements=_pip_requirements(),
            signature=SIGNATURE)


mlflow.models.set_model(EnsembleModel())
