"""register -> promote -> load by alias -> predict / serve, on a tiny ensemble of MiniLM members built
by the train contract (a train parent per seed, FINISHED fold runs with ``adapter/``) in a temporary
SQLite tracking store: tests/fixtures/stores.py: ``registry_store`` and ``champion``."""
import json
import zipfile

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from psydef import tracking
from psydef.backbones import load_adapter
from psydef.calibration.rule import EnsembleSpec, blend, softmax
from psydef.cli import cli
from psydef.core.labels import PROB_COLUMNS
from psydef.stages.config import PromoteConfig, RegisterConfig
from psydef.stages.promote import PromotionRefused, run_promote
from psydef.stages.register import run_register
from tests.fixtures.records import ensemble_rows
from tests.fixtures.server import post_json, served_model
from tests.fixtures.stores import tune_metrics

NAME = tracking.MODEL_NAME


@pytest.fixture(scope="module")
def store(registry_store):
    """The registered tiny ensemble's store (tests/fixtures/stores.py: ``registry_store``, ``champion``)."""
    return registry_store


def _production() -> str:
    return MlflowClient().get_model_version_by_alias(NAME, tracking.PRODUCTION).version


def _direct_decode(tune_run_id: str, rows):
    """Labels and probabilities decoded straight from ensemble.json and each member's fold adapters."""
    spec = EnsembleSpec.from_dict(mlflow.artifacts.load_dict(tracking.artifact_uri(tune_run_id, tracking.ENSEMBLE_JSON)))
    client = MlflowClient()
    logits = []
    for run_id in spec.run_ids:
        folds = client.search_runs([client.get_run(run_id).info.experiment_id],
                                   f"tags.`{tracking.PARENT_RUN_ID}` = '{run_id}'")
        adapters = [load_adapter(mlflow.artifacts.download_artifacts(run_id=f.info.run_id,
                                                                      artifact_path=tracking.ADAPTER_DIR))
                    for f in folds]
        logits.append(np.log(np.mean([softmax(a.predict_logits(rows)) for a in adapters], axis=0)))
    return spec.decode_logits(logits), blend(logits, spec.weights)


def test_register_tags_lineage_and_links_the_tune_metrics_to_the_logged_model(store, champion):
    tags = champion.tags
    assert tags[tracking.V_TUNE_RUN_ID] == store.tune.good
    assert tags[tracking.V_TRAIN_RUN_IDS] == ",".join(store.members)
    assert tags[tracking.V_DATA_DIGEST] == "digest0"
    assert tags[tracking.V_BACKBONE] == "minilm"
    assert tracking.GATE_METRIC not in tags  # the scores are the logged model's metrics, not strings
    expected = tune_metrics(0.4)
    assert tracking.version_metrics(champion) == expected  # every tune metric, exactly as tune logged it
    run = mlflow.get_run(champion.run_id)
    assert run.data.tags[tracking.STAGE] == tracking.REGISTER
    assert run.data.metrics == expected  # the register run shows them too
    # the experiment's Models tab filters and sorts logged models by them
    found = MlflowClient().search_logged_models([run.info.experiment_id],
                                                filter_string=f"metrics.{tracking.GATE_METRIC} > 0.35")
    assert [model.model_uri for model in found] == [champion.source]


def test_production_alias_predicts_like_direct_decoding(store, champion):
    assert _production() == champion.version
    rows = ensemble_rows(20, labelled=False)
    out = mlflow.pyfunc.load_model(tracking.PRODUCTION_URI).predict(rows[["id", "dialogue", "current_text"]])
    labels, probs = _direct_decode(store.tune.good, rows)
    assert list(out.columns) == ["id", "label", *PROB_COLUMNS]
    assert list(out["id"]) == list(rows["id"])
    np.testing.assert_array_equal(out["label"].to_numpy(), labels)
    np.testing.assert_allclose(out[list(PROB_COLUMNS)].to_numpy(), probs, rtol=0, atol=1e-12)
    # the dialogue may also come as its JSON string
    as_json = rows.assign(dialogue=[json.dumps(d) for d in rows["dialogue"]])[["id", "dialogue", "current_text"]]
    np.testing.assert_array_equal(
        mlflow.pyfunc.load_model(tracking.PRODUCTION_URI).predict(as_json)["label"].to_numpy(), labels)


def test_gate_refuses_a_worse_challenger_unless_forced(store, champion):
    client = MlflowClient()
    worse = run_register(RegisterConfig(tune_run=store.tune.worse))
    with pytest.raises(PromotionRefused, match=r"oof_macro_f1_estimated 0\.3 against 0\.4 of production version "
                                               r"1: a gain of -0\.1, where at least 0\.01 \(min_gain\) is needed"):
        run_promote(PromoteConfig(version=int(worse.version)))
    assert _production() == champion.version
    run_promote(PromoteConfig(version=int(worse.version), force=True))
    assert _production() == worse.version
    assert client.get_model_version_by_alias(NAME, tracking.PREVIOUS).version == champion.version
    run_promote(PromoteConfig())  # the newest, already production: nothing moves
    assert _production() == worse.version
    assert client.get_model_version_by_alias(NAME, tracking.PREVIOUS).version == champion.version
    # the better one wins back production (newest is ``worse``: name the version), with the legacy stage
    promoted = run_promote(PromoteConfig(version=int(champion.version), legacy_stage=True))
    assert _production() == champion.version and promoted.current_stage == tracking.LEGACY_STAGE
    assert client.get_model_version_by_alias(NAME, tracking.PREVIOUS).version == worse.version


def _old_style_version(champion, **tags):
    """A version as registered before the scores were the logged model's metrics: the champion's files
    (from their folder, not ``models:/<model id>``), its gate score, if any, only as a tag."""
    client = MlflowClient()
    files = client.get_logged_model(champion.source.removeprefix("models:/")).artifact_location
    return client.create_model_version(NAME, files, champion.run_id, tags=tags)


def test_a_challenger_must_beat_the_champion_by_min_gain(store, champion):
    client = MlflowClient()
    assert _production() == champion.version  # 0.4
    close = run_register(RegisterConfig(tune_run=store.tune.close))  # 0.405 on its logged model
    client.set_model_version_tag(NAME, close.version, tracking.GATE_METRIC, "0.9")  # a stray tag: the metric counts
    with pytest.raises(PromotionRefused, match=r"0\.405 against 0\.4 of production version 1: a gain of \+0\.005, "
                                               r"where at least 0\.01 \(min_gain\) is needed.*--force.*--min-gain"):
        run_promote(PromoteConfig(version=int(close.version)))  # the default margin
    assert _production() == champion.version
    equal = _old_style_version(champion, **{tracking.GATE_METRIC: "0.4"})
    with pytest.raises(PromotionRefused, match=r"a gain of \+0, where more than 0 \(min_gain\) is needed"):
        run_promote(PromoteConfig(version=int(equal.version), min_gain=0))  # an equal score never replaces the champion
    run_promote(PromoteConfig(version=int(close.version), min_gain=0.005))  # exactly the margin
    assert _production() == close.version
    better = _old_style_version(champion, **{tracking.GATE_METRIC: "0.42"})  # gated by its tag
    run_promote(PromoteConfig(version=int(better.version)))  # 0.015 above 0.405
    assert _production() == better.version
    with pytest.raises(ValueError, match=r"has no oof_macro_f1_estimated \(neither on its logged model nor as a tag"):
        run_promote(PromoteConfig(version=int(_old_style_version(champion).version)))
    run_promote(PromoteConfig(version=int(equal.version), force=True))  # below the champion: force promotes it anyway
    assert _production() == equal.version
    run_promote(PromoteConfig(version=int(champion.version), force=True))
    assert _production() == champion.version


def test_promote_takes_over_the_run_of_mlflow_run_without_clashing_with_its_params(champion, monkeypatch):
    """Under `mlflow run` the entry point's run exists already (MLFLOW_RUN_ID), its -P values logged."""
    with mlflow.start_run() as run:
        mlflow.log_params({"version": champion.version, "name": NAME, "force": "false", "legacy_stage": "false"})
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    run_promote(PromoteConfig(version=int(champion.version)))
    after = mlflow.get_run(run.info.run_id)
    assert after.data.tags[tracking.STAGE] == tracking.PROMOTE
    assert after.data.params["force"] == "false" and after.data.params["promoted_version"] == str(champion.version)


def test_failures_leave_production_alone(store, champion, monkeypatch):
    production = _production()
    failures = {
        "no alias": (lambda: tracking.resolve_model_uri(f"models:/{NAME}@staging"), "has no alias 'staging'"),
        "no model": (lambda: tracking.resolve_model_uri("models:/no-such-model@production"), "no registered model"),
        "no version": (lambda: run_promote(PromoteConfig(version=999)), "has no version 999"),
        "not a tune run": (lambda: run_register(RegisterConfig(tune_run=store.members[0])), "is not a tune run"),
        "no ensemble.json": (lambda: run_register(RegisterConfig(tune_run=store.tune.no_spec)), "has no ensemble.json"),
        "no adapter": (lambda: run_register(RegisterConfig(tune_run=store.tune.broken_member)), r"fold 1 of train run .* has no adapter/"),
        "no member run": (lambda: run_register(RegisterConfig(tune_run=store.tune.ghost_member)), f"{'0' * 32}' does not exist"),
    }
    for what, (call, message) in failures.items():
        with pytest.raises(ValueError, match=message):
            call()
        assert _production() == production, what
    versions = MlflowClient().search_model_versions(f"name = '{NAME}'")

    def broken_adapters(paths):
        raise OSError(f"cannot read {paths[0]}")

    # a version that cannot load is not promoted, even with force: the model file imports the patched name
    monkeypatch.setattr("psydef.backbones.load_adapters", broken_adapters)
    newest = max(int(v.version) for v in versions)
    with pytest.raises(ValueError, match="failed to (load|predict)"):
        run_promote(PromoteConfig(version=newest, force=True))
    assert _production() == production
    assert len(MlflowClient().search_model_versions(f"name = '{NAME}'")) == len(versions)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.drop(columns="current_text"), r"missing inputs \['current_text'\]"),
    (lambda r: r.assign(dialogue=[[]] * len(r)), r"id 'row_000'.*'dialogue' must be a non-empty list"),
    (lambda r: r.assign(dialogue=[[{"speaker": "therapist", "text": t}] for t in r["current_text"]]),
     r"id 'row_000'.*speaker 'therapist'"),
    (lambda r: r.assign(current_text="something else"), r"id 'row_000'.*differs from 'current_text'"),
    (lambda r: r.assign(dialogue="[not json"), r"id 'row_000'.*'dialogue' is a string but not JSON"),
])
def test_bad_rows_get_clear_errors(champion, change, message):
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/{champion.version}")
    rows = ensemble_rows(3, labelled=False)[["id", "dialogue", "current_text"]]
    with pytest.raises(MlflowException, match=message):
        model.predict(change(rows))


def test_predict_writes_the_codabench_files(store, champion, tmp_path):
    rows = ensemble_rows(18)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    records = rows[["id", "dialogue_id", "dialogue", "current_text", "label"]].to_dict(orient="records")
    (data_dir / "test.json").write_text(json.dumps(records))
    result = CliRunner().invoke(cli, ["predict", "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "out"),
                                      "--tracking-uri", store.uri, "--experiment-name", "registry-test"])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out" / tracking.PREDICTION_JSON).read_text())
    labels, _ = _direct_decode(store.tune.good, rows)
    assert written == [{"id": i, "label": int(y)} for i, y in zip(rows["id"], labels)]
    with zipfile.ZipFile(tmp_path / "out" / tracking.PREDICTION_ZIP) as archive:
        assert archive.namelist() == [tracking.PREDICTION_JSON]
        assert json.loads(archive.read(tracking.PREDICTION_JSON)) == written

    run = mlflow.search_runs(filter_string=f"tags.`{tracking.STAGE}` = '{tracking.PREDICT}'",
                             order_by=["attributes.start_time DESC"], output_format="list")[0]
    assert run.data.params["loaded_model_uri"] == f"models:/{NAME}/{_production()}"
    assert "macro_f1" in run.data.metrics
    logged = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {tracking.PREDICTION_JSON, tracking.PREDICTION_ZIP, tracking.PREDICT_IDS, tracking.PREDICT_PROBS,
            "plots"} <= logged
    np.testing.assert_allclose(tracking.load_npy(run.info.run_id, tracking.PREDICT_PROBS).sum(axis=1), 1, atol=1e-5)


def test_the_stages_chain_into_a_model_that_reproduces_the_train_runs_test_probabilities(store, data_dir, tmp_path):
    """The real prepare -> train (minilm) -> tune -> register -> promote -> predict, under its own
    model name: the served member probabilities are the train run's fold-averaged test/probs.npy."""
    from psydef.stages.config import PredictConfig, PrepareConfig, TrainConfig, TuneConfig
    from psydef.stages.predict import run_predict
    from psydef.stages.prepare import run_prepare
    from psydef.stages.train import run_train
    from psydef.stages.tune import run_tune

    experiment_id = tracking.configure()
    prepared = run_prepare(PrepareConfig(data_dir=data_dir, seed=5))
    train_id = run_train(TrainConfig(data_dir=data_dir, seed=5, prepare_run_id=prepared.run_id, backbone="minilm",
                                     hyper={"char_ngrams": False, "max_length": 32}), experiment_id=experiment_id)
    tune_id = run_tune(TuneConfig(train_runs=(train_id,), n_trials=20, sampler="random", inner_trials=8),
                       experiment_id=experiment_id)
    version = run_register(RegisterConfig(tune_run=tune_id, name="psydef-e2e"))
    run_promote(PromoteConfig(version=int(version.version), name="psydef-e2e"))
    result = run_predict(PredictConfig(data_dir=data_dir, model_uri="models:/psydef-e2e@production", out_dir=tmp_path))

    assert list(result.predictions["id"]) == mlflow.artifacts.load_dict(tracking.artifact_uri(train_id,
                                                                                              tracking.TEST_IDS))
    probs = tracking.load_npy(train_id, tracking.TEST_PROBS)  # float32
    np.testing.assert_allclose(result.predictions[list(PROB_COLUMNS)].to_numpy(), probs, atol=1e-6)
    spec = EnsembleSpec.from_dict(mlflow.artifacts.load_dict(tracking.artifact_uri(tune_id, tracking.ENSEMBLE_JSON)))
    np.testing.assert_array_equal(result.predictions["label"], spec.decode_logits([np.log(probs)]))
    assert json.loads(result.prediction_json.read_text()) == [
        {"id": i, "label": int(y)} for i, y in zip(result.predictions["id"], result.predictions["label"])]


def test_serving_answers_a_request(store, champion, tmp_path):
    # the input limits, set where the model is served
    with served_model(tracking.PRODUCTION_URI, store.uri, tmp_path, env={"PSYDEF_MAX_REQUEST_ROWS": "5"}) as url:
        rows = ensemble_rows(5, labelled=False)[["id", "dialogue", "current_text"]]
        status, answer = post_json(url, {"dataframe_split": rows.to_dict(orient="split", index=False)})
        assert status == 200, answer
        expected = mlflow.pyfunc.load_model(tracking.PRODUCTION_URI).predict(rows)
        assert [p["id"] for p in answer["predictions"]] == list(rows["id"])
        assert [p["label"] for p in answer["predictions"]] == expected["label"].tolist()
        # another process batches the encoder's inputs differently: float32 noise, not another model
        np.testing.assert_allclose([[p[c] for c in PROB_COLUMNS] for p in answer["predictions"]],
                                   expected[list(PROB_COLUMNS)].to_numpy(), atol=1e-5)
        invisible = [{"speaker": "seeker", "text": "\u200b\u200b"}]
        supporter_last = [{"speaker": "seeker", "text": "I failed."}, {"speaker": "supporter", "text": "Oh no."}]
        for bad, field in ((rows.assign(current_text="not the last turn"), "the last dialogue turn differs"),
                           (rows.assign(current_text="\u200b\u200b", dialogue=[invisible] * 5),
                            "field 'current_text' is empty or only whitespace or invisible characters"),
                           (rows.assign(current_text="Oh no.", dialogue=[supporter_last] * 5),
                            "field 'dialogue' ends with a supporter turn")):
            status, answer = post_json(url, {"dataframe_split": bad.to_dict(orient="split", index=False)})
            assert status == 400 and f"record 0 (id 'row_000'): {field}" in answer["message"], answer
        for oversized, message in ((ensemble_rows(6, labelled=False), "the number of rows is 6, over the limit of 5"),
                                   (rows.assign(current_text="x" * 10_001, dialogue=[[{"speaker": "seeker", "text": "x" * 10_001}]] * 5),
                                    "over the limit of 10,000 (set PSYDEF_MAX_UTTERANCE_CHARS")):
            status, answer = post_json(url, {"dataframe_split": oversized[
                ["id", "dialogue", "current_text"]].to_dict(orient="split", index=False)})
            assert status == 400 and message in answer["message"], answer


