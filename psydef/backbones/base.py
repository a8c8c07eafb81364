"""The one interface every backbone implements: fit on a fold's training rows, logits for any rows,
save/load its adapter (a self-contained folder, loadable on its own)."""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

# Called once per epoch by ``fit``: (epoch starting at 1, mean training loss, logits of the
# ``valid`` rows or None). Used for reporting only: no checkpoint is chosen on it.
EpochCallback = Callable[[int, float, "np.ndarray | None"], None]

CONFIG_FILE = "backbone.json"


class Backbone(ABC):
    """A trainable classifier over rows of the data table (columns ``id``, ``dialogue``,
    ``current_text`` and, for training, ``label``) with 9 output logits."""

    name: str

    @abstractmethod
    def fit(self, train: pd.DataFrame, *, seed: int, valid: pd.DataFrame | None = None,
            on_epoch: EpochCallback | None = None) -> "Backbone":
        """Train on ``train`` (real and augmented rows). ``valid`` is only scored for reporting."""

    @abstractmethod
    def predict_logits(self, rows: pd.DataFrame) -> np.ndarray:
        """float32 array of shape (len(rows), 9)."""

    def warm_up(self, rows: pd.DataFrame) -> None:
        """Precompute per-row work for every row this process will see (training, validation and
        test rows), so that results do not depend on which folds run in the process. Optional."""

    @abstractmethod
    def config(self) -> dict:
        """JSON-serialisable hyper-parameters; ``cls(**config())`` rebuilds an untrained twin."""

    @abstractmethod
    def _save_weights(self, path: Path) -> None: ...

    @abstractmethod
    def _load_weights(self, path: Path) -> None: ...

    def save(self, path: str | Path) -> Path:
        """Write the adapter folder: ``backbone.json`` (name + config) and the trained weights."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps({"backbone": self.name, "config": self.config()}, indent=2))
        self._save_weights(path)
        return path


def load_adapter(path: str | Path) -> Backbone:
    """Rebuild a trained backbone from an adapter folder written by ``Backbone.save``."""
    from psydef.backbones import backbone_class

    path = Path(path)
    meta_file = path / CONFIG_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a psydef adapter folder: {CONFIG_FILE} is missing")
    meta = json.loads(meta_file.read_text())
    backbone = backbone_class(meta["backbone"])(**meta["config"])
    backbone._load_weights(path)
    return backbone
