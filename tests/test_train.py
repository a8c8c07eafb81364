import threading

import mlflow
import numpy as np
import pytest

from psydef import tracking
from psydef.backbones import load_adapter
from psydef.calibration.rule import softmax
from psydef.core.metrics import evaluate
from psydef.stages.config import PrepareConfig, TrainConfig
from psydef.stages.prepare import run_prepare
from psydef.stages.train import run_train

MONITOR_THREAD = "SystemMetricsMonitor"  # MLflow's name for its sampling thread
FAST = {"char_ngrams": False, "max_length": 32}  # the CPU default on short encoder inputs


@pytest.fixture
def train(data_dir, prepared, experiment_id):
    """``run_train`` on the ``prepared`` folds with the minilm backbone and ``FAST`` settings, read
    from the prepare run (or, ``in_memory``, handed over as ``main`` does)."""
    def train(in_memory=False, **settings):
        settings = {"data_dir": data_dir, "prepare_run_id": prepared.run_id, "backbone": "minilm", "hyper": FAST,
                    **settings}
        return run_train(TrainConfig(**settings), experiment_id=experiment_id, prepared=prepared if in_memory else None)
    return train


def _oof(run_id):
    return (mlflow.artifacts.load_dict(tracking.artifact_uri(run_id, tracking.OOF_IDS)),
            tracking.load_npy(run_id, tracking.OOF_LOGITS))


def _artifacts(run_id, path=None):
    return {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, path)}


@pytest.fixture
def prepared(data_dir, tracking_uri):
    return run_prepare(PrepareConfig(data_dir=data_dir, seed=5))


def test_train_logs_fold_runs_and_parent_oof(train, prepared, tmp_path):
    parent_id = train(seed=5)
    parent = mlflow.get_run(parent_id)
    member = "minilm:char_ngrams=false,max_length=32"  # FAST, canonical
    assert parent.info.status == "FINISHED" and parent.info.run_name == f"train seed=5 {member}"
    tags = parent.data.tags
    assert (tags[tracking.STAGE], tags[tracking.SEED], tags[tracking.BACKBONE]) == ("train", "5", "minilm")
    assert tags[tracking.MEMBER] == member
    assert tags[tracking.DATA_DIGEST] == prepared.digest and tags[tracking.PREPARE_RUN_ID] == prepared.run_id

    folds = tracking.fold_runs(parent_id)
    assert sorted(folds) == [0, 1, 2, 3, 4]
    real_ids = set(prepared.train["id"])
    for k, run in folds.items():
        assert {tracking.OOF_IDS, tracking.OOF_LOGITS} <= _artifacts(run.info.run_id, "oof")
        assert {tracking.TEST_IDS, tracking.TEST_LOGITS} <= _artifacts(run.info.run_id, "test")
        ids, logits = _oof(run.info.run_id)
        assert logits.dtype == np.float32 and logits.shape == (len(ids), 9)
        assert set(ids) <= real_ids  # real records only, never augmented variants
        assert set(ids) == set(prepared.folds.query("fold == @k and not is_augmented")["id"])
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")
        assert [m.step for m in history] == [1]  # one fit, reported as one epoch
        assert "val_macro_f1" in run.data.metrics and run.data.params["max_length"] == "32"
        # a fold of seconds still has its system metrics (a sample at its end), from MLflow's monitor
        assert {tracking.SYSTEM_CPU, tracking.SYSTEM_MEMORY} <= set(run.data.metrics)
        # the adapter is loadable on its own and gives the logged logits
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="adapter",
                                                    dst_path=str(tmp_path / f"adapter{k}"))
        rows = prepared.train.set_index("id").loc[ids].reset_index()
        np.testing.assert_array_equal(load_adapter(local).predict_logits(rows), logits)

    ids, logits = _oof(parent_id)
    assert sorted(ids) == sorted(real_ids) and len(ids) == len(real_ids)  # each real record once
    y = prepared.train.set_index("id").loc[ids, "label"].to_numpy()
    scores = evaluate(y, logits.argmax(1))
    metrics = parent.data.metrics
    assert metrics["oof_macro_f1"] == pytest.approx(scores["macro_f1"], abs=1e-12)
    assert metrics["oof_macro_f1_all"] == pytest.approx(scores["macro_f1_all"], abs=1e-12)
    assert metrics["oof_accuracy"] == pytest.approx(scores["accuracy"], abs=1e-12)
    assert all(f"oof_f1_level_{c}" in metrics for c in range(9))
    assert _artifacts(parent_id, "plots") == {tracking.CONFUSION_PLOT, tracking.PER_CLASS_F1_PLOT}
    assert not [t for t in threading.enumerate() if t.name == MONITOR_THREAD]  # every fold's monitor stopped
    test_probs = tracking.load_npy(parent_id, tracking.TEST_PROBS)
    expected = np.mean([softmax(tracking.load_npy(r.info.run_id, tracking.TEST_LOGITS)) for r in folds.values()], axis=0)
    np.testing.assert_allclose(test_probs, expected, rtol=1e-6)
    assert mlflow.artifacts.load_dict(tracking.artifact_uri(parent_id, tracking.TEST_IDS)) == list(prepared.test["id"])


def test_system_metrics_sample_a_run_shorter_than_the_interval_and_can_be_turned_off(tracking_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "3600")  # MLflow's thread would log nothing
    with mlflow.start_run() as run, tracking.system_metrics(run.info.run_id):
        assert [t for t in threading.enumerate() if t.name == MONITOR_THREAD]
    assert not [t for t in threading.enumerate() if t.name == MONITOR_THREAD]  # stopped and joined
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, tracking.SYSTEM_MEMORY)
    # the sample the thread held back (unless it had not taken one yet), then the one taken at the end
    assert [m.step for m in history] in ([0], [0, 1]) and all(m.value > 0 for m in history)
    assert tracking.SYSTEM_CPU in mlflow.get_run(run.info.run_id).data.metrics
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    with mlflow.start_run() as off, tracking.system_metrics(off.info.run_id):
        pass
    assert not mlflow.get_run(off.info.run_id).data.metrics


def test_same_seed_gives_bit_identical_oof_and_resume_trains_only_missing_folds(train, prepared):
    reference = train(seed=5)
    # An interrupted run: folds 0 and 1 done, fold 2 killed mid-way (left RUNNING, no finished tag).
    partial = None
    for k in (0, 1):
        partial = train(seed=6, fold=k, parent_run_id=partial)
    done_before = {k: r.info.run_id for k, r in tracking.fold_runs(partial).items()}
    assert sorted(done_before) == [0, 1] and mlflow.get_run(partial).info.status == "RUNNING"
    killed = mlflow.MlflowClient().create_run(mlflow.get_run(partial).info.experiment_id, tags={
        tracking.PARENT_RUN_ID: partial, tracking.STAGE: tracking.FOLD_RUN, tracking.FOLD: "2"})

    resumed = train(seed=6, resume=True)
    assert resumed == partial
    assert mlflow.get_run(killed.info.run_id).info.status == "FAILED"
    after = {k: r.info.run_id for k, r in tracking.fold_runs(partial).items()}
    assert sorted(after) == [0, 1, 2, 3, 4] and all(after[k] == done_before[k] for k in (0, 1))
    assert mlflow.get_run(partial).info.status == "FINISHED"

    again = train(seed=5, in_memory=True)  # as main trains: on the prepare stage's tables, not re-read
    ids_a, logits_a = _oof(reference)
    ids_b, logits_b = _oof(again)
    assert ids_a == ids_b and np.array_equal(logits_a, logits_b)  # bit-identical for one seed
    for artifact in (tracking.TEST_PROBS, tracking.OOF_LOGITS):
        assert np.array_equal(tracking.load_npy(reference, artifact), tracking.load_npy(again, artifact))
    ids_c, logits_c = _oof(resumed)
    # The CPU default's fit ignores the seed: the resumed seed-6 run, trained fold by fold, equals seed 5.
    assert ids_c == ids_a and np.array_equal(logits_a, logits_c)


def test_bad_input_fails_cleanly(train):
    with pytest.raises(ValueError, match="prepare run 'missing' does not exist"):
        train(seed=5, prepare_run_id="missing")
    with pytest.raises(ValueError, match="--fold: 9 is out of range"):
        train(seed=5, fold=9)
    # Nothing half-made for later steps: neither check left a train run behind.
    assert not mlflow.search_runs(filter_string=f"tags.`{tracking.STAGE}` = 'train'", output_format="list")


def test_aggregate_refuses_fold_runs_whose_oof_rows_are_not_their_folds(train, data_dir):
    """Each OOF row must come from the fold model that never saw it: fold runs trained on one partition
    do not aggregate on another's folds."""
    from psydef.stages.train import aggregate

    parent_id = train(seed=5)
    other = run_prepare(PrepareConfig(data_dir=data_dir, seed=6))  # another partition of the same records
    with pytest.raises(ValueError, match=rf"fold run \w+ \(fold 0 of train run {parent_id}\): its OOF ids are not the "
                                         rf"real records of fold 0 of prepare run {other.run_id} \(\d+ of fold 0's"):
        aggregate(parent_id, other)
