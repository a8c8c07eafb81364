"""A train job SIGKILLed in the middle of fold 3 and resumed with ``--resume true``: only the unfinished
folds are trained again, and the result is bit-identical to an uninterrupted run of the same seed."""
import mlflow

from psydef import tracking
from tests.fixtures.jobs import JOB_HYPER, assert_same_aggregate, fold_runs_of, train_parents

SEED = 7
# Almost no regularisation and a tolerance no fit reaches (tol must be > 0): lbfgs runs all max_iter
# iterations on the separable toy task, so a fold runs for a second or more, long enough to be caught running.
SLOW = {**JOB_HYPER, "C": 1e8, "tol": 1e-300, "max_iter": 20000}


def _running_fold_3():
    """The fold-3 run of the job being watched, once it is RUNNING."""
    runs = mlflow.search_runs(experiment_names=["psydef"], output_format="list",
                              filter_string=f"tags.`{tracking.STAGE}` = '{tracking.FOLD_RUN}' "
                                            f"and tags.`{tracking.FOLD}` = '3' and attributes.status = 'RUNNING'")
    return runs[0] if runs else None


def test_a_killed_train_job_resumes_only_its_unfinished_folds_with_bit_identical_results(train_jobs):
    job = train_jobs.train(seed=SEED, hyper=SLOW, name="killed")
    # The same seed, uninterrupted, in another experiment of the store (so resume cannot pick its parent).
    reference = train_jobs.train(seed=SEED, hyper=SLOW, experiment="reference", name="reference")
    try:
        killed_fold = train_jobs.poll_until(_running_fold_3, what="fold 3 running", alive=job)
    finally:
        train_jobs.kill(job)

    [parent] = train_parents()
    assert parent.info.status == "RUNNING"  # nobody ended it
    done = {k: run.info.run_id for k, run in tracking.fold_runs(parent.info.run_id).items()}
    assert sorted(done) == [0, 1, 2], f"caught fold 3 running, yet the complete folds are {sorted(done)}"
    assert mlflow.get_run(killed_fold.info.run_id).info.status == "RUNNING"

    resumed = train_jobs.train(seed=SEED, hyper=SLOW, resume="true", name="resumed")
    train_jobs.wait(resumed, reference)

    assert [p.info.run_id for p in train_parents()] == [parent.info.run_id]  # the same parent, reopened
    assert mlflow.get_run(parent.info.run_id).info.status == "FINISHED"
    after = {k: run.info.run_id for k, run in tracking.fold_runs(parent.info.run_id).items()}
    assert sorted(after) == [0, 1, 2, 3, 4]
    assert {k: after[k] for k in done} == done  # the finished folds keep their runs
    assert mlflow.get_run(killed_fold.info.run_id).info.status == "FAILED"  # marked so by the resume
    trained_again = [(run.data.tags[tracking.FOLD], run.info.status) for run in fold_runs_of(parent.info.run_id)
                     if run.info.run_id not in done.values()]
    assert sorted(trained_again) == [("3", "FAILED"), ("3", "FINISHED"), ("4", "FINISHED")]
    log = train_jobs.log(resumed)
    assert "fold 3: " in log and not any(f"fold {k}: " in log for k in done)  # one line per trained fold

    [uninterrupted] = train_parents("reference")
    assert uninterrupted.info.status == "FINISHED"
    assert_same_aggregate(parent.info.run_id, uninterrupted.info.run_id)
