"""Read and validate the official PsyDefConv JSON into a table; a stable digest of its content.

A split file is a JSON list of records ``{"id", "dialogue_id", "dialogue": [{"text", "speaker"}, ...],
"current_text"}`` plus ``"label"`` (0..8) in the training split. The dialogue is the conversation up to
and including the target seeker turn, so its last turn must be the seeker's and equal ``current_text``,
which must hold at least one visible character (not only whitespace, control or invisible format
characters such as U+200B ZERO WIDTH SPACE).
"""
from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from psydef.core.labels import N_LEVELS

SPEAKERS = ("seeker", "supporter")
TARGET_SPEAKER = "seeker"  # the target utterance, the dialogue's last turn, is always the seeker's
# Unicode categories that show nothing on their own: control (tab, newline, ...) and format characters
# (zero-width space, joiners, word joiner, byte-order mark, ...); whitespace is str.isspace.
INVISIBLE_CATEGORIES = ("Cc", "Cf")
RECORD_FIELDS = ("id", "dialogue_id", "dialogue", "current_text")
TABLE_COLUMNS = (*RECORD_FIELDS, "label")
# What the registered model takes, one row per utterance (``dialogue``: turns or their JSON string).
INPUT_COLUMNS = ("id", "dialogue", "current_text")


class DataError(ValueError):
    """Input that does not follow the official format; the message names where and what to do."""


class InputLimitsError(ValueError):
    """A ``PSYDEF_MAX_*`` variable of this process's environment that is not a limit: the setting's
    fault, not the input's (a model server refuses to start with it rather than answer HTTP 400)."""


@dataclass(frozen=True)
class InputLimits:
    """Sizes above which a record is refused, so that one request cannot tie up a model server.

    The defaults are far above PsyDefConv's largest record (1,403 characters in one turn, 54 turns,
    4,684 characters in one dialogue); each is configurable through ``PSYDEF_<FIELD>`` in the
    environment of the process that validates (``predict``, ``mlflow models serve``), e.g.
    ``PSYDEF_MAX_DIALOGUE_TURNS=500``."""
    max_utterance_chars: int = 10_000  # any one turn, the target included
    max_dialogue_turns: int = 200
    max_dialogue_chars: int = 100_000  # all turns of one record together
    max_request_rows: int = 10_000  # rows in one call of the model (one HTTP request)

    @classmethod
    def from_env(cls) -> "InputLimits":
        """The limits, with ``PSYDEF_<FIELD>`` from the environment where set; ``InputLimitsError``
        naming the variable and its value when one is not a whole number >= 1."""
        values = {}
        for field in fields(cls):
            variable = f"PSYDEF_{field.name.upper()}"
            raw = os.environ.get(variable)
            if raw is None:
                continue
            try:
                value = int(raw)
            except ValueError:
                value = 0
            if value < 1:
                raise InputLimitsError(f"{variable}={raw!r} in this process's environment is not a limit: set it to a "
                                       f"whole number >= 1, or unset it for the default {field.default:,}")
            values[field.name] = value
        return cls(**values)


def has_visible_text(text: str) -> bool:
    """Whether ``text`` holds a character that shows: not whitespace, control or format (U+200B...)."""
    return any(not ch.isspace() and unicodedata.category(ch) not in INVISIBLE_CATEGORIES for ch in text)


def _limit(where: str, what: str, size: int, limit: int, variable: str) -> None:
    if size > limit:
        raise DataError(f"{where}: {what} is {size:,}, over the limit of {limit:,} (set {variable} to change it)")


def _codepoints(text: str, most: int = 5) -> str:
    """How an invisible text is spelled: ``''`` or its first code points (``U+200B U+200B``)."""
    if not text:
        return "''"
    shown = " ".join(f"U+{ord(ch):04X}" for ch in text[:most])
    return shown + (f" ... ({len(text):,} characters)" if len(text) > most else "")


def _where(source: str, index: int | None, record: Any) -> str:
    if index is None:
        return source
    rid = record.get("id") if isinstance(record, dict) else None
    return f"{source}: record {index}" + (f" (id {rid!r})" if isinstance(rid, str) else "")


def validate_records(records: Any, *, source: str = "input", labelled: bool | None = None,
                     limits: InputLimits | None = None) -> None:
    """Raise ``DataError`` on the first record that breaks the official format or ``limits`` (default:
    :meth:`InputLimits.from_env`).

    ``labelled=True`` requires a ``label`` on every record, ``False`` ignores labels, ``None`` checks
    labels only where present."""
    if not isinstance(records, list):
        raise DataError(f"{source}: the top level must be a JSON list of records, got {type(records).__name__}")
    if not records:
        raise DataError(f"{source}: the list of records is empty")
    limits = limits or InputLimits.from_env()
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        where = _where(source, i, rec)
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        required = (*RECORD_FIELDS, "label") if labelled else RECORD_FIELDS
        for field in required:
            if field not in rec:
                raise DataError(f"{where}: missing field {field!r} (a record needs {', '.join(required)})")
        for field in ("id", "dialogue_id", "current_text"):
            if not isinstance(rec[field], str):
                raise DataError(f"{where}: field {field!r} must be a string, got {type(rec[field]).__name__}")
        if rec["id"] in seen:
            raise DataError(f"{where}: duplicate id {rec['id']!r} (first seen at record {seen[rec['id']]}); "
                            "ids must be unique")
        seen[rec["id"]] = i
        dialogue = rec["dialogue"]
        if not isinstance(dialogue, list) or not dialogue:
            raise DataError(f"{where}: field 'dialogue' must be a non-empty list of turns "
                            "{'text', 'speaker'} ending with the target seeker turn")
        for t, turn in enumerate(dialogue):
            if not isinstance(turn, dict) or not isinstance(turn.get("text"), str):
                raise DataError(f"{where}: dialogue turn {t} must be an object with a string 'text'")
            if turn.get("speaker") not in SPEAKERS:
                raise DataError(f"{where}: dialogue turn {t} has speaker {turn.get('speaker')!r}; "
                                f"expected one of {', '.join(SPEAKERS)}")
        if not has_visible_text(rec["current_text"]):
            raise DataError(f"{where}: field 'current_text' is empty or only whitespace or invisible characters "
                            f"({_codepoints(rec['current_text'])}); there is no target utterance to label")
        _limit(where, "the number of dialogue turns", len(dialogue), limits.max_dialogue_turns,
               "PSYDEF_MAX_DIALOGUE_TURNS")
        longest = max(range(len(dialogue)), key=lambda t: len(dialogue[t]["text"]))
        _limit(where, f"the length of dialogue turn {longest} (characters)", len(dialogue[longest]["text"]),
               limits.max_utterance_chars, "PSYDEF_MAX_UTTERANCE_CHARS")
        _limit(where, "the length of the dialogue (characters, all turns)", sum(len(t["text"]) for t in dialogue),
               limits.max_dialogue_chars, "PSYDEF_MAX_DIALOGUE_CHARS")
        if dialogue[-1]["text"] != rec["current_text"]:
            raise DataError(f"{where}: the last dialogue turn differs from 'current_text'; the dialogue must "
                            "end with the target utterance")
        if dialogue[-1]["speaker"] != TARGET_SPEAKER:
            raise DataError(f"{where}: field 'dialogue' ends with a {dialogue[-1]['speaker']} turn (turn "
                            f"{len(dialogue) - 1}); the dialogue must end with the target {TARGET_SPEAKER} turn")
        if labelled is not False and "label" in rec:
            label = rec["label"]
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < N_LEVELS:
                raise DataError(f"{where}: field 'label' must be an integer in 0..{N_LEVELS - 1}, got {label!r}")


def read_split(path: str | Path, *, labelled: bool | None = None) -> pd.DataFrame:
    """Read and validate one split file into a table with columns ``id, dialogue_id, dialogue,
    current_text`` and ``label`` (int, or -1 where the file has no labels)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; pass the folder that holds train.json/test.json "
                        "(get them with `psydef fetch-data`)")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}); expected the official PsyDefConv format") from err
    validate_records(records, source=str(path), labelled=labelled)
    return records_to_table(records, labelled=labelled)


def records_to_table(records: Iterable[dict], *, labelled: bool | None = None) -> pd.DataFrame:
    """Validated records -> table. Without labels the ``label`` column holds -1."""
    table = pd.DataFrame.from_records(list(records))
    if "label" not in table.columns or labelled is False:
        table["label"] = -1
    table["label"] = table["label"].fillna(-1).astype("int64")
    return table.loc[:, list(TABLE_COLUMNS)].reset_index(drop=True)


def is_labelled(table: pd.DataFrame) -> bool:
    return bool(len(table)) and bool((table["label"] >= 0).all())


def dataset_digest(table: pd.DataFrame) -> str:
    """A stable content hash (16 hex chars) of the records, independent of row order and JSON layout."""
    rows = sorted(
        json.dumps([r.id, r.dialogue_id, r.dialogue, r.current_text, int(r.label)], sort_keys=True,
                   ensure_ascii=False)
        for r in table.itertuples(index=False)
    )
    return hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()[:16]


def example_input() -> pd.DataFrame:
    """One utterance in the model's input format: what the smoke test of ``register`` and ``promote``
    predicts."""
    reply = "Honestly it's fine, exams never mattered anyway."
    dialogue = [{"speaker": "seeker", "text": "I failed my driving exam again."},
                {"speaker": "supporter", "text": "I'm sorry. How are you feeling about it?"},
                {"speaker": "seeker", "text": reply}]
    return pd.DataFrame({"id": ["example_0"], "dialogue": [dialogue], "current_text": [reply]})


def input_table(model_input: pd.DataFrame, limits: InputLimits | None = None) -> pd.DataFrame:
    """The model's input as a validated data table; ``dialogue`` may be a list of turns or its JSON
    string. Raises ``DataError`` naming the row id and the field at fault, or when the input is over
    ``limits`` (rows per call, sizes; default: :meth:`InputLimits.from_env`). (A missing column never
    gets here: MLflow's signature enforcement refuses it first, naming the column.)"""
    limits = limits or InputLimits.from_env()
    _limit("model input", "the number of rows", len(model_input), limits.max_request_rows, "PSYDEF_MAX_REQUEST_ROWS")
    records = []
    for i, (rid, dialogue, current_text) in enumerate(model_input.loc[:, list(INPUT_COLUMNS)].itertuples(index=False)):
        if isinstance(dialogue, str):
            try:
                dialogue = json.loads(dialogue)
            except json.JSONDecodeError as err:
                raise DataError(f"model input: record {i} (id {rid!r}): field 'dialogue' is a string but not JSON "
                                f"({err}); send the list of turns or its JSON encoding") from err
        # The model never reads dialogue_id; each row stands for itself.
        records.append({"id": rid, "dialogue_id": rid, "dialogue": dialogue, "current_text": current_text})
    validate_records(records, source="model input", labelled=False, limits=limits)
    return records_to_table(records, labelled=False)
