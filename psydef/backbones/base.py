"""The one interface every backbone implements: fit on a fold's training rows, logits for any rows,
save/load its adapter (a self-contained folder, loadable on its own). A process that holds several
adapters (an ensemble: members x folds) loads them together with :func:`load_adapters`, so a backbone
whose adapters sit on one frozen base model (the LLM) loads that base once."""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

# Called once per epoch by ``fit``: (epoch starting at 1, mean training loss, logits of the
# ``valid`` rows or None). Used for reporting only: no checkpoint is chosen on it.
EpochCallback = Callable[[int, float, "np.ndarray | None"], None]

CONFIG_FILE = "backbone.json"


@dataclass(frozen=True)
class Checkpoint:
    """Where ``fit`` keeps its training state between epochs: a fit given one whose ``folder`` holds
    a saved state continues from it; after each save ``on_save(epoch)`` is called (the train stage
    logs the folder to the fold run). ``origin`` names where the saved state came from, for messages."""
    folder: Path
    on_save: Callable[[int], None] = lambda epoch: None
    origin: str = ""


class Backbone(ABC):
    """A trainable classifier over rows of the data table (columns ``id``, ``dialogue``,
    ``current_text`` and, for training, ``label``) with 9 output logits."""

    name: str

    @abstractmethod
    def fit(self, train: pd.DataFrame, *, seed: int, valid: pd.DataFrame | None = None,
            on_epoch: EpochCallback | None = None, checkpoint: Checkpoint | None = None) -> "Backbone":
        """Train on ``train`` (real and augmented rows). ``valid`` is only scored for reporting. A
        backbone that trains for several epochs saves its state in ``checkpoint`` and resumes from it."""

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

    @classmethod
    def load_many(cls, folders: Sequence[Path], configs: Sequence[dict]) -> list["Backbone"]:
        """Trained backbones of this class from adapter folders and their saved configs, in order.
        This default loads each folder on its own; a backbone whose adapters share a base model
        overrides it to load the base once and attach every adapter to it."""
        backbones = []
        for folder, config in zip(folders, configs, strict=True):
            backbone = cls(**config)
            backbone._load_weights(Path(folder))
            backbones.append(backbone)
        return backbones


def _read_meta(path: Path) -> dict:
    meta_file = path / CONFIG_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a psydef adapter folder: {CONFIG_FILE} is missing")
    return json.loads(meta_file.read_text())


def folder_digest(path: Path) -> str:
    """sha256 over every file of a folder (relative path and bytes): equal for byte-identical adapters
    (``register`` logs those once)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_adapters(paths: Sequence[str | Path]) -> list[Backbone]:
    """Rebuild trained backbones from adapter folders written by ``Backbone.save``, in the order given.
    The folders of each backbone class are loaded in one ``load_many`` call (one shared base model
    for the LLM's fold adapters)."""
    from psydef.backbones import backbone_class

    paths = [Path(p) for p in paths]
    metas = [_read_meta(p) for p in paths]
    by_name: dict[str, list[int]] = {}
    for i, meta in enumerate(metas):
        by_name.setdefault(meta["backbone"], []).append(i)
    loaded: list[Backbone | None] = [None] * len(paths)
    for name, index in by_name.items():
        backbones = backbone_class(name).load_many([paths[i] for i in index], [metas[i]["config"] for i in index])
        for i, backbone in zip(index, backbones, strict=True):
            loaded[i] = backbone
    return loaded


def load_adapter(path: str | Path) -> Backbone:
    """Rebuild a trained backbone from one adapter folder written by ``Backbone.save``."""
    return load_adapters([path])[0]
