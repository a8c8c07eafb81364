"""Integration: the whole `main` chain against a real `mlflow server` (started by
mlruns_config/start_server.sh on 127.0.0.1, artifacts proxied to a local folder), with a SQLite or a
PostgreSQL backend store, checked through the server's REST API (servers: tests/fixtures/server.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

from psydef import tracking
from tests.fixtures.fake_runs import two_tuners_on_one_study
from tests.fixtures.server import REPO, clean_env, group_cmdlines, tail, mlflow_server, postgres_cluster

SEEDS = (1, 2)
N_FOLDS = 5
# The smallest settings that still run every stage: two seeds, 5 folds each, a nested tune.
CHAIN_ARGS = ["--seeds", ",".join(map(str, SEEDS)), "--members", "minilm:char_ngrams=false,max_length=32",
              "--n-trials", "60", "--inner-trials", "20"]
CHAIN_TIMEOUT = 600


# ---- the test ---------------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def server_store(request, tmp_path):
    """``(store_uri, secret)``: a SQLite file in tmp_path, or a database of a private PostgreSQL cluster
    whose password must never show up in logs, argv, params or tags."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/server.db", None
    else:
        with postgres_cluster() as (uri, password):
            yield uri, password


def test_main_chain_through_tracking_server(server_store, data_dir, tmp_path):
    from mlflow import MlflowClient

    store_uri, secret = server_store
    workdir, out_dir = tmp_path / "server", tmp_path / "out"
    workdir.mkdir()
    chain_dir = tmp_path / "chain"  # the chain's working directory: nothing may land here
    chain_dir.mkdir()
    with mlflow_server(store_uri, workdir) as (uri, proc, server_log):
        env = clean_env() | {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": tracking.DEFAULT_EXPERIMENT,
                              "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        chain = subprocess.run([sys.executable, "-m", "entrypoints", "main", "--data-dir", str(data_dir),
                                "--out-dir", str(out_dir), *CHAIN_ARGS],
                               cwd=chain_dir, env=env, capture_output=True, text=True, timeout=CHAIN_TIMEOUT)
        output = chain.stdout + chain.stderr
        assert chain.returncode == 0, f"main failed ({chain.returncode}):\n{output[-6000:]}\nserver:\n{tail(server_log)}"

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        by_stage = defaultdict(list)
        for run in runs:
            by_stage[run.data.tags.get(tracking.STAGE)].append(run)
        assert {stage: len(rs) for stage, rs in by_stage.items()} == {
            tracking.PIPELINE: 1, tracking.PREPARE: len(SEEDS), tracking.TRAIN: len(SEEDS), tracking.FOLD_RUN: len(SEEDS) * N_FOLDS,
            tracking.TUNE: 1, tracking.REGISTER: 1, tracking.PROMOTE: 1, tracking.PREDICT: 1}
        assert {run.info.status for run in runs} == {"FINISHED"}
        pipeline = by_stage[tracking.PIPELINE][0]
        parent = {run.info.run_id: run.data.tags.get("mlflow.parentRunId") for run in runs}
        assert parent[pipeline.info.run_id] is None
        for stage in (tracking.PREPARE, tracking.TRAIN, tracking.TUNE, tracking.REGISTER, tracking.PROMOTE,
                      tracking.PREDICT):
            assert all(parent[run.info.run_id] == pipeline.info.run_id for run in by_stage[stage]), stage
        train_ids = {run.info.run_id for run in by_stage[tracking.TRAIN]}
        assert sorted(int(run.data.tags[tracking.SEED]) for run in by_stage[tracking.TRAIN]) == list(SEEDS)
        for train_id in train_ids:
            folds = [run for run in by_stage[tracking.FOLD_RUN] if parent[run.info.run_id] == train_id]
            assert sorted(int(run.data.tags[tracking.FOLD]) for run in folds) == list(range(N_FOLDS))

        # Artifacts went through the server's proxy into ARTIFACTS_DESTINATION
        assert all(run.info.artifact_uri.startswith("mlflow-artifacts:") for run in runs)
        some_train = sorted(train_ids)[0]
        assert tracking.OOF_LOGITS in {f.path for f in client.list_artifacts(some_train, "oof")}
        assert list((workdir / "artifacts").rglob(tracking.FOLDS_CSV)), "no artifact in the server's destination"
        assert not (chain_dir / "mlruns").exists() and not (chain_dir / "mlflow.db").exists()

        # The registered version, its lineage and the production alias
        tune_id = by_stage[tracking.TUNE][0].info.run_id
        version = client.get_model_version_by_alias(tracking.MODEL_NAME, tracking.PRODUCTION)
        assert version.version == "1"
        assert version.run_id == by_stage[tracking.REGISTER][0].info.run_id
        assert version.tags[tracking.V_TUNE_RUN_ID] == tune_id
        assert set(version.tags[tracking.V_TRAIN_RUN_IDS].split(",")) == train_ids
        assert client.get_registered_model(tracking.MODEL_NAME).aliases == {tracking.PRODUCTION: "1"}
        assert pipeline.data.tags["psydef.model_version"] == "1" and pipeline.data.tags["psydef.tune_run_id"] == tune_id
        assert len(json.loads((out_dir / tracking.PREDICTION_JSON).read_text())) == 8

        if secret:  # the store's password: never in argv, logs, params or tags
            assert all(secret not in line for line in group_cmdlines(proc.pid))
            assert secret not in tail(server_log, 10**7) and secret not in output
            for run in runs:
                assert not any(secret in v for v in (*run.data.params.values(), *run.data.tags.values())), run.info.run_id


# ---- tuners on several machines share only PostgreSQL -------------------------------------------
N_SHARED_TRIALS = 40


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_two_tuners_share_a_postgresql_study_with_exactly_n_trials(sampler, monkeypatch):

    import optuna
    from optuna.trial import TrialState

    with postgres_cluster() as (uri, password):
        monkeypatch.setenv("PGPASSWORD", password)  # libpq reads it: no password in the storage address
        storage = uri.replace(f":{password}@", "@")
        contributions = two_tuners_on_one_study(storage, sampler, N_SHARED_TRIALS, timeout=300)
        trials = optuna.load_study(study_name="shared", storage=storage).trials
        assert sum(contributions) == N_SHARED_TRIALS and contributions[0] > 0  # both tuners ran batches
        assert [t.number for t in trials] == list(range(N_SHARED_TRIALS))
        assert all(t.state == TrialState.COMPLETE for t in trials)
