"""The nine DMRS defense levels of PsyDefConv and the classes the official metric scores."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Level:
    id: int
    name: str
    mechanisms: tuple[str, ...]


LEVELS: tuple[Level, ...] = (
    Level(0, "No defense", ()),
    Level(1, "Action", ("acting out", "help-rejecting complaining", "passive aggression")),
    Level(2, "Major image-distorting", ("splitting of self-image", "splitting of others' image",
                                         "projective identification")),
    Level(3, "Disavowal", ("denial", "projection", "rationalization", "autistic fantasy")),
    Level(4, "Minor image-distorting", ("idealization of self-image", "idealization of others' image",
                                         "devaluation of self-image", "devaluation of others' image",
                                         "omnipotence")),
    Level(5, "Neurotic", ("repression", "dissociation", "reaction formation", "displacement")),
    Level(6, "Obsessional", ("isolation of affect", "intellectualization", "undoing")),
    Level(7, "High-adaptive", ("affiliation", "altruism", "anticipation", "humor", "self-assertion",
                                "self-observation", "sublimation", "suppression")),
    Level(8, "Needs more information", ()),
)

N_LEVELS = len(LEVELS)
LABEL_NAMES: tuple[str, ...] = tuple(level.name for level in LEVELS)
ALL_LABELS: tuple[int, ...] = tuple(range(N_LEVELS))
# The official PsyDefDetect metric is macro-F1 over the defense levels 1..8: class 0 is excluded.
OFFICIAL_LABELS: tuple[int, ...] = tuple(range(1, N_LEVELS))
HIGH_ADAPTIVE = 7  # the majority level the confidence gate decides on
# The model's output columns beside id and label: the calibrated probability of each level.
PROB_COLUMNS: tuple[str, ...] = tuple(f"prob_{level}" for level in range(N_LEVELS))
