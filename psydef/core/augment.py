"""Minority-class lexical augmentation, after the LinguIUTics PsyDefDetect system.

Each source utterance of a minority level gets ``k`` variants that cycle round-robin through three
surface mutations, so that a model sees the same defense phrased in several conversational styles:

* mode 0, contraction + hedge: "I am not" -> "I'm not", prefixed with e.g. "Honestly, ";
* mode 1, style shift + filler: "very sad" -> "really down", with e.g. ", you know" before the final
  punctuation;
* mode 2, hesitation: sentence-final periods become ellipses and an "um," / "uh," is inserted.

Variant ``j`` uses mode ``j % 3``: with the default ``k=3`` every source gets each mode exactly once.
Only the target seeker turn changes (the last dialogue turn and ``current_text``); the context turns,
label and dialogue id are kept. The random choices (which hedge, filler, marker and where) come from a
generator seeded with ``(seed, source id, j)``, so a variant does not depend on row order or on ``k``.

Every variant row carries ``source_id``: cross-validation must group on it (or on ``dialogue_id``),
otherwise a variant and its source land on both sides of a split.
"""
from __future__ import annotations

import copy
import random
import re
from collections.abc import Callable, Iterable

import pandas as pd

MINORITY_LEVELS: tuple[int, ...] = (2, 3, 4, 5, 8)
VARIANTS_PER_SOURCE = 3  # at most, per minority record

HEDGES = ("I guess ", "Honestly, ", "I mean, ", "To be honest, ", "I think ", "Well, ")
FILLERS = (", you know", " I suppose", ", I guess", ", honestly", ", to be fair")
HESITATIONS = ("um,", "uh,", "well,", "hmm,")

CONTRACTIONS = {
    "i am": "I'm", "i have": "I've", "i will": "I'll", "i would": "I'd",
    "you are": "you're", "we are": "we're", "they are": "they're",
    "it is": "it's", "that is": "that's", "there is": "there's", "what is": "what's",
    "do not": "don't", "does not": "doesn't", "did not": "didn't",
    "is not": "isn't", "are not": "aren't", "was not": "wasn't", "were not": "weren't",
    "have not": "haven't", "has not": "hasn't", "had not": "hadn't",
    "cannot": "can't", "can not": "can't", "could not": "couldn't",
    "will not": "won't", "would not": "wouldn't", "should not": "shouldn't",
}

SYNONYMS = {
    "very": "really", "sad": "down", "upset": "bothered", "angry": "mad", "happy": "glad",
    "scared": "afraid", "afraid": "scared", "tired": "worn out", "worried": "anxious",
    "hard": "tough", "difficult": "tough", "big": "huge", "small": "little", "bad": "awful",
    "good": "fine", "great": "awesome", "help": "support", "think": "feel", "maybe": "perhaps",
    "always": "constantly", "lot": "ton", "friends": "mates",
}


def _word_pattern(phrases: Iterable[str]) -> re.Pattern[str]:
    """One case-insensitive alternation, longest phrase first, so that one pass replaces every
    match and a replacement is never rewritten again (e.g. "afraid" -> "scared" -> "afraid")."""
    alternation = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
    return re.compile(rf"\b(?:{alternation})\b", re.IGNORECASE)


_CONTRACTION_RE = _word_pattern(CONTRACTIONS)
_SYNONYM_RE = _word_pattern(SYNONYMS)
_SENTENCE_PERIOD_RE = re.compile(r"(?<!\.)\.(?=\s|$)")  # a lone period ending a sentence
_TRAILING_PUNCT_RE = re.compile(r"^(.*?)([.!?]*)$", re.DOTALL)


def _replace_keeping_case(pattern: re.Pattern[str], table: dict[str, str], text: str) -> str:
    """Replace each match by its table entry, upper-casing the first letter when the match started
    with one ("Do not" -> "Don't"); "I" contractions stay capitalised."""
    def substitute(match: re.Match[str]) -> str:
        replacement = table[match.group(0).lower()]
        return replacement[0].upper() + replacement[1:] if match.group(0)[0].isupper() else replacement
    return pattern.sub(substitute, text)


def _lower_first(text: str) -> str:
    """Lower-case the first letter so the text can follow a prefix, except for the pronoun I."""
    if re.match(r"I\b", text):
        return text
    return text[:1].lower() + text[1:]


def _contraction_hedge(text: str, rng: random.Random) -> str:
    return rng.choice(HEDGES) + _lower_first(_replace_keeping_case(_CONTRACTION_RE, CONTRACTIONS, text))


def _style_filler(text: str, rng: random.Random) -> str:
    shifted = _replace_keeping_case(_SYNONYM_RE, SYNONYMS, text.rstrip())
    body, punctuation = _TRAILING_PUNCT_RE.match(shifted).groups()
    return body + rng.choice(FILLERS) + punctuation


def _hesitation(text: str, rng: random.Random) -> str:
    words = _SENTENCE_PERIOD_RE.sub("...", text).split(" ")
    position = rng.randrange(len(words))
    marker = rng.choice(HESITATIONS)
    if position == 0:
        marker = marker.capitalize()
        words[0] = _lower_first(words[0])
    words.insert(position, marker)
    return " ".join(words)


MODES: tuple[Callable[[str, random.Random], str], ...] = (_contraction_hedge, _style_filler, _hesitation)


def augment_text(text: str, j: int, *, seed: int, source_id: str) -> str:
    """Variant ``j`` of ``text``: mode ``j % 3``, random choices seeded by (seed, source_id, j)."""
    rng = random.Random(f"{seed}:{source_id}:{j}")
    return MODES[j % len(MODES)](text, rng)


def with_provenance(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of the real rows with ``source_id`` = ``id`` and ``is_augmented`` = False, the same
    provenance columns that :func:`augment_minority` gives its variants, ready to concatenate."""
    return table.assign(source_id=table["id"].astype(str), is_augmented=False)


def augment_minority(table: pd.DataFrame, *, seed: int = 42, levels: Iterable[int] = MINORITY_LEVELS,
                     k: int = VARIANTS_PER_SOURCE) -> pd.DataFrame:
    """The NEW variant rows for the real rows of ``table`` whose label is in ``levels``.

    Up to ``k`` variants per source, with ``id`` = ``f"{source_id}_aug{j}"``, ``source_id`` and
    ``is_augmented`` = True; a variant equal to its source or to an earlier variant is dropped, so a
    source can get fewer than ``k``. Rows already marked ``is_augmented`` are never used as sources.
    The input is not modified.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    sources = table[table["label"].isin(set(levels))]
    if "is_augmented" in sources:
        sources = sources[~sources["is_augmented"].astype(bool)]
    rows = []
    for source in sources.to_dict("records"):
        source_id = str(source["id"])
        seen = {source["current_text"]}
        for j in range(k):
            text = augment_text(source["current_text"], j, seed=seed, source_id=source_id)
            if text in seen:
                continue
            seen.add(text)
            row = copy.deepcopy(source)
            row["dialogue"][-1]["text"] = text
            row.update(id=f"{source_id}_aug{j}", current_text=text, source_id=source_id, is_augmented=True)
            rows.append(row)
    # Same columns and dtypes as with_provenance(table), so real and variant rows concatenate cleanly.
    template = with_provenance(table.iloc[:0])
    return pd.DataFrame(rows, columns=template.columns).astype(template.dtypes.to_dict())
