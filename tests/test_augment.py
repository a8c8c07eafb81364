import copy
import json
from pathlib import Path

import pandas as pd
import pytest

from psydef.core.augment import (FILLERS, HEDGES, HESITATIONS, MINORITY_LEVELS, augment_minority, augment_text,
                            with_provenance)

DATA_DIR = Path(__file__).resolve().parents[2] / "shared/data/psydefconv"

SEEKER_TEXTS = {
    2: "I am very sad. My sister is the worst person alive.",
    3: "I do not think it is my fault. They are all against me.",
    4: "I am not a good driver",
    5: "It is fine, I do not feel angry at all!",
    7: "I talked to my friend about it and it helped.",
    8: "ok",
    0: "hello",
    6: "Statistically it is not a big deal.",
}


def make_table() -> pd.DataFrame:
    rows = []
    for i, (label, text) in enumerate(SEEKER_TEXTS.items()):
        dialogue = [{"text": "Hi, how are you today?", "speaker": "supporter"},
                    {"text": "I am very sad. It is not good.", "speaker": "seeker"},
                    {"text": "I am sorry to hear that. What happened?", "speaker": "supporter"},
                    {"text": text, "speaker": "seeker"}]
        rows.append({"id": f"train_{i:05d}", "dialogue_id": f"ESConv_{i // 2:03d}", "dialogue": dialogue,
                     "current_text": text, "label": label})
    return pd.DataFrame(rows)


def test_variants_change_only_the_target_turn():
    table = make_table()
    before = copy.deepcopy(table.to_dict("records"))
    variants = augment_minority(table)

    assert table.to_dict("records") == before  # input untouched
    sources = table.set_index("id")
    for row in variants.to_dict("records"):
        source = sources.loc[row["source_id"]]
        assert row["dialogue"][:-1] == source["dialogue"][:-1]
        assert row["dialogue"][-1] == {"text": row["current_text"], "speaker": "seeker"}
        assert row["current_text"] != source["current_text"]
        assert (row["label"], row["dialogue_id"]) == (source["label"], source["dialogue_id"])
        assert row["is_augmented"] is True
        assert row["dialogue"] is not source["dialogue"] and row["dialogue"][0] is not source["dialogue"][0]


def test_k_variants_per_minority_source_and_none_for_others():
    table = make_table()
    variants = augment_minority(table)
    minority = table[table["label"].isin(MINORITY_LEVELS)]
    assert set(variants["source_id"]) == set(minority["id"])
    assert variants.groupby("source_id").size().eq(3).all()
    assert set(variants["id"]) == {f"{i}_aug{j}" for i in minority["id"] for j in range(3)}
    assert variants["current_text"].is_unique
    assert list(variants.columns) == [*table.columns, "source_id", "is_augmented"]
    assert augment_minority(table, levels=(6,))["source_id"].tolist() == ["train_00007"] * 3
    assert augment_minority(table, levels=(1,)).empty


def test_the_three_modes():
    text = "I am very sad. I do not know, see google.com or 3.5 sites."
    contraction, style, hesitation = (augment_text(text, j, seed=0, source_id="x") for j in range(3))
    assert contraction.startswith(HEDGES)
    assert contraction.endswith("I'm very sad. I don't know, see google.com or 3.5 sites.")
    assert style.startswith("I am really down. I do not know, see google.com or 3.5 sites")
    assert style.endswith(tuple(f"sites{filler}." for filler in FILLERS))
    words = hesitation.split(" ")
    markers = [word for word in words if word.lower() in HESITATIONS]
    assert len(markers) == 1
    words.remove(markers[0])
    assert " ".join(words) == "I am very sad... I do not know, see google.com or 3.5 sites..."
    assert augment_text(text, 3, seed=0, source_id="x") != text  # j=3 cycles back to mode 0


def test_duplicates_are_dropped():
    # A one-word utterance has few distinct variants per mode, so k=30 must produce repeats.
    table = make_table()
    variants = augment_minority(table[table["label"] == 8], k=30)
    assert 0 < len(variants) < 30
    assert variants["current_text"].is_unique and "ok" not in set(variants["current_text"])


def test_deterministic_and_independent_of_row_order():
    table = make_table()
    first = augment_minority(table, seed=7)
    pd.testing.assert_frame_equal(first, augment_minority(table, seed=7))
    shuffled = augment_minority(table.sample(frac=1, random_state=1), seed=7)
    pd.testing.assert_frame_equal(shuffled.sort_values("id", ignore_index=True),
                                  first.sort_values("id", ignore_index=True))
    other_seeds = [augment_minority(table, seed=seed)["current_text"].tolist() for seed in range(3)]
    assert any(texts != first["current_text"].tolist() for texts in other_seeds)


def test_provenance_and_concatenation():
    table = make_table()
    real = with_provenance(table)
    assert real["source_id"].tolist() == table["id"].tolist() and not real["is_augmented"].any()
    assert "source_id" not in table
    # Already augmented rows are not augmented again.
    combined = pd.concat([real, augment_minority(real)], ignore_index=True)
    assert combined["label"].dtype == table["label"].dtype and combined["is_augmented"].dtype == bool
    pd.testing.assert_frame_equal(augment_minority(combined), augment_minority(table))
    assert list(augment_minority(table.iloc[:0]).dtypes) == list(real.dtypes)


@pytest.mark.skipif(not (DATA_DIR / "train.json").exists(), reason=f"real data not found at {DATA_DIR}")
def test_real_train_about_three_variants_per_minority_source():
    table = pd.DataFrame(json.loads((DATA_DIR / "train.json").read_text()))
    variants = augment_minority(table)
    sources = table[table["label"].isin(MINORITY_LEVELS)].groupby("label").size()
    made = variants.groupby("label").size()
    print("\nlevel sources variants\n" + "\n".join(f"{lv} {sources[lv]} {made[lv]}" for lv in sources.index))
    assert list(made.index) == list(MINORITY_LEVELS)
    for level in MINORITY_LEVELS:
        assert 2.9 * sources[level] <= made[level] <= 3 * sources[level]
    source_texts = table.set_index("id").loc[variants["source_id"], "current_text"].to_numpy()
    assert (variants["current_text"].to_numpy() != source_texts).all()
