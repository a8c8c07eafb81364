"""Bad input through the ``psydef`` CLI (in process): a clean non-zero exit whose one-line message names
the problem, no new registered model version, and the ``production`` alias left where it was.

The store is the registered tiny ensemble of tests/fixtures/stores.py (``registry_store``, promoted ``champion``);
the tune members are test_tune's fake train runs."""
import json
import re

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from psydef.cli import cli
from psydef import tracking
from tests.fixtures.fake_runs import Store

# A defect of an official-format split file: (change the file given its path and records, the message).
# Record 3 exists in both splits of the ``data_dir`` fixture (60 train records, 8 test records).


def _write(path, content):
    path.write_text(content if isinstance(content, str) else json.dumps(content))


def _edit_record(change):
    def edit(path, records):
        change(records[3], records)
        _write(path, records)
    return edit


DATA_DEFECTS = {
    "missing data file": (lambda path, records: path.unlink(), r": file not found"),
    "not JSON": (lambda path, records: _write(path, json.dumps(records)[:-10]), r": not valid JSON"),
    "top level not a list": (lambda path, records: _write(path, {"records": records}),
                             r": the top level must be a JSON list of records, got dict"),
    "record missing a field": (_edit_record(lambda r, _: r.pop("dialogue_id")),
                               r": record 3 \(id '\w+_00003'\): missing field 'dialogue_id'"),
    "label outside 0..8": (_edit_record(lambda r, _: r.update(label=9)),
                           r": record 3 \(id '\w+_00003'\): field 'label' must be an integer in 0..8, got 9"),
    "unknown speaker": (_edit_record(lambda r, _: r["dialogue"][0].update(speaker="therapist")),
                        r": record 3 \(id '\w+_00003'\): dialogue turn 0 has speaker 'therapist'"),
    "empty dialogue": (_edit_record(lambda r, _: r.update(dialogue=[])),
                       r": record 3 \(id '\w+_00003'\): field 'dialogue' must be a non-empty list"),
    "last turn differs from current_text": (_edit_record(lambda r, _: r.update(current_text="something else")),
                                            r": record 3 \(id '\w+_00003'\): the last dialogue turn differs "
                                            r"from 'current_text'"),
    "empty target utterance": (_edit_record(lambda r, _: (r.update(current_text=""), r["dialogue"][-1].update(text=""))),
                               r": record 3 \(id '\w+_00003'\): field 'current_text' is empty or only whitespace"),
    "whitespace-only target": (_edit_record(lambda r, _: (r.update(current_text=" \t"), r["dialogue"][-1].update(text=" \t"))),
                               r": record 3 \(id '\w+_00003'\): field 'current_text' is empty or only whitespace"),
    "zero-width target": (_edit_record(lambda r, _: (r.update(current_text="\u200b\u200b"),
                                                     r["dialogue"][-1].update(text="\u200b\u200b"))),
                          r": record 3 \(id '\w+_00003'\): field 'current_text' is empty or only whitespace or "
                          r"invisible characters \(U\+200B U\+200B\)"),
    "last turn the supporter's": (_edit_record(lambda r, _: r["dialogue"][-1].update(speaker="supporter")),
                                  r": record 3 \(id '\w+_00003'\): field 'dialogue' ends with a supporter turn"),
    "an utterance over the size limit": (_edit_record(lambda r, _: r["dialogue"][0].update(text="x" * 10_001)),
                                         r": record 3 \(id '\w+_00003'\): the length of dialogue turn 0 \(characters\) "
                                         r"is 10,001, over the limit of 10,000 \(set PSYDEF_MAX_UTTERANCE_CHARS"),
    "a dialogue over the size limit": (_edit_record(lambda r, _: r.update(dialogue=[{"speaker": "supporter", "text": "ok"}] * 200 + r["dialogue"])),
                                       r": record 3 \(id '\w+_00003'\): the number of dialogue turns is 20\d, over the "
                                       r"limit of 200 \(set PSYDEF_MAX_DIALOGUE_TURNS"),
    "duplicate ids": (_edit_record(lambda r, records: r.update(id=records[0]["id"])),
                      r": record 3 \(id '(\w+_00000)'\): duplicate id '\1' \(first seen at record 0\)"),
}
# Which split each command reads: main (the whole chain) starts with train.json, predict reads test.json.
COMMANDS = {"main": ("train.json", ["--seeds", "5", "--members", "minilm"]), "predict": ("test.json", [])}


@pytest.fixture(scope="module")
def store(registry_store, champion, tmp_path_factory):
    """The registry store with production set, plus fake train runs to tune: two with OOF logits over
    different ids, one without logits."""
    experiment = MlflowClient().get_experiment_by_name(registry_store.experiment)
    fake = Store(tmp_path_factory.mktemp("tune-members"), experiment.experiment_id)
    prepare = fake.prepare()
    registry_store.tune_members = {
        "good": fake.train(prepare, 11),
        "other ids": fake.train(prepare, 12, ids=fake.ids[:-5] + ["stray_1"]),
        "no logits": fake.train(prepare, 13, logits=False),
    }
    return registry_store


def _registry_state():
    client = MlflowClient()
    versions = sorted((v.name, int(v.version)) for v in client.search_model_versions())
    return versions, client.get_model_version_by_alias(tracking.MODEL_NAME, tracking.PRODUCTION).version


def _refused(store, args, message):
    """Run ``psydef ARGS``; it must exit 1 with ``Error: ...message...`` and leave the registry as it was."""
    before = _registry_state()
    result = CliRunner().invoke(cli, [*args, "--tracking-uri", store.uri, "--experiment-name", store.experiment])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), f"not a clean error: {result.exception!r}\n{result.output}"
    error = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert error and re.search(message, error[-1]), result.output
    assert _registry_state() == before  # no new version, production unchanged
    return error[-1]


@pytest.mark.parametrize("defect", DATA_DEFECTS)
@pytest.mark.parametrize("command", COMMANDS)
def test_bad_data_files(store, data_dir, tmp_path, command, defect):
    split, options = COMMANDS[command]
    path = data_dir / split
    change, message = DATA_DEFECTS[defect]
    change(path, json.loads(path.read_text()))
    error = _refused(store, [command, "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "out"), *options],
                     re.escape(str(path)) + message)
    assert len(error) < 400  # one line that says it, not a dump of the file


@pytest.mark.parametrize("members, message", [
    (("good", "other ids"), r"Runs {good} and {other ids} have different OOF ids: 5 of {good}'s ids are missing "
                            r"from {other ids} and 1 of {other ids}'s are not in {good}"),
    (("good", "no logits"), r"Run {no logits} has no OOF logits"),
], ids=["tune members whose OOF ids differ", "a member run without logits"])
def test_bad_tune_members(store, members, message):
    runs = store.tune_members
    _refused(store, ["tune", "--train-runs", ",".join(runs[m] for m in members), "--n-trials", "4",
                     "--inner-trials", "2", "--sampler", "random"],
             message.format_map(runs))


@pytest.mark.parametrize("model_uri, message", [
    (f"models:/{tracking.MODEL_NAME}@staging", r"has no alias 'staging'"),
    ("models:/no-such-model@production", r"no registered model 'no-such-model'"),
    (f"models:/{tracking.MODEL_NAME}/999", r"has no version 999"),
    ("runs:/00000000000000000000000000000000/model",
     r"runs:/0{32}/model does not resolve to a model: Run .* not found"),
    ("/nonexistent/psydef-model", r"/nonexistent/psydef-model does not resolve to a model: .*MLmodel"),
])
def test_model_uri_that_does_not_resolve(store, data_dir, tmp_path, model_uri, message):
    _refused(store, ["predict", "--data-dir", str(data_dir), "--model-uri", model_uri, "--out-dir",
                     str(tmp_path / "out")], message)
    assert not (tmp_path / "out" / tracking.PREDICTION_JSON).exists()


def test_input_limits_are_configurable(store, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PSYDEF_MAX_DIALOGUE_CHARS", "50")
    _refused(store, ["predict", "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "out")],
             re.escape(str(data_dir / "test.json")) + r": record 0 \(id 'test_00000'\): the length of the dialogue "
             r"\(characters, all turns\) is \d+, over the limit of 50 \(set PSYDEF_MAX_DIALOGUE_CHARS")


def test_predict_input_with_a_missing_column(store, data_dir, tmp_path):
    path = data_dir / "test.json"
    _write(path, [{k: v for k, v in record.items() if k != "current_text"} for record in json.loads(path.read_text())])
    _refused(store, ["predict", "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "out")],
             re.escape(str(path)) + r": record 0 \(id 'test_00000'\): missing field 'current_text'")


# ---- predict's outputs: checked up front, never half-written, never stale under the current names ----
def _predict(store, data, out_dir):
    return CliRunner().invoke(cli, ["predict", "--data-dir", str(data), "--out-dir", str(out_dir),
                                    "--tracking-uri", store.uri, "--experiment-name", store.experiment])


def _predict_runs(store) -> int:
    client = MlflowClient(store.uri)
    experiment = client.get_experiment_by_name(store.experiment).experiment_id
    return len(client.search_runs([experiment], f"tags.`{tracking.STAGE}` = '{tracking.PREDICT}'"))


def _outputs(out_dir):
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


def _stop_predicting(monkeypatch):
    """The model fails on its first chunk (as a predict killed mid-way stops)."""
    class Failing:
        def predict(self, rows):
            raise ValueError("stopped while predicting")
    monkeypatch.setattr(tracking, "load_model", lambda uri: Failing())


def _stop_writing_the_zip(monkeypatch):
    import zipfile

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(zipfile, "ZipFile", full)


@pytest.mark.parametrize("stop", [_stop_predicting, _stop_writing_the_zip], ids=["while predicting", "while zipping"])
def test_a_failed_predict_leaves_no_current_output_and_the_previous_pair_intact(store, data_dir, tmp_path,
                                                                               monkeypatch, stop):
    import zipfile

    out_dir = tmp_path / "out"
    small = tmp_path / "small.json"  # the previous predict labelled another, smaller input
    small.write_text(json.dumps(json.loads((data_dir / "test.json").read_text())[:3]))
    assert _predict(store, small, out_dir).exit_code == 0
    previous = _outputs(out_dir)
    assert set(previous) == {tracking.PREDICTION_JSON, tracking.PREDICTION_ZIP}

    with monkeypatch.context() as patched:
        stop(patched)
        result = _predict(store, data_dir, out_dir)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    aside = {"prediction.previous.json": previous[tracking.PREDICTION_JSON],
             "prediction.previous.zip": previous[tracking.PREDICTION_ZIP]}
    assert _outputs(out_dir) == aside  # nothing under the current names, no temporary left
    with zipfile.ZipFile(out_dir / "prediction.previous.zip") as archive:  # the pair is consistent
        assert archive.read(tracking.PREDICTION_JSON) == aside["prediction.previous.json"]
    assert len(json.loads(aside["prediction.previous.json"])) == 3

    assert _predict(store, data_dir, out_dir).exit_code == 0  # the next complete predict replaces the set-aside pair
    now = _outputs(out_dir)
    assert set(now) == {tracking.PREDICTION_JSON, tracking.PREDICTION_ZIP}
    assert len(json.loads(now[tracking.PREDICTION_JSON])) == 8
    with zipfile.ZipFile(out_dir / tracking.PREDICTION_ZIP) as archive:
        assert archive.read(tracking.PREDICTION_JSON) == now[tracking.PREDICTION_JSON]


def _a_file(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    return tmp_path / "taken", r"--out-dir .*taken: is a file, not a folder"


def _under_a_file(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    return tmp_path / "taken" / "out", r"--out-dir .*taken/out: cannot write there \(Not a directory\)"


def _read_only(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes in a read-only folder")
    (tmp_path / "ro").mkdir(mode=0o555)
    return tmp_path / "ro", r"--out-dir .*ro: cannot write there \(Permission denied\)"


@pytest.mark.parametrize("bad", [_a_file, _under_a_file, _read_only], ids=["a file", "under a file", "read-only"])
@pytest.mark.parametrize("command", ["predict", "main"])
def test_a_bad_out_dir_is_refused_before_the_model_is_loaded(store, data_dir, tmp_path, monkeypatch, bad, command):
    out_dir, message = bad(tmp_path)

    def never(*args, **kwargs):
        raise AssertionError("reached the model or a stage")
    for name in ("load_model", "resolve_model_uri", "stage_run"):
        monkeypatch.setattr(tracking, name, never)
    options = ["--seeds", "5", "--members", "minilm"] if command == "main" else []
    before = _predict_runs(store)
    _refused(store, [command, "--data-dir", str(data_dir), "--out-dir", str(out_dir), *options], message)
    assert _predict_runs(store) == before
