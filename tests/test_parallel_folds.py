"""The five folds of one seed trained as five concurrent ``--fold k`` jobs under one parent run, and
aggregated by whichever job completes the last fold (or by the ``aggregate`` entry point): the parent
ends bit-identical to the sequential run of the same seed, however many times it is aggregated."""
import re

import mlflow
from click.testing import CliRunner
from mlflow import MlflowClient

from psydef.cli import cli
from psydef import tracking
from tests.fixtures.jobs import assert_same_aggregate, fold_runs_of, train_parents

SEED = 7
N_SPLITS = 5


def test_folds_as_parallel_jobs_aggregate_like_the_sequential_run_and_reaggregate_idempotently(train_jobs, data_dir):
    # Fold 0's job finds no parent for (seed, backbone, prepare run) and creates it (left RUNNING) ...
    first = train_jobs.train(seed=SEED, fold=0, name="fold-0")
    reference = train_jobs.train(seed=SEED, experiment="reference", name="reference")  # sequential
    [parent] = train_jobs.poll_until(train_parents, what="a parent run", alive=first)
    parent_id = parent.info.run_id
    # ... and the other folds' jobs start as soon as it exists, under it, all at once.
    rest = [train_jobs.train(seed=SEED, fold=k, parent_run_id=parent_id, name=f"fold-{k}")
            for k in range(1, N_SPLITS)]
    jobs = [first, *rest]

    seen, running_at_once = set(), []  # (fold, status) of every fold run seen; fold jobs alive, per poll

    def all_ended():
        running_at_once.append(sum(job.poll() is None for job in jobs))
        seen.update((r.data.tags.get(tracking.FOLD), r.info.status) for r in fold_runs_of(parent_id))
        return not running_at_once[-1]

    train_jobs.poll_until(all_ended, what="end of the fold jobs", timeout=400, interval=0.5)
    train_jobs.wait(*jobs, reference)
    assert max(running_at_once) >= 2, "the fold jobs did not run concurrently"
    assert not [s for s in seen if s[1] == "FAILED"], f"a job marked another's running fold FAILED: {seen}"

    assert [p.info.run_id for p in train_parents()] == [parent_id]  # one parent for all five jobs
    assert mlflow.get_run(parent_id).info.status == "FINISHED"
    folds = fold_runs_of(parent_id)
    assert sorted((r.data.tags[tracking.FOLD], r.info.status) for r in folds) == [
        (str(k), "FINISHED") for k in range(N_SPLITS)]
    aggregated_by = [job.name for job in jobs if f"train {parent_id}: OOF macro-F1" in train_jobs.log(job)]
    assert aggregated_by, "no fold job aggregated the parent"
    [sequential] = train_parents("reference")
    assert_same_aggregate(parent_id, sequential.info.run_id)

    # Aggregating again, twice at once (two jobs finishing together do the same), changes nothing.
    again = [train_jobs.start("aggregate", "--parent-run-id", parent_id, "--data-dir", str(data_dir),
                              name=f"aggregate-{i}") for i in range(2)]
    train_jobs.wait(*again, timeout=180)
    assert mlflow.get_run(parent_id).info.status == "FINISHED"
    assert_same_aggregate(parent_id, sequential.info.run_id)
    client = MlflowClient()
    for key, value in mlflow.get_run(sequential.info.run_id).data.metrics.items():
        assert {m.value for m in client.get_metric_history(parent_id, key)} == {value}, key
    print(f"{max(running_at_once)} fold jobs at once; parent {parent_id} aggregated by {aggregated_by}, "
          "then by two concurrent `aggregate` jobs")

    # The entry point refuses, in a clean one-line error, what it cannot aggregate (in process: fast).
    incomplete = client.create_run(parent.info.experiment_id, tags={
        tracking.STAGE: tracking.TRAIN, tracking.PREPARE_RUN_ID: train_jobs.prepare_run_id}).info.run_id
    refusals = {incomplete: r"no complete fold run for folds \[0, 1, 2, 3, 4\]",
                train_jobs.prepare_run_id: f"run {train_jobs.prepare_run_id} is not a train run",
                "0" * 32: f"train run '{'0' * 32}' does not exist"}
    for run_id, message in refusals.items():
        result = CliRunner().invoke(cli, ["aggregate", "--parent-run-id", run_id, "--data-dir", str(data_dir)])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert re.search(message, result.output), result.output
    assert client.get_run(incomplete).info.status == "RUNNING"  # a refused aggregation ends nothing


def test_a_fold_job_marks_only_stale_attempts_at_its_own_fold_failed(tracking_uri):
    """Fold k's job must leave the fold runs that other jobs are training right now alone; a resume
    (no fold given) takes every RUNNING fold run for a killed one."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name("psydef").experiment_id
    parent = client.create_run(experiment).info.run_id
    running = {k: client.create_run(experiment, tags={tracking.PARENT_RUN_ID: parent, tracking.STAGE: tracking.FOLD_RUN,
                                                      tracking.FOLD: str(k)}).info.run_id for k in (1, 2)}

    def status(k):
        return client.get_run(running[k]).info.status

    tracking.mark_stale_folds_failed(parent, 2)
    assert (status(1), status(2)) == ("RUNNING", "FAILED")
    tracking.mark_stale_folds_failed(parent)
    assert status(1) == "FAILED"
