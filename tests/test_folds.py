import pandas as pd
import pytest

from psydef.core.augment import augment_minority
from psydef.core.data import records_to_table
from psydef.core.folds import (assign_folds, check_no_leakage, fold_table, leaked_dialogues, leaked_sources,
                          split_fold)
from tests.fixtures.records import official_records


@pytest.fixture
def table():
    return records_to_table(official_records(20, 5))


def test_dialogue_folds_keep_every_dialogue_together_and_are_stratified(table):
    folds = assign_folds(table, seed=1)
    assert set(folds) == set(range(5))
    per_dialogue = pd.Series(folds).groupby(table["dialogue_id"]).nunique()
    assert (per_dialogue == 1).all()
    assert assign_folds(table, seed=1).tolist() == folds.tolist()  # deterministic given the seed


def test_utterance_folds_split_dialogues(table):
    folds = fold_table(table, augment_minority(table), seed=3, group_by="utterance")
    assert leaked_dialogues(folds) > 0 and leaked_sources(folds) == 0
    check_no_leakage(folds, "utterance")
    with pytest.raises(ValueError, match="dialogues appear in more than one fold"):
        check_no_leakage(folds, "dialogue")


def test_variants_follow_their_source_and_never_validate(table):
    augmented = augment_minority(table, seed=0)
    folds = fold_table(table, augmented, seed=0)
    assert list(folds.columns) == ["id", "dialogue_id", "label", "fold", "source_id", "is_augmented"]
    fold_of = folds.set_index("id")["fold"]
    assert (folds[folds.is_augmented]["source_id"].map(fold_of).values == folds[folds.is_augmented]["fold"].values).all()
    assert leaked_dialogues(folds) == 0
    check_no_leakage(folds, "dialogue")
    for k in range(5):
        train, valid = split_fold(folds, k)
        assert not valid["is_augmented"].any() and len(valid) > 0
        assert set(train["dialogue_id"]).isdisjoint(valid["dialogue_id"])
    all_valid = pd.concat([split_fold(folds, k)[1] for k in range(5)])
    assert sorted(all_valid["id"]) == sorted(table["id"])  # each real record validated exactly once


def test_leakage_is_detected_and_bad_arguments_refused(table):
    folds = fold_table(table, augment_minority(table), seed=0)
    moved = folds.copy()
    moved.loc[moved.index[moved.is_augmented][0], "fold"] += 1
    moved["fold"] %= 5
    with pytest.raises(ValueError, match="augmented variants in another fold"):
        check_no_leakage(moved, "dialogue")
    with pytest.raises(ValueError, match="fold 7 is out of range"):
        split_fold(folds, 7)
    with pytest.raises(ValueError, match="group_by"):
        assign_folds(table, group_by="speaker")
