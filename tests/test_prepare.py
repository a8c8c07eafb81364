import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from psydef import tracking
from psydef.stages.config import PrepareConfig
from psydef.stages.prepare import load_prepared, run_prepare

REPO = Path(__file__).resolve().parents[1]


def _artifacts(run_id, path=None):
    return {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, path)}


def test_prepare_logs_dataset_folds_variants_and_plot(data_dir, tracking_uri):
    prepared = run_prepare(PrepareConfig(data_dir=data_dir, seed=7))
    run = mlflow.get_run(prepared.run_id)
    assert run.info.status == "FINISHED"
    assert mlflow.get_experiment(run.info.experiment_id).name == tracking.DEFAULT_EXPERIMENT
    assert run.data.tags[tracking.STAGE] == tracking.PREPARE
    assert run.data.tags[tracking.DATA_DIGEST] == prepared.digest
    assert run.data.metrics["n_records"] == 60 and run.data.metrics["n_dialogues"] == 15
    assert run.data.metrics["leaked_dialogues"] == 0
    assert run.data.metrics["n_augmented"] == len(prepared.augmented) > 0
    assert run.data.params["seed"] == "7" and run.data.params["group_by"] == "dialogue"
    assert {tracking.FOLDS_CSV, tracking.AUGMENTED_JSON, "plots"} <= _artifacts(prepared.run_id)
    assert _artifacts(prepared.run_id, "plots") == {tracking.CLASS_PLOT}
    datasets = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
    assert datasets["psydefconv-train"] == prepared.digest and "psydefconv-test" in datasets

    loaded = load_prepared(prepared.run_id, data_dir)
    pd.testing.assert_frame_equal(loaded.folds, prepared.folds, check_dtype=False)
    assert list(loaded.augmented["id"]) == list(prepared.augmented["id"])
    assert loaded.augmented["dialogue"].tolist() == prepared.augmented["dialogue"].tolist()


def test_load_prepared_refuses_unknown_runs_and_other_data(data_dir, tracking_uri, tmp_path):
    prepared = run_prepare(PrepareConfig(data_dir=data_dir))
    with pytest.raises(ValueError, match="prepare run 'nope' does not exist"):
        load_prepared("nope", data_dir)
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.json").write_text((data_dir / "train.json").read_text().replace('"label": 3', '"label": 4', 1))
    with pytest.raises(ValueError, match="has digest .* run prepare on this data"):
        load_prepared(prepared.run_id, other)


def test_mlflow_run_prepare_entry_point(data_dir, tracking_uri):
    """The MLproject entry point, as a user runs it (no conda: --env-manager local)."""
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "prepare", "-P", f"data_dir={data_dir}",
         "-P", "seed=3", "--env-manager", "local", "--experiment-name", "psydef"],
        capture_output=True, text=True, timeout=300,
        env={**{k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"},
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})  # `python` = this one
    assert result.returncode == 0, result.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["psydef"], output_format="list")
    assert len(runs) == 1 and runs[0].data.tags[tracking.STAGE] == tracking.PREPARE
    assert runs[0].data.params["seed"] == "3" and runs[0].data.metrics["n_records"] == 60


def test_mlflow_run_keeps_two_sqlite_stores_artifacts_apart(data_dir, tmp_path):
    """README command 1 with sqlite:///a.db, then sqlite:///b.db, in one folder: `mlflow run` creates each
    store's experiment with MLflow's default root ./mlruns/1 before psydef starts; psydef gives it the
    store's own (mlruns/a, mlruns/b)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
           "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    locations = {}
    for store in ("a", "b"):
        uri = f"sqlite:///{tmp_path}/{store}.db"
        result = subprocess.run(
            [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "prepare", "-P", f"data_dir={data_dir}",
             "--env-manager", "local", "--experiment-name", "psydef"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env | {"MLFLOW_TRACKING_URI": uri})
        assert result.returncode == 0, result.stderr[-3000:]
        client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name("psydef")
        [run] = client.search_runs([experiment.experiment_id])
        locations[store] = (experiment.artifact_location, run.info.artifact_uri)
        assert {f.path for f in client.list_artifacts(run.info.run_id)} >= {tracking.FOLDS_CSV}
        assert run.info.artifact_uri == f"{tracking.sqlite_artifact_root(uri)}/{run.info.run_id}/artifacts"
        assert (tmp_path / "mlruns" / store / run.info.run_id / "artifacts" / tracking.FOLDS_CSV).is_file()
    assert locations["a"][0] != locations["b"][0]
    assert not list((tmp_path / "mlruns").glob(f"[0-9]*/**/{tracking.FOLDS_CSV}"))  # nothing in MLflow's default


def test_prepare_on_the_real_data(real_data_dir, tracking_uri):
    prepared = run_prepare(PrepareConfig(data_dir=real_data_dir, seed=42))
    metrics = mlflow.get_run(prepared.run_id).data.metrics
    assert metrics["n_records"] == 1864 and metrics["n_dialogues"] == 200
    assert prepared.folds["fold"].nunique() == 5 and metrics["leaked_dialogues"] == 0
    sources = prepared.train["label"].value_counts()
    for level in (2, 3, 4, 5, 8):
        assert 2.5 * sources[level] <= metrics[f"n_augmented_level_{level}"] <= 3 * sources[level]
    assert metrics["n_augmented"] == sum(metrics[f"n_augmented_level_{c}"] for c in (2, 3, 4, 5, 8))
