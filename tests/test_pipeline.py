"""``main`` with two members x two seeds: each seed on its own fold partition, every OOF row from a fold
model that never saw the record or its variants; interrupted after training and rerun with
``--resume true`` it reuses the prepare and train runs. ``mlflow run . -e train``: the run that
``mlflow run`` creates is the train parent, its prepare nested under it (or reused)."""
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from click.testing import CliRunner
from mlflow import MlflowClient

from psydef import tracking
from psydef.stages import pipeline
from psydef.stages.config import MainConfig
from psydef.stages.prepare import load_folds

REPO = Path(__file__).resolve().parents[1]
FAST = "char_ngrams=false,max_length=32"  # the CPU default on short encoder inputs
MEMBERS = f"minilm:{FAST};minilm:{FAST},combine=vote"
TAGS = (f"minilm:{FAST}", "minilm:char_ngrams=false,combine=vote,max_length=32")  # canonical: keys sorted
SEEDS = (1, 2)
TUNE_ARGS = ["--n-trials", "20", "--inner-trials", "8", "--sampler", "random", "--n-jobs", "1"]


def _runs(stage: str) -> list:
    return mlflow.search_runs(filter_string=f"tags.`{tracking.STAGE}` = '{stage}'", output_format="list",
                              order_by=["attributes.start_time ASC"])


def _oof(run_id: str) -> pd.DataFrame:
    ids = mlflow.artifacts.load_dict(tracking.artifact_uri(run_id, tracking.OOF_IDS))
    return pd.DataFrame(tracking.load_npy(run_id, tracking.OOF_LOGITS), index=ids)


def _main(data_dir: Path, out: Path, *extra: str):
    from psydef.cli import cli

    return CliRunner().invoke(cli, ["main", "--data-dir", str(data_dir), "--seeds", ",".join(map(str, SEEDS)),
                                     "--members", MEMBERS, "--out-dir", str(out), *TUNE_ARGS, *extra])


def test_main_trains_each_seed_on_its_own_folds_and_a_rerun_with_resume_reuses_them(
        data_dir, experiment_id, tmp_path, monkeypatch):
    def tune_fails(*args, **kwargs):
        raise ValueError("tune interrupted on purpose")

    with monkeypatch.context() as patched:
        patched.setattr(pipeline, "run_tune", tune_fails)
        failed = _main(data_dir, tmp_path / "out")
    assert failed.exit_code == 1 and "tune interrupted on purpose" in failed.output, failed.output
    assert "run it again with -P resume=true" in failed.output
    [stopped] = _runs(tracking.PIPELINE)
    assert stopped.info.status == "FAILED"

    prepares, trains = _runs(tracking.PREPARE), _runs(tracking.TRAIN)
    assert [p.data.params["seed"] for p in prepares] == ["1", "2"]  # one partition per seed
    assert {p.data.tags[tracking.PARENT_RUN_ID] for p in prepares} == {stopped.info.run_id}
    folds = {p.info.run_id: load_folds(p.info.run_id) for p in prepares}
    first, second = (folds[p.info.run_id].set_index("id")["fold"] for p in prepares)
    assert (first != second.loc[first.index]).any()
    assert len(trains) == len(SEEDS) * 2 and {t.info.status for t in trains} == {"FINISHED"}
    member_of = {(t.data.tags[tracking.MEMBER], t.data.tags[tracking.SEED]): t for t in trains}
    assert set(member_of) == {(m, str(s)) for m in TAGS for s in SEEDS}
    for train in trains:  # each seed's members on that seed's folds
        seed_prepare = next(p for p in prepares if p.data.params["seed"] == train.data.tags[tracking.SEED])
        assert train.data.tags[tracking.PREPARE_RUN_ID] == seed_prepare.info.run_id

    # Every OOF row of every member comes from the fold model whose training rows hold neither the
    # record nor any of its variants (the fold runs' logged training-set size ties them to folds.csv).
    for train in trains:
        table = folds[train.data.tags[tracking.PREPARE_RUN_ID]]
        for k, fold_run in tracking.fold_runs(train.info.run_id).items():
            seen = table[table["fold"] != k]
            assert int(fold_run.data.params["n_train_rows"]) == len(seen)  # the rows its fit was given
            oof_ids = set(_oof(fold_run.info.run_id).index)
            assert oof_ids == set(table.query("fold == @k and not is_augmented")["id"])
            assert not oof_ids & (set(seen["id"]) | set(seen["source_id"]))
    # Two seeds of one member: other folds, other logits for the same records
    a, b = (_oof(member_of[(TAGS[0], str(seed))].info.run_id) for seed in SEEDS)
    assert not np.allclose(a.to_numpy(), b.loc[a.index].to_numpy())

    n_folds = len(_runs(tracking.FOLD_RUN))
    with mlflow.start_run() as launched:  # as `mlflow run` leaves it: created, its -P values logged
        mlflow.log_params({"seeds": "1,2", "resume": "true"})
    monkeypatch.setenv("MLFLOW_RUN_ID", launched.info.run_id)
    rerun = _main(data_dir, tmp_path / "out", "--resume", "true")
    assert rerun.exit_code == 0, f"{rerun.output[-3000:]}\n{rerun.exception!r}"
    assert len(_runs(tracking.FOLD_RUN)) == n_folds and len(_runs(tracking.TRAIN)) == len(trains)
    assert len(_runs(tracking.PREPARE)) == len(prepares)
    reused = [line for line in rerun.output.splitlines() if line.startswith("main: reusing")]
    assert len(reused) == len(prepares) + len(trains)
    assert all(r.info.run_id in rerun.output for r in (*prepares, *trains))
    resumed = mlflow.get_run(launched.info.run_id)  # the run `mlflow run` made is the pipeline run
    assert resumed.data.tags[tracking.STAGE] == tracking.PIPELINE and resumed.info.status == "FINISHED"
    assert "reused (resume): prepare run" in resumed.data.tags[tracking.NOTE]
    version = MlflowClient().get_model_version(tracking.MODEL_NAME, resumed.data.tags[tracking.PIPELINE_MODEL_VERSION])
    assert set(version.tags[tracking.V_TRAIN_RUN_IDS].split(",")) == {t.info.run_id for t in trains}
    assert f"({TAGS[1]}, seed 2, weight" in version.description  # each member named by its spec

    # Under `mlflow run -e tune|register|predict` too, the run `mlflow run` created is the stage's run.
    from psydef.stages.config import PredictConfig, RegisterConfig, TuneConfig
    from psydef.stages.predict import run_predict
    from psydef.stages.register import run_register
    from psydef.stages.tune import run_tune

    tune_config = TuneConfig(members=MainConfig.parse("members", MEMBERS), n_trials=20, inner_trials=8,
                             sampler="random", n_jobs=1)
    tune_run = resumed.data.tags[tracking.PIPELINE_TUNE_RUN_ID]
    launched = {}
    for stage, call in ((tracking.TUNE, lambda: run_tune(tune_config, experiment_id=experiment_id)),
                        (tracking.REGISTER, lambda: run_register(RegisterConfig(tune_run=tune_run))),
                        (tracking.PREDICT, lambda: run_predict(PredictConfig(data_dir=data_dir, out_dir=tmp_path)))):
        launched[stage] = MlflowClient().create_run(experiment_id).info.run_id
        monkeypatch.setenv("MLFLOW_RUN_ID", launched[stage])
        call()
        assert mlflow.get_run(launched[stage]).data.tags[tracking.STAGE] == stage
    # tune picked the latest FINISHED train run of each member and seed: the four of main
    picked = mlflow.get_run(launched[tracking.TUNE]).data.tags[tracking.MEMBER_RUN_IDS].split(",")
    assert sorted(picked) == sorted(t.info.run_id for t in trains)


def _mlflow_run(entry_point: str, uri: str, cwd: Path, **params) -> subprocess.CompletedProcess:
    """``mlflow run REPO -e ENTRY_POINT -P ... --env-manager local`` against store ``uri``."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for variable in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(variable, None)
    args = [arg for key, value in params.items() for arg in ("-P", f"{key}={value}")]
    return subprocess.run([sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry_point, *args,
                           "--env-manager", "local", "--experiment-name", tracking.DEFAULT_EXPERIMENT],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_mlflow_run_train_is_the_train_parent_with_its_prepare_nested_then_reused(data_dir, experiment_id, tmp_path,
                                                                                 monkeypatch):
    done = _mlflow_run("train", mlflow.get_tracking_uri(), tmp_path, data_dir=data_dir, seed=3, backbone="minilm",
                       hyper=FAST)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    runs = MlflowClient().search_runs([experiment_id])
    [parent] = [r for r in runs if tracking.PARENT_RUN_ID not in r.data.tags]  # one top-level run
    assert parent.data.tags[tracking.STAGE] == tracking.TRAIN and parent.info.status == "FINISHED"
    assert parent.data.tags["mlflow.project.entryPoint"] == "train"
    nested = [r for r in runs if r.data.tags.get(tracking.PARENT_RUN_ID) == parent.info.run_id]
    assert sorted(r.data.tags[tracking.STAGE] for r in nested) == [tracking.FOLD_RUN] * 5 + [tracking.PREPARE]
    [prepare] = [r for r in nested if r.data.tags[tracking.STAGE] == tracking.PREPARE]
    assert parent.data.tags[tracking.PREPARE_RUN_ID] == prepare.info.run_id
    assert f"prepare run {prepare.info.run_id}, nested under this run" in parent.data.tags[tracking.NOTE]

    # The next training of that seed takes the finished prepare run of the same data and settings.
    from psydef.stages.config import TrainConfig
    from psydef.stages.train import run_train

    vote = mlflow.get_run(run_train(TrainConfig(data_dir=data_dir, seed=3, backbone="minilm",
                                                hyper={"char_ngrams": False, "max_length": 32, "combine": "vote"}),
                                    experiment_id=experiment_id))
    assert vote.data.tags[tracking.PREPARE_RUN_ID] == prepare.info.run_id
    assert "a FINISHED prepare run of the same data and settings, reused" in vote.data.tags[tracking.NOTE]
    assert len(_runs(tracking.PREPARE)) == 1

    # aggregate's run (the one `mlflow run -e aggregate` would create) is an aggregate run under the parent
    from psydef.stages.config import AggregateConfig
    from psydef.stages.train import run_aggregate

    launched = MlflowClient().create_run(experiment_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", launched.info.run_id)
    run_aggregate(AggregateConfig(parent_run_id=parent.info.run_id, data_dir=data_dir))
    aggregated = mlflow.get_run(launched.info.run_id)
    assert aggregated.data.tags[tracking.STAGE] == tracking.AGGREGATE and aggregated.info.status == "FINISHED"
    assert aggregated.data.tags[tracking.PARENT_RUN_ID] == parent.info.run_id
    assert mlflow.get_run(parent.info.run_id).info.status == "FINISHED"
