"""The CPU default: class-weighted logistic regression on lexical and frozen-MiniLM views of a row.

Views (each row is one target seeker utterance in its dialogue):

* ``target``: word (1-2 gram) and character (2-5 gram) TF-IDF of the target utterance;
* ``context``: word (1-2 gram) TF-IDF of the last ``context_turns`` turns before the target, every word
  tagged with its speaker (``seeker_...`` / ``supporter_...``);
* ``history``: word (1-2 gram) TF-IDF of every earlier seeker turn of the dialogue (what this seeker has
  said so far);
* two length columns, part of ``target``: how many turns the dialogue has reached and how many words the
  target has (log-scaled, times ``length_weight``; phatic level-0 turns are short, and so on);
* ``embed``: frozen sentence embeddings (:mod:`psydef.backbones.encoder`: all-MiniLM-L6-v2, or
  all-mpnet-base-v2 with ``encoder="mpnet"``) of the target (``max_length`` tokens) and, when their lengths
  are > 0, of the previous turn (``previous_max_length``) and of the context turns (``context_max_length``).

``combine="stack"`` fits one ``LogisticRegression`` on all views side by side (the embedding block
scaled by ``dense_weight``); ``combine="vote"`` fits one per view and averages their probabilities.
Bagging (``n_bags`` voters per view group, each fitted on ``row_subsample`` of every level's rows and
``feature_subsample`` of the columns, drawn by the training seed, probabilities averaged) makes two
seeds on the same rows two different models; without it the fit ignores the seed.
Classes are weighted ``balanced`` by default; the augmented minority variants are left out of the fit
unless ``use_augmented`` (they gained nothing on the bench). The defaults are what ``bench/select.py``
chose by repeated grouped cross-validation in both grouping modes (see the README). The logits are
log-probabilities. Everything trained is stored as safetensors (coefficients, intercepts) and JSON
(vocabularies, idf): nothing is pickled.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from psydef.backbones.base import Backbone, Checkpoint, EpochCallback
from psydef.backbones.encoder import ENCODERS, FrozenEncoder
from psydef.core.labels import N_LEVELS
from psydef.settings import check_fields, setting

WEIGHTS_FILE = "linear.safetensors"
VOCAB_FILE = "tfidf.json"
COMBINE = ("stack", "vote")
CLASS_WEIGHTS = ("balanced", "none")
ENCODER_MAX_LENGTH = 512  # all-MiniLM-L6-v2's position embeddings
MIN_ENCODER_LENGTH = 3  # [CLS], one token of text, [SEP]
MISSING_CLASS_LOGIT = -30.0  # a level absent from the training rows: never predicted
_WORD = re.compile(r"\w+")


def previous_turn(dialogue: list[dict]) -> str:
    return dialogue[-2]["text"] if len(dialogue) > 1 else ""


def context_text(dialogue: list[dict], turns: int) -> str:
    """The ``turns`` turns before the target, newest first (the encoder truncates from the right)."""
    return "\n".join(f"{t['speaker']}: {t['text']}" for t in reversed(dialogue[-turns - 1:-1]))


def seeker_history(dialogue: list[dict]) -> str:
    """Every seeker turn before the target, oldest first."""
    return "\n".join(t["text"] for t in dialogue[:-1] if t["speaker"] == "seeker")


def length_columns(rows: pd.DataFrame) -> np.ndarray:
    """log(1 + turns so far) / 4 and log(1 + words of the target) / 5: about 1 for a long dialogue (55 turns)
    and a long utterance (150 words), the scale of a TF-IDF row."""
    turns = np.array([len(d) for d in rows["dialogue"]], dtype=np.float64)
    words = np.array([len(text.split()) for text in rows["current_text"]], dtype=np.float64)
    return np.column_stack([np.log1p(turns) / 4, np.log1p(words) / 5])


N_LENGTH_COLUMNS = 2  # what length_columns returns


def tagged_context(dialogue: list[dict], turns: int) -> str:
    """The ``turns`` turns before the target as lower-cased words tagged with their speaker."""
    return " ".join(f"{t['speaker']}_{w}" for t in dialogue[-turns - 1:-1] for w in _WORD.findall(t["text"].lower()))


# Vectorizer settings by name: one source for fitting and for rebuilding from the saved vocabulary.
_VECTORIZERS = {
    "word": dict(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
    "char": dict(analyzer="char_wb", ngram_range=(2, 5), min_df=3, sublinear_tf=True),
    "context": dict(ngram_range=(1, 2), min_df=2, sublinear_tf=True, lowercase=False, token_pattern=r"\S+"),
    "history": dict(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
}


def _fixed_vectorizer(name: str, saved: dict) -> TfidfVectorizer:
    """A TfidfVectorizer with a saved vocabulary and idf: transforms exactly like the fitted one."""
    vectorizer = TfidfVectorizer(vocabulary=saved["vocabulary"], **_VECTORIZERS[name])
    vectorizer.idf_ = np.asarray(saved["idf"], dtype=np.float64)
    return vectorizer


@dataclass(eq=False)
class MiniLMBackbone(Backbone):
    """Balanced logistic regression on TF-IDF and frozen MiniLM views (see the module docstring)."""

    combine: str = setting("stack", "stack: one logistic regression on every view side by side; vote: one per view, "
                                    "their probabilities averaged.", choices="psydef.backbones.minilm:COMBINE")
    C: float = setting(0.5, "Inverse L2 regularisation strength of the logistic regressions.", gt=0)
    class_weight: str = setting("balanced", "balanced: classes weighted by inverse frequency; none: unweighted.",
                                choices="psydef.backbones.minilm:CLASS_WEIGHTS")
    context_turns: int = setting(6, "Turns before the target in the context views.", ge=1)
    char_ngrams: bool = setting(True, "Character 2-5 gram TF-IDF of the target.")
    max_char_features: int = setting(30000, "Most character n-grams kept.", ge=1)
    context_tfidf: bool = setting(True, "The speaker-tagged TF-IDF view of the context turns.")
    history_tfidf: bool = setting(True, "The TF-IDF view of the earlier seeker turns.")
    encoder: str = setting("minilm", "Frozen sentence encoder of the embedding views: minilm, or mpnet (the "
                                     "optional extra psydef[mpnet]).", choices="psydef.backbones.encoder:ENCODERS")
    max_length: int = setting(128, "MiniLM tokens of the target embedding; 0: no MiniLM views.", ge=0,
                              le=ENCODER_MAX_LENGTH)
    previous_max_length: int = setting(0, "MiniLM tokens of the previous-turn embedding; 0: none.", ge=0,
                                       le=ENCODER_MAX_LENGTH)
    context_max_length: int = setting(0, "MiniLM tokens of the context-turn embedding; 0: the context only as "
                                         "TF-IDF.", ge=0, le=ENCODER_MAX_LENGTH)
    dense_weight: float = setting(1.0, "Scale of the embedding block in the stacked view.", ge=0)
    length_weight: float = setting(1.0, "Scale of the two length columns (turns so far, target words); 0: none.",
                                   ge=0)
    use_augmented: bool = setting(False, "Fit on the augmented variants too.")
    n_bags: int = setting(1, "Voters per view group, each fitted on its own draw of rows and features; their "
                             "probabilities are averaged.", ge=1)
    row_subsample: float = setting(1.0, "Fraction of the training rows of each level a voter is fitted on (drawn by "
                                        "the seed).", gt=0, le=1)
    feature_subsample: float = setting(1.0, "Fraction of the feature columns a voter sees (drawn by the seed).",
                                       gt=0, le=1)
    max_iter: int = setting(2000, "Most lbfgs iterations of each logistic regression.", ge=1)
    tol: float = setting(1e-4, "lbfgs stopping tolerance.", gt=0)

    name = "minilm"

    def __post_init__(self):
        check_fields(self, lambda field_name: f"{self.name} {field_name}")
        for length in ("max_length", "previous_max_length", "context_max_length"):
            if 0 < getattr(self, length) < MIN_ENCODER_LENGTH:  # MiniLM's [CLS] and [SEP] leave no text
                raise ValueError(f"{self.name} {length}: must be 0 (none) or >= {MIN_ENCODER_LENGTH}, got "
                                 f"{getattr(self, length)}")
        if self.max_length == 0 and (self.previous_max_length or self.context_max_length):
            raise ValueError(f"{self.name} previous_max_length and context_max_length need max_length > 0 "
                             f"(max_length=0 turns every MiniLM view off)")
        self.vectorizers: dict[str, TfidfVectorizer] = {}
        # voter -> coef, intercept, classes; a voter is named by its view group, plus "@b" for bag b when n_bags > 1
        self.members: dict[str, dict[str, np.ndarray]] = {}

    def config(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # ------------------------------------------------------------------------------ features
    def _texts(self, name: str, rows: pd.DataFrame) -> list[str]:
        if name == "context":
            return [tagged_context(d, self.context_turns) for d in rows["dialogue"]]
        if name == "history":
            return [seeker_history(d) for d in rows["dialogue"]]
        return list(rows["current_text"])

    def _dense(self, rows: pd.DataFrame) -> np.ndarray | None:
        if self.max_length <= 0:
            return None
        encoder = FrozenEncoder.shared(self.encoder)
        blocks = [encoder.embed(list(rows["current_text"]), self.max_length)]
        if self.previous_max_length > 0:
            blocks.append(encoder.embed([previous_turn(d) for d in rows["dialogue"]], self.previous_max_length))
        if self.context_max_length > 0:
            blocks.append(encoder.embed([context_text(d, self.context_turns) for d in rows["dialogue"]],
                                        self.context_max_length))
        return np.hstack(blocks).astype(np.float64) * self.dense_weight

    def warm_up(self, rows: pd.DataFrame) -> None:
        """Embed every row once, in one canonical pass (see :mod:`psydef.backbones.encoder`)."""
        self._dense(rows)

    def _views(self, rows: pd.DataFrame, tfidf: dict[str, sp.spmatrix] | None = None) -> dict[str, sp.csr_matrix]:
        """View group -> feature matrix: ``target`` (word + char + lengths), ``context``, ``history``, ``embed``.
        ``tfidf``: the vectorizers' matrices of ``rows`` when already made (by ``fit_transform``)."""
        if tfidf is None:
            tfidf = {name: v.transform(self._texts(name, rows)) for name, v in self.vectorizers.items()}
        views = {}
        target = [tfidf[n] for n in ("word", "char") if n in tfidf]
        if self.length_weight > 0:
            target.append(sp.csr_matrix(length_columns(rows) * self.length_weight))
        views["target"] = sp.hstack(target, format="csr")
        for name in ("context", "history"):
            if name in tfidf:
                views[name] = tfidf[name].tocsr()
        dense = self._dense(rows)
        if dense is not None:
            views["embed"] = sp.csr_matrix(dense)
        if self.combine == "stack":
            return {"stack": sp.hstack(list(views.values()), format="csr")}
        return views

    # ------------------------------------------------------------------------------ training
    def fit(self, train: pd.DataFrame, *, seed: int, valid: pd.DataFrame | None = None,
            on_epoch: EpochCallback | None = None, checkpoint: Checkpoint | None = None) -> "MiniLMBackbone":
        """One fit per voter (lbfgs is deterministic: ``seed`` only draws the voters' rows and features, so it
        changes nothing without bagging); ``on_epoch`` is called once. ``checkpoint`` is unused: one solve
        leaves nothing to resume."""
        if not self.use_augmented and "is_augmented" in train:
            train = train[~train["is_augmented"].astype(bool)]
        train_loss = self._fit(train, seed)
        if on_epoch is not None:
            on_epoch(1, train_loss, None if valid is None else self.predict_logits(valid))
        return self

    @property
    def bagged(self) -> bool:
        return self.n_bags > 1 or self.row_subsample < 1 or self.feature_subsample < 1

    def _voters(self, group: str) -> list[str]:
        """The names of view group ``group``'s voters, in bag order."""
        return [group] if self.n_bags == 1 else [f"{group}@{bag}" for bag in range(self.n_bags)]

    def _draw(self, y: np.ndarray, n_features: int, seed: int, bag: int) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, feature columns) voter ``bag`` is fitted on: ``row_subsample`` of each level's rows
        (at least one) and ``feature_subsample`` of the columns (at least one), sorted, drawn by (seed, bag)."""
        if not self.bagged:
            return np.arange(len(y)), np.arange(n_features)
        rng = np.random.default_rng([seed, bag])
        rows = [rng.choice(idx, max(1, round(self.row_subsample * len(idx))), replace=False)
                for idx in (np.flatnonzero(y == c) for c in np.unique(y))]
        columns = rng.choice(n_features, max(1, round(self.feature_subsample * n_features)), replace=False)
        return np.sort(np.concatenate(rows)), np.sort(columns)

    def _fit(self, train: pd.DataFrame, seed: int) -> float:
        """Fit the vectorizers and voters; returns the training rows' mean negative log-likelihood."""
        names = self._vectorizer_names()
        self.vectorizers, tfidf = {}, {}
        for name in names:
            extra = {"max_features": self.max_char_features} if name == "char" else {}
            self.vectorizers[name] = TfidfVectorizer(**_VECTORIZERS[name], **extra)
            tfidf[name] = self.vectorizers[name].fit_transform(self._texts(name, train))
        y = train["label"].astype(int).to_numpy()
        views = self._views(train, tfidf)
        self.members = {}
        for g, (group, x) in enumerate(views.items()):
            for bag in range(self.n_bags):
                rows, columns = self._draw(y, x.shape[1], seed, g * self.n_bags + bag)
                model = LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol,
                                           class_weight=None if self.class_weight == "none" else "balanced")
                if not self.bagged:
                    model.fit(x, y)
                    coef = model.coef_
                else:
                    model.fit(x[rows][:, columns], y[rows])
                    coef = np.zeros((model.coef_.shape[0], x.shape[1]))
                    coef[:, columns] = model.coef_  # a column the voter did not see weighs 0
                self.members[self._voters(group)[bag]] = {"coef": coef, "intercept": model.intercept_,
                                                          "classes": model.classes_.astype(np.int64)}
        log_p = self._log_proba(views)
        return float(-np.mean(log_p[np.arange(len(y)), y]))

    def _log_proba(self, views: dict[str, sp.csr_matrix]) -> np.ndarray:
        """Log of the voters' mean probability over the 9 levels (float64)."""
        probs = np.zeros((next(iter(views.values())).shape[0], N_LEVELS))
        for group, x in views.items():  # in the views' and bags' fixed order: the same sum in every process
            for voter in self._voters(group):
                member = self.members[voter]
                scores = x @ member["coef"].T + member["intercept"]
                if scores.shape[1] == 1:  # two classes: sklearn keeps one row of coefficients
                    scores = np.hstack([-scores, scores])
                scores -= scores.max(axis=1, keepdims=True)
                p = np.exp(scores)
                probs[:, member["classes"]] += p / p.sum(axis=1, keepdims=True)
        probs /= len(self.members)
        with np.errstate(divide="ignore"):
            return np.maximum(np.log(probs), MISSING_CLASS_LOGIT)

    def predict_logits(self, rows: pd.DataFrame) -> np.ndarray:
        if not self.members:
            raise RuntimeError("fit or load the backbone before predicting")
        return self._log_proba(self._views(rows)).astype(np.float32)

    # ------------------------------------------------------------------------------- storage
    def _save_weights(self, path: Path) -> None:
        """Coefficients, intercepts and classes as safetensors, vocabularies and idf as JSON."""
        from safetensors.numpy import save_file

        save_file({f"{group}.{key}": np.ascontiguousarray(value) for group, member in self.members.items()
                   for key, value in member.items()}, str(path / WEIGHTS_FILE))
        vocab = {name: {"vocabulary": {t: int(i) for t, i in v.vocabulary_.items()}, "idf": v.idf_.tolist()}
                 for name, v in self.vectorizers.items()}
        (path / VOCAB_FILE).write_text(json.dumps(vocab))

    def _load_weights(self, path: Path) -> None:
        """The saved vectorizers and members, checked against each other and against this config (a
        ValueError naming the file and the entry at fault: a broken adapter fails here, not in a matmul)."""
        from safetensors.numpy import load_file

        vocab_file, weights_file, again = path / VOCAB_FILE, path / WEIGHTS_FILE, "train that fold again"
        vocab = json.loads(vocab_file.read_text())
        names = self._vectorizer_names()
        if not isinstance(vocab, dict) or sorted(vocab) != sorted(names):
            found = sorted(vocab) if isinstance(vocab, dict) else type(vocab).__name__
            raise ValueError(f"{vocab_file}: holds vectorizers {found}, this adapter's config needs {names}; {again}")
        sizes = {}
        for name, saved in vocab.items():
            terms, idf = (saved.get("vocabulary"), saved.get("idf")) if isinstance(saved, dict) else (None, None)
            if not isinstance(terms, dict) or not isinstance(idf, list) or \
                    sorted(terms.values()) != list(range(len(idf))):
                raise ValueError(f"{vocab_file}: vectorizer {name!r} needs a 'vocabulary' (term -> column 0..n-1) and "
                                 f"an 'idf' of n numbers; {again}")
            sizes[name] = len(idf)
        self.vectorizers = {name: _fixed_vectorizer(name, saved) for name, saved in vocab.items()}
        self.members = {}
        for key, value in load_file(str(weights_file)).items():
            group, field = key.rsplit(".", 1)
            self.members.setdefault(group, {})[field] = value
        widths = self._view_widths(sizes)
        if sorted(self.members) != sorted(widths):
            raise ValueError(f"{weights_file}: holds members {sorted(self.members)}, this adapter's config needs "
                             f"{sorted(widths)}; {again}")
        for group, width in widths.items():
            member = self.members[group]
            coef, intercept, classes = (member.get(k) for k in ("coef", "intercept", "classes"))
            if coef is None or intercept is None or classes is None:
                raise ValueError(f"{weights_file}: member {group!r} needs coef, intercept and classes; {again}")
            if classes.ndim != 1 or len(set(classes.tolist())) != len(classes) \
                    or not set(classes.tolist()) <= set(range(N_LEVELS)):
                raise ValueError(f"{weights_file}: {group}.classes must be distinct levels 0..{N_LEVELS - 1}; {again}")
            rows = 1 if len(classes) == 2 else len(classes)  # sklearn keeps one row of coefficients for two
            if coef.shape != (rows, width) or intercept.shape != (rows,):
                raise ValueError(f"{weights_file}: {group}.coef has shape {coef.shape} and {group}.intercept "
                                 f"{intercept.shape}, but {len(classes)} classes and {width} features "
                                 f"({VOCAB_FILE} and the config) need ({rows}, {width}) and ({rows},); {again}")

    def _vectorizer_names(self) -> list[str]:
        """The TF-IDF vectorizers this config fits, in order."""
        return ["word", *(["char"] if self.char_ngrams else []), *(["context"] if self.context_tfidf else []),
                *(["history"] if self.history_tfidf else [])]

    def _view_widths(self, sizes: dict[str, int]) -> dict[str, int]:
        """Voter -> its number of features (see :meth:`_views`), given each vectorizer's vocabulary size."""
        widths = {"target": sum(sizes.get(n, 0) for n in ("word", "char")) + (N_LENGTH_COLUMNS if self.length_weight > 0
                                                                              else 0)}
        widths |= {name: sizes[name] for name in ("context", "history") if name in sizes}
        if self.max_length > 0:
            dim = ENCODERS[self.encoder][1]
            widths["embed"] = dim * (1 + (self.previous_max_length > 0) + (self.context_max_length > 0))
        groups = {"stack": sum(widths.values())} if self.combine == "stack" else widths
        return {voter: width for group, width in groups.items() for voter in self._voters(group)}
