"""The tune stage against fake train parent runs and a fake prepare run in a temporary SQLite store."""
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from psydef import tracking
from psydef.calibration.rule import EnsembleSpec
from psydef.calibration.score import macro_f1
from psydef.calibration.storage import load_study
from psydef.calibration.study import interactive_plots
from psydef.stages import tune as tune_stage
from psydef.stages.config import MemberSpec, TuneConfig
from psydef.stages.tune import align_members, load_oof, pick_train_runs
from tests.fixtures.fake_runs import Store, oof_problem as problem

REPO = Path(__file__).resolve().parents[1]
FAST = dict(n_trials=40, sampler="random", inner_trials=16)


def run_tune(train_runs, **settings):
    """The tune stage in the store's experiment (the one the ``store`` fixture set)."""
    return tune_stage.run_tune(TuneConfig(train_runs=tuple(train_runs or ()), **settings),
                               experiment_id=tracking.configure())


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory):
    """An MLflow SQLite store with its tables made once: creating them takes seconds, copying the file not."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, empty_db):
    shutil.copy(empty_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tune-test")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # mlflow.set_experiment sets it; undone after the test
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    MlflowClient(uri).create_experiment("tune-test", artifact_location=str(tmp_path / "artifacts"))
    return Store(tmp_path, tracking.configure())


def decoded_f1(tune_run_id):
    """The chosen rule's OOF macro-F1 from ensemble.json alone (plus the members' logged OOF logits)."""
    spec = EnsembleSpec.from_dict(mlflow.artifacts.load_dict(tracking.artifact_uri(tune_run_id, tracking.ENSEMBLE_JSON)))
    oof = load_oof(spec.run_ids)
    return macro_f1(oof.y, spec.decode_logits(oof.logits))


def chosen_f1(run):
    """The logged in-sample OOF macro-F1 of the rule the tune run chose."""
    calibrated = run.data.tags[tracking.CALIBRATION] == tracking.CALIBRATED
    return run.data.metrics[tracking.CALIBRATED_F1 if calibrated else tracking.RAW_F1]


def test_auto_pick_takes_the_latest_finished_run_of_each_member_and_seed_sharing_the_data_digest(store, caplog):
    caplog.set_level(logging.INFO, logger="psydef")
    prep = store.prepare()
    store.train(prep, 1)  # superseded by the newer seed-1 run
    seed_2 = store.train(prep, 2)
    store.train(prep, 3, backbone="qwen3-8b-qlora")  # another backbone
    store.train(prep, 4, digest="digest-b")  # other data
    seed_1 = store.train(prep, 1)
    store.train(prep, 5, status="FAILED")
    store.train(prep, 6, status="RUNNING")
    assert [r.info.run_id for r in pick_train_runs(store.experiment_id)] == [seed_1, seed_2]
    assert f"{seed_1} (minilm, seed 1), {seed_2} (minilm, seed 2)" in caplog.text

    vote = store.train(store.prepare(partition=1), 1, member="minilm:combine=vote")  # another member, other folds
    assert [r.info.run_id for r in pick_train_runs(store.experiment_id)] == [vote]  # the newest's member decides
    both = (MemberSpec("minilm"), MemberSpec("minilm", {"combine": "vote"}))
    assert [r.info.run_id for r in pick_train_runs(store.experiment_id, both)] == [vote, seed_1, seed_2]
    with pytest.raises(ValueError, match=r"no FINISHED train run of member\(s\) minilm:C=2.0 with data digest digest-a"):
        pick_train_runs(store.experiment_id, (MemberSpec("minilm", {"C": 2.0}), MemberSpec("minilm")))

    store.train(prep, 3, backbone="qwen3-8b-qlora")  # now the newest: its digest and member decide
    assert [r.data.tags[tracking.SEED] for r in pick_train_runs(store.experiment_id)] == ["3"]


def test_tune_blends_members_of_different_fold_partitions_aligned_by_record_id(store):
    """Two members of one data digest on two prepare runs whose folds differ, each with its OOF rows in its
    own order: the plain blend tune logs is the equal-weight blend of the rows matched by record id."""
    from psydef.calibration.rule import softmax

    first, second = store.prepare(), store.prepare(partition=7)
    folds = [tune_stage.load_folds(p).set_index("id")["fold"] for p in (first, second)]
    assert (folds[0] != folds[1].loc[folds[0].index]).any()  # two partitions
    members = [store.train(first, 1), store.train(second, 2, member="minilm:combine=vote")]
    tune_id = run_tune(members, **FAST)
    by_id = []
    for run_id in members:
        ids = mlflow.artifacts.load_dict(tracking.artifact_uri(run_id, tracking.OOF_IDS))
        by_id.append(pd.DataFrame(tracking.load_npy(run_id, tracking.OOF_LOGITS), index=ids).loc[store.ids].to_numpy())
    assert [m["member"] for m in mlflow.artifacts.load_dict(
        tracking.artifact_uri(tune_id, tracking.ENSEMBLE_JSON))["members"]] == ["minilm", "minilm:combine=vote"]
    plain = np.mean([softmax(logits.astype(np.float64)) for logits in by_id], axis=0).argmax(1)
    assert mlflow.get_run(tune_id).data.metrics[tracking.RAW_F1] == pytest.approx(macro_f1(store.y, plain), abs=1e-12)


def test_tune_logs_metrics_artifacts_and_an_ensemble_that_reproduces_the_calibrated_f1(store, caplog):
    caplog.set_level(logging.INFO, logger="psydef")
    prep = store.prepare()
    members = [store.train(prep, 1), store.train(prep, 2)]
    tune_id = run_tune(None, n_trials=48, sampler="tpe", gate=True, seed=0, storage=None, study_name=None,
                       inner_trials=48)
    run = mlflow.get_run(tune_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.STAGE] == tracking.TUNE
    assert run.data.tags[tracking.MEMBER_RUN_IDS] == ",".join(reversed(members))  # newest first
    assert (run.data.tags[tracking.DATA_DIGEST], run.data.tags[tracking.BACKBONE]) == ("digest-a", "minilm")
    assert run.data.params["n_trials"] == "48" and run.data.params["sampler"] == "tpe"
    assert (run.data.params["estimate_repeats"], run.data.params["estimate_splits"]) == ("2", "5")
    metrics = run.data.metrics
    assert {tracking.RAW_F1, tracking.CALIBRATED_F1, tracking.CALIBRATED_ESTIMATED_F1, tracking.ESTIMATED_GAIN,
            tracking.ESTIMATED_GAIN_STD, tracking.ESTIMATED_F1, *(f"oof_f1_level_{c}" for c in range(9))} <= set(metrics)
    assert metrics[tracking.CALIBRATED_F1] > metrics[tracking.RAW_F1]
    # The majority bias of these members is worth correcting: the calibrated rule is chosen.
    assert metrics[tracking.ESTIMATED_GAIN] > 0 and run.data.tags[tracking.CALIBRATION] == tracking.CALIBRATED
    assert metrics[tracking.ESTIMATED_F1] == metrics[tracking.CALIBRATED_ESTIMATED_F1] == pytest.approx(
        metrics[tracking.RAW_F1] + metrics[tracking.ESTIMATED_GAIN])
    assert metrics[tracking.CALIBRATED_F1] == pytest.approx(np.mean([metrics[f"oof_f1_level_{c}"]
                                                                      for c in range(1, 9)]))
    note = run.data.tags[tracking.NOTE]
    assert "Chosen rule: calibrated" in note and f"{metrics[tracking.ESTIMATED_GAIN]:+.4f}" in note

    raw = mlflow.artifacts.load_dict(tracking.artifact_uri(tune_id, tracking.ENSEMBLE_JSON))
    assert [m["backbone"] for m in raw["members"]] == ["minilm", "minilm"]
    assert raw["data_digest"] == "digest-a" and raw["tau7"] is not None
    assert raw["metrics"] == metrics
    assert decoded_f1(tune_id) == metrics[tracking.CALIBRATED_F1]  # exactly

    with tempfile.TemporaryDirectory() as tmp:
        trials = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=tune_id, artifact_path=tracking.TRIALS_CSV,
                                                                 dst_path=tmp))
    assert len(trials) == 48 and trials["value"].max() == metrics[tracking.CALIBRATED_F1]
    plots = {f.path for f in MlflowClient().list_artifacts(tune_id, "plots")}
    interactive = {tracking.HISTORY_HTML, tracking.IMPORTANCE_HTML} if interactive_plots() else set()
    assert plots == {tracking.HISTORY_PLOT, tracking.IMPORTANCE_PLOT, tracking.CONFUSION_PLOT, *interactive}
    for path in interactive:  # plotly.js inside: the plot opens without network
        html = mlflow.artifacts.load_text(tracking.artifact_uri(tune_id, path))
        assert "<html>" in html[:100] and 'src="https://cdn.plot.ly' not in html and "Plotly.newPlot" in html

    out = caplog.text
    assert f"tune run {tune_id}" in out and "is positive: the calibrated rule is kept" in out


def test_tune_keeps_the_plain_blend_when_calibration_is_not_estimated_to_gain(store):
    prep = store.prepare()
    members = [store.train(prep, 1, signal=10.0), store.train(prep, 2, signal=10.0)]  # perfect already
    tune_id = run_tune(members, **FAST)
    run = mlflow.get_run(tune_id)
    metrics = run.data.metrics
    assert metrics[tracking.RAW_F1] == 1.0 and metrics[tracking.ESTIMATED_GAIN] <= 0
    assert run.data.tags[tracking.CALIBRATION] == tracking.PLAIN
    assert metrics[tracking.ESTIMATED_F1] == metrics[tracking.RAW_F1]
    assert "Chosen rule: plain" in run.data.tags[tracking.NOTE]
    spec = EnsembleSpec.from_dict(mlflow.artifacts.load_dict(tracking.artifact_uri(tune_id, tracking.ENSEMBLE_JSON)))
    assert spec == EnsembleSpec.plain(members, data_digest="digest-a", metrics=metrics)
    assert decoded_f1(tune_id) == metrics[tracking.RAW_F1]


def test_refuses_bad_members_with_a_clear_message_and_leaves_no_tune_run(store):
    prep = store.prepare()
    good = store.train(prep, 1)
    bad = {
        "have different OOF ids": store.train(prep, 2, ids=store.ids[:-5] + ["stray_1"]),
        "trained on different data": store.train(prep, 2, digest="digest-b"),
        "has no OOF logits": store.train(prep, 2, logits=False),
        "does not exist": "0123456789abcdef0123456789abcdef",
        "is FAILED, not FINISHED": store.train(prep, 2, status="FAILED"),
        r"no complete fold run for folds \[3, 4\]": store.train(prep, 2, complete_folds=3),
        "is not a train run": prep,
        "listed more than once": good,
    }
    for message, run_id in bad.items():
        with pytest.raises(ValueError, match=message) as err:
            run_tune([good, run_id], **FAST)
        assert run_id in str(err.value)  # names the run at fault
    assert store.tune_runs() == []


def test_no_train_run_is_a_clear_error(store):
    with pytest.raises(ValueError, match="no FINISHED train run in experiment 'tune-test'"):
        run_tune(None, **FAST)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_stored_study_is_resumed_up_to_n_trials(store, kind):
    prep = store.prepare()
    members = [store.train(prep, 1), store.train(prep, 2)]
    storage = f"sqlite:///{store.tmp_path}/optuna.db" if kind == "sqlite" else str(store.tmp_path / "optuna.journal")
    first = run_tune(members, storage=storage, study_name=None, seed=0, gate=True,
                     **{**FAST, "sampler": "tpe", "n_trials": 16})
    second = run_tune(members, storage=storage, study_name=None, seed=1, gate=True,
                      **{**FAST, "sampler": "tpe", "n_trials": 40})
    study = load_study(storage, mlflow.get_run(second).data.tags[tracking.STUDY_NAME])
    assert len(study.trials) == 40
    assert mlflow.get_run(second).data.metrics[tracking.CALIBRATED_F1] == study.best_value
    assert study.best_value >= mlflow.get_run(first).data.metrics[tracking.CALIBRATED_F1]
    assert decoded_f1(second) == chosen_f1(mlflow.get_run(second))


def test_two_tune_processes_share_one_study(store):
    prep = store.prepare()
    members = ",".join([store.train(prep, 1), store.train(prep, 2)])
    storage = str(store.tmp_path / "optuna.journal")  # SQLite is tested above and costs ~70 ms a trial here
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "entrypoints", "tune", "--train-runs", members, "--n-trials", "64",
                               "--sampler", "tpe", "--seed", str(seed), "--storage", storage, "--inner-trials", "8"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for seed in (1, 2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs

    runs = store.tune_runs()
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    study = load_study(storage, runs[0].data.tags[tracking.STUDY_NAME])
    assert len(study.trials) == 64 and all(t.state.name == "COMPLETE" for t in study.trials)
    for run in runs:
        assert decoded_f1(run.info.run_id) == chosen_f1(run)


def test_align_members_reorders_by_id():
    logits, _, _ = problem(n=6)
    ids = ["d1_u1", "d1_u2", "d2_u1", "d2_u2", "d3_u1", "d3_u2"]
    order = [3, 0, 5, 1, 4, 2]
    out_ids, aligned = align_members([("run_a", ids, logits[0]), ("run_b", [ids[i] for i in order], logits[1][order])])
    assert out_ids == ids
    np.testing.assert_array_equal(aligned[0], logits[0])
    np.testing.assert_array_equal(aligned[1], logits[1])


def test_align_members_refuses_different_id_sets():
    ids = [f"u{i}" for i in range(5)]
    with pytest.raises(ValueError, match=r"run_a and run_b .* 2 of run_a's ids are missing from run_b "
                                                   r"and 1 of run_b's are not in run_a"):
        align_members([("run_a", ids, np.zeros((5, 9))), ("run_b", ids[:3] + ["x"], np.zeros((4, 9)))])
    with pytest.raises(ValueError, match="run_b has 1 duplicate"):
        align_members([("run_a", ids, np.zeros((5, 9))), ("run_b", ids + ["u0"], np.zeros((6, 9)))])


def test_align_members_refuses_missing_or_malformed_logits():
    ids = ["a", "b"]
    with pytest.raises(ValueError, match="run_b has no OOF logits"):
        align_members([("run_a", ids, np.zeros((2, 9))), ("run_b", ids, None)])
    with pytest.raises(ValueError, match=r"run_a's OOF logits .* shape \(2, 9\)"):
        align_members([("run_a", ids, np.zeros((2, 8)))])


# --- search space --------------------------------------------------------------------------------
