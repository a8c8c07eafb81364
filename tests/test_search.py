
import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from psydef.calibration.rule import EnsembleSpec, plain_decode
from psydef.calibration.score import CandidateScorer, macro_f1
from psydef.calibration.calibrate import calibrate_oof
from psydef.calibration.storage import load_study, parse_storage
from psydef.calibration.study import SearchSpace, complete_trials, interactive_plots, run_study
from tests.fixtures.fake_runs import oof_problem as problem, two_tuners_on_one_study

optuna.logging.set_verbosity(optuna.logging.WARNING)


def scorer(seed=0, **kwargs):
    logits, y, _ = problem(seed, **kwargs)
    return CandidateScorer.from_logits(logits, y)


# --- alignment -----------------------------------------------------------------------------------


def test_search_space_fixes_delta_7_and_maps_sticks_to_weights():
    space = SearchSpace(n_members=3, gate=True)
    names = list(space.distributions())
    assert names == [f"delta_{c}" for c in (0, 1, 2, 3, 4, 5, 6, 8)] + ["stick_1", "stick_2", "tau7"]
    params = dict(zip(names, [-1, 1, 2, 3, -3, 0.5, 0.25, 2.5, 0.5, 0.0, 0.7]))
    weights, delta, tau7 = space.candidate(params)
    assert delta.tolist() == [-1, 1, 2, 3, -3, 0.5, 0.25, 0, 2.5]
    np.testing.assert_allclose(weights, [1 - 0.5 ** 0.5, 0.0, 0.5 ** 0.5])
    assert tau7 == 0.7
    assert "tau7" not in SearchSpace(1, gate=False).distributions()
    assert SearchSpace(1, gate=False).candidate(dict.fromkeys(names[:8], 0.0))[2] is None


# --- studies -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["random", "tpe", "cmaes"])
def test_study_best_value_is_what_the_spec_decodes(sampler):
    logits, y, _ = problem(1)
    result = run_study(CandidateScorer.from_logits(logits, y), n_trials=40, sampler=sampler, seed=3,
                       show_progress=False)
    complete = complete_trials(result.study)
    assert len(complete) == len(result.study.trials) == 40 == result.n_new_trials
    assert result.best_value == max(t.value for t in complete)
    assert result.best_so_far()[-1] == result.best_value and len(result.trials_dataframe()) == 40
    spec = result.spec(["a", "b"])
    assert macro_f1(y, spec.decode_logits(logits)) == result.best_value


@pytest.mark.parametrize("n_members,gate", [(1, False), (2, True), (3, True)])
def test_the_first_trial_is_the_plain_blend(n_members, gate):
    space = SearchSpace(n_members, gate=gate)
    weights, delta, tau7 = space.candidate(space.plain_params())
    np.testing.assert_allclose(weights, np.full(n_members, 1 / n_members))
    assert not delta.any() and tau7 == (0.99 if gate else None)
    members, y, _ = problem(2, n_members=n_members)
    plain = macro_f1(y, plain_decode(list(members)))
    for sampler in ("random", "tpe"):
        result = run_study(CandidateScorer.from_logits(members, y), n_trials=3, sampler=sampler, gate=gate,
                           delta_bound=50.0, show_progress=False)  # far-off random trials: worse than plain
        assert result.study.trials[0].value == plain and result.best_value >= plain


def test_random_study_is_seeded():
    a = run_study(scorer(), n_trials=30, sampler="random", seed=5, batch_size=7, show_progress=False)
    b = run_study(scorer(), n_trials=30, sampler="random", seed=5, batch_size=7, show_progress=False)
    c = run_study(scorer(), n_trials=30, sampler="random", seed=6, batch_size=7, show_progress=False)
    assert [t.params for t in a.study.trials] == [t.params for t in b.study.trials]
    assert [t.params for t in a.study.trials] != [t.params for t in c.study.trials]


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_resumed_study_continues(tmp_path, kind, sampler):
    storage = f"sqlite:///{tmp_path}/optuna.db" if kind == "sqlite" else f"journal://{tmp_path}/optuna.journal"
    first = run_study(scorer(), n_trials=12, sampler=sampler, storage=storage, study_name="s", show_progress=False)
    second = run_study(scorer(), n_trials=20, sampler=sampler, storage=storage, study_name="s", show_progress=False)
    assert (first.n_new_trials, second.n_new_trials) == (12, 8)
    trials = load_study(storage, "s").trials
    assert [t.number for t in trials] == list(range(20)) and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({tuple(t.params.values()) for t in trials}) == 20  # the resumed run drew new candidates
    assert run_study(scorer(), n_trials=20, sampler=sampler, storage=storage, study_name="s",
                     show_progress=False).n_new_trials == 0


def test_resuming_with_another_search_space_is_refused(tmp_path):
    storage = str(tmp_path / "s.journal")
    run_study(scorer(), n_trials=5, sampler="random", storage=storage, show_progress=False)
    with pytest.raises(ValueError, match="members, gate or bounds differ"):
        run_study(scorer(), n_trials=10, sampler="random", storage=storage, gate=False, show_progress=False)


def test_storage_addresses_are_validated():
    for bad in ("postgresql://host/db", "sqlite:///:memory:", "study.db"):
        with pytest.raises(ValueError, match="storage|SQLite"):
            run_study(scorer(n=20), n_trials=1, storage=bad, show_progress=False)
    with pytest.raises(ValueError, match="Unknown sampler"):
        run_study(scorer(n=20), n_trials=1, sampler="grid", show_progress=False)


def test_storage_messages_mask_the_password():
    with pytest.raises(ValueError, match=r"'postgresql://tuner:\*\*\*@db/optuna'") as err:
        parse_storage("postgresql://tuner:s3cret@db/optuna")
    assert "s3cret" not in str(err.value)
    assert parse_storage("postgresql+psycopg2://tuner@db/optuna") == ("postgresql", "postgresql+psycopg2://tuner@db/optuna")
    assert parse_storage("journal://x.log") == ("journal", "x.log") and parse_storage(None) is None


class FailingScorer(CandidateScorer):
    def score(self, *args):
        raise RuntimeError("boom")


def test_an_interrupted_batch_stores_nothing(tmp_path):
    logits, y, _ = problem(n=30)
    storage = str(tmp_path / "s.journal")
    run_study(scorer(n=30), n_trials=3, sampler="tpe", storage=storage, show_progress=False)
    with pytest.raises(RuntimeError, match="boom"):
        run_study(FailingScorer.from_logits(logits, y), n_trials=10, sampler="tpe", batch_size=4, storage=storage,
                  show_progress=False)
    assert [t.state for t in load_study(storage).trials] == [TrialState.COMPLETE] * 3
    assert run_study(scorer(n=30), n_trials=10, sampler="tpe", storage=storage, show_progress=False).n_new_trials == 7


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_two_processes_share_a_study_and_end_with_exactly_n_trials(tmp_path, kind, sampler):
    storage = f"sqlite:///{tmp_path}/optuna.db" if kind == "sqlite" else str(tmp_path / "optuna.journal")
    contributions = two_tuners_on_one_study(storage, sampler, 30, timeout=60)
    trials = load_study(storage, "shared").trials
    assert sum(contributions) == 30 and contributions[0] > 0  # both processes ran batches
    assert [t.number for t in trials] == list(range(30)) and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({tuple(t.params.values()) for t in trials}) == 30


# --- plots and the whole calibration -------------------------------------------------------------


def test_plots_are_figures_out_of_pyplots_registry():
    import io

    import matplotlib.pyplot as plt

    result = run_study(scorer(), n_trials=30, sampler="random", show_progress=False)
    open_before = plt.get_fignums()
    for figure in (result.plot_history(), result.plot_importances()):
        png = io.BytesIO()
        figure.savefig(png, format="png")
        assert png.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.get_fignums() == open_before  # nothing left open: many tune runs in one process do not pile up


@pytest.mark.skipif(not interactive_plots(), reason="plotly is not installed (the plots extra)")
def test_interactive_plots_are_plotly_figures_of_the_trials():
    result = run_study(scorer(), n_trials=30, sampler="random", show_progress=False)
    history = result.plot_history(interactive=True)
    values = [v for trace in history.data if trace.name == "Objective Value" for v in trace.y]
    assert sorted(values) == sorted(t.value for t in result.study.trials)
    importances = result.plot_importances(interactive=True)
    assert set(importances.data[0].y) == set(result.study.best_params)


def test_calibrate_oof_keeps_the_calibrated_rule_when_its_estimated_gain_is_positive(tmp_path):
    logits, y, _ = problem(2, n=400)  # the plain argmax over-predicts the majority level 7: a bias pays
    report = calibrate_oof(logits, y, run_ids=["r1", "r2"], data_digest="d", sampler="random", n_trials=200,
                           inner_n_trials=50, n_splits=3, n_repeats=2, show_progress=False)
    plain = plain_decode(logits)
    assert report.raw_f1 == report.estimate.plain_f1 == macro_f1(y, plain)
    assert report.calibrated_in_sample_f1 == report.search.best_value > report.raw_f1
    assert report.estimate.fold_gain.shape == (2, 3) and report.estimate.gain > 0
    assert report.calibrated and report.estimated_f1 == report.estimate.calibrated_f1
    assert "is positive: the calibrated rule is kept" in report.reason
    spec = EnsembleSpec.from_json(report.spec.to_json(tmp_path / "ensemble.json"))
    assert macro_f1(y, spec.decode_logits(logits)) == report.calibrated_in_sample_f1
    assert spec.run_ids == ["r1", "r2"] and spec.data_digest == "d" and spec.tau7 is not None
    assert np.mean([report.per_class_f1[c] for c in range(1, 9)]) == pytest.approx(report.calibrated_in_sample_f1)
    assert len(report.trials_dataframe()) == 200


def test_calibrate_oof_keeps_the_plain_blend_when_calibration_cannot_gain():
    _, y, _ = problem(3, n=300)
    logits = [8.0 * np.eye(9)[y], 6.0 * np.eye(9)[y]]  # the plain blend is already perfect
    report = calibrate_oof(logits, y, run_ids=["r1", "r2"], sampler="random", n_trials=100, inner_n_trials=30,
                           n_splits=3, n_repeats=1, show_progress=False)
    assert report.raw_f1 == 1.0 and report.estimate.gain <= 0 and not report.calibrated
    assert "not positive: the plain blend" in report.reason
    assert report.spec == EnsembleSpec.plain(["r1", "r2"]) and report.estimated_f1 == report.raw_f1 == 1.0
    assert all(report.per_class_f1[c] == 1.0 for c in range(1, 9))


def test_calibrate_oof_gives_the_same_report_with_the_estimate_in_worker_processes():
    logits, y, _ = problem(2, n=300)
    options = dict(run_ids=["r1", "r2"], sampler="tpe", n_trials=30, inner_n_trials=20, n_splits=3, n_repeats=2,
                   show_progress=False)
    serial, parallel = (calibrate_oof(logits, y, n_jobs=n_jobs, **options) for n_jobs in (1, 2))
    assert np.array_equal(serial.estimate.fold_gain, parallel.estimate.fold_gain)
    assert np.array_equal(serial.estimate.predictions, parallel.estimate.predictions)
    assert serial.estimate.fold_gain.std() > 0  # ten different searches, not one repeated
    assert serial.spec == parallel.spec and serial.search.best_value == parallel.search.best_value
