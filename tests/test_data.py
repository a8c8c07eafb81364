import json

import pytest

from psydef.core.data import DataError, dataset_digest, read_split, records_to_table, validate_records
from tests.fixtures.records import official_records


def write(tmp_path, content) -> str:
    path = tmp_path / "train.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_reads_a_valid_split_into_a_typed_table(tmp_path):
    table = read_split(write(tmp_path, official_records(3)), labelled=True)
    assert list(table.columns) == ["id", "dialogue_id", "dialogue", "current_text", "label"]
    assert len(table) == 12 and table["label"].dtype == "int64"
    assert table.loc[0, "dialogue"][-1]["text"] == table.loc[0, "current_text"]


def test_unlabelled_split_gets_label_minus_one(tmp_path):
    table = read_split(write(tmp_path, official_records(2, labelled=False)), labelled=False)
    assert (table["label"] == -1).all()


def _broken(change):
    records = official_records(2)
    change(records)
    return records


@pytest.mark.parametrize("change, expected", [
    (lambda r: r[1].pop("dialogue_id"), "record 1 (id 'train_00001'): missing field 'dialogue_id'"),
    (lambda r: r[2].update(label=9), "record 2 (id 'train_00002'): field 'label' must be an integer in 0..8, got 9"),
    (lambda r: r[2].update(label="3"), "field 'label' must be an integer in 0..8, got '3'"),
    (lambda r: r[3]["dialogue"][0].update(speaker="therapist"), "record 3 (id 'train_00003'): dialogue turn 0 has speaker 'therapist'"),
    (lambda r: r[0].update(dialogue=[]), "record 0 (id 'train_00000'): field 'dialogue' must be a non-empty list"),
    (lambda r: r[4].update(current_text="something else"), "record 4 (id 'train_00004'): the last dialogue turn differs from 'current_text'"),
    (lambda r: r[5].update(id="train_00000"), "record 5 (id 'train_00000'): duplicate id 'train_00000' (first seen at record 0)"),
    (lambda r: r[6]["dialogue"][-1].update(speaker="supporter"),
     "record 6 (id 'train_00006'): field 'dialogue' ends with a supporter turn (turn 5); the dialogue must end with "
     "the target seeker turn"),
])
def test_bad_records_are_refused_naming_file_record_and_field(tmp_path, change, expected):
    path = write(tmp_path, _broken(change))
    with pytest.raises(DataError) as err:
        read_split(path, labelled=True)
    assert str(path) in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize("text", ["", " \t\n", "\u200b", "\u200b\u200c\u200d", "\u2060\ufeff", "\u00a0\u3000\u200b",
                                  "\x00\x1f", "\u00ad\u2061"],
                         ids=["empty", "whitespace", "zero-width space", "zero-width (non-)joiners",
                              "word joiner and BOM", "no-break and ideographic spaces", "control characters",
                              "soft hyphen, invisible operator"])
def test_a_target_without_a_visible_character_is_refused(tmp_path, text):
    """The same check guards training data, test data and serving requests (validate_records)."""
    records = official_records(2)
    records[6]["current_text"] = records[6]["dialogue"][-1]["text"] = text
    path = write(tmp_path, records)
    with pytest.raises(DataError, match=r"record 6 \(id 'train_00006'\): field 'current_text' is empty or only "
                                        r"whitespace or invisible characters \((''|U\+[0-9A-F]{4})"):
        read_split(path, labelled=True)


@pytest.mark.parametrize("text", ["ok\u200b", "\u200bé", "\u00a0.", "😶"])
def test_a_target_with_a_visible_character_among_invisible_ones_is_kept(tmp_path, text):
    records = official_records(2)
    records[6]["current_text"] = records[6]["dialogue"][-1]["text"] = text
    assert read_split(write(tmp_path, records), labelled=True).loc[6, "current_text"] == text


def test_the_real_data_ends_every_dialogue_with_a_visible_seeker_target(real_data_dir):
    """The official format holds on the real splits (so the checks refuse no real record)."""
    for split, labelled in (("train", True), ("test", False)):
        table = read_split(real_data_dir / f"{split}.json", labelled=labelled)
        assert len(table) and all(d[-1]["speaker"] == "seeker" for d in table["dialogue"])


def test_missing_label_is_refused_only_when_labels_are_required(tmp_path):
    records = _broken(lambda r: r[1].pop("label"))
    with pytest.raises(DataError, match="record 1 .*missing field 'label'"):
        validate_records(records, labelled=True)
    validate_records(records, labelled=False)


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    ('{"id": "x"}', "the top level must be a JSON list of records, got dict"),
    ("[]", "the list of records is empty"),
])
def test_bad_files_are_refused(tmp_path, content, expected):
    with pytest.raises(DataError, match=expected):
        read_split(write(tmp_path, content))


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="file not found.*fetch-data"):
        read_split(tmp_path / "nope.json")


def test_digest_is_stable_across_order_and_layout_but_sees_content():
    records = official_records(3)
    table = records_to_table(records)
    shuffled = records_to_table(list(reversed(json.loads(json.dumps(records, indent=4)))))
    assert dataset_digest(table) == dataset_digest(shuffled)
    records[0]["label"] = (records[0]["label"] + 1) % 9
    assert dataset_digest(records_to_table(records)) != dataset_digest(table)
    assert len(dataset_digest(table)) == 16
