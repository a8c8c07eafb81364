import json

import numpy as np
import pytest
from scipy.special import softmax as scipy_softmax
from sklearn.metrics import f1_score

from psydef.calibration.estimate import estimate_gain
from psydef.calibration.rule import DECODE_RULE, EnsembleSpec, blend, plain_decode, simplex_weights, softmax
from psydef.calibration.score import CandidateScorer, macro_f1, per_class_f1
from psydef.calibration.validation import (check_deltas, check_labels, check_logits, check_member_logits,
                                           check_member_probs, check_probs, check_tau7s, check_weights)
from psydef.core.labels import LABEL_NAMES

OFFICIAL = list(range(1, 9))


def sk_macro_f1(y, p):
    return f1_score(y, p, labels=OFFICIAL, average="macro", zero_division=0)


def random_problem(rng, n=300, n_members=2, n_groups=30):
    prior = np.array([10, 4, 3, 10, 8, 5, 6.5, 52, 1.5]) / 100
    y = rng.choice(9, size=n, p=prior)
    logits = [1.5 * np.eye(9)[y] + np.log(prior) + rng.normal(size=(n, 9)) for _ in range(n_members)]
    return logits, y, rng.integers(0, n_groups, size=n)


def probs_row(**p):
    row = np.zeros(9)
    for level, value in p.items():
        row[int(level[1:])] = value
    return row


# --- softmax, simplex weights, blend ----------------------------------------------------------


def test_softmax_is_stable_and_matches_scipy():
    logits = np.array([[1000.0, 999.0] + [0.0] * 7, np.arange(9.0) - 5, [-800.0] * 9])
    p = softmax(logits)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(p, scipy_softmax(logits, axis=1), rtol=1e-12)


def test_softmax_rejects_bad_shapes_and_nan():
    with pytest.raises(ValueError, match="shape"):
        softmax(np.zeros((3, 8)))
    with pytest.raises(ValueError, match="NaN"):
        softmax(np.full((2, 9), np.nan))


def test_simplex_weights_maps_the_cube_onto_the_simplex():
    rng = np.random.default_rng(0)
    u = rng.uniform(size=(20000, 3))
    w = simplex_weights(u)
    assert w.shape == (20000, 4)
    assert (w >= 0).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    # Uniform parameters give Dirichlet(1) weights: every mean 1/4, P(w_i > 1/2) = (1/2)^3 for every member.
    np.testing.assert_allclose(w.mean(axis=0), 0.25, atol=0.01)
    np.testing.assert_allclose((w > 0.5).mean(axis=0), 0.125, atol=0.01)


def test_simplex_weights_two_and_one_members():
    np.testing.assert_allclose(simplex_weights([[0.3], [0.0], [1.0]]), [[0.3, 0.7], [0.0, 1.0], [1.0, 0.0]])
    np.testing.assert_array_equal(simplex_weights(np.zeros((2, 0))), [[1.0], [1.0]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        simplex_weights([1.5])


def test_blend_is_the_weighted_sum_of_softmaxes():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 9)), rng.normal(size=(5, 9))
    np.testing.assert_allclose(blend([a, b], [0.25, 0.75]), 0.25 * softmax(a) + 0.75 * softmax(b), rtol=1e-14)
    np.testing.assert_array_equal(blend([a], [1.0]), softmax(a))
    with pytest.raises(ValueError, match="simplex"):
        blend([a, b], [0.5, 0.6])
    with pytest.raises(ValueError, match="2 entries"):
        blend([a, b], [1.0])
    with pytest.raises(ValueError, match="rows"):
        blend([a, b[:4]], [0.5, 0.5])


# --- the decode rule -----------------------------------------------------------------------------


def decode(probs, delta, tau7=None):
    """Labels of one (delta, tau7) candidate on one member's probabilities, through the scorer."""
    scorer = CandidateScorer([probs], np.zeros(len(probs), dtype=np.int64))
    return scorer.predict(np.ones((1, 1)), np.asarray(delta, dtype=np.float64)[None],
                          None if tau7 is None else [tau7])[0]


def test_decode_biased_argmax_on_hand_made_rows():
    probs = np.stack([probs_row(p1=0.5, p2=0.4, p7=0.1), probs_row(p3=0.3, p7=0.7), probs_row(p0=0.6, p8=0.4)])
    zero = np.zeros(9)
    np.testing.assert_array_equal(decode(probs, zero), [1, 7, 0])
    # log 0.4 + log 1.5 > log 0.5: the bias on level 2 flips row 0, and the bias on 8 flips row 2.
    delta = zero.copy()
    delta[2], delta[8] = np.log(1.5), np.log(2)
    np.testing.assert_array_equal(decode(probs, delta), [2, 7, 8])
    # A large negative bias on 7 hands row 1 to level 3.
    delta7 = zero.copy()
    delta7[7] = -1.0
    np.testing.assert_array_equal(decode(probs, delta7), [1, 3, 0])


def test_decode_gate_predicts_7_at_or_above_tau7():
    probs = np.stack([probs_row(p3=0.55, p7=0.45), probs_row(p3=0.6, p7=0.4), probs_row(p1=0.2, p7=0.8)])
    delta = np.zeros(9)
    np.testing.assert_array_equal(decode(probs, delta), [3, 3, 7])
    np.testing.assert_array_equal(decode(probs, delta, tau7=0.45), [7, 3, 7])  # p_7 == tau7 counts
    np.testing.assert_array_equal(decode(probs, delta, tau7=0.4), [7, 7, 7])
    # The gate wins over the bias; below the threshold the bias still decides.
    delta[7] = -5.0
    np.testing.assert_array_equal(decode(probs, delta, tau7=0.45), [7, 3, 7])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        decode(probs, delta, tau7=1.5)


def test_decode_equals_argmax_of_log_probs_plus_delta():
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(9), size=2000)
    delta = rng.uniform(-3, 3, size=9)
    np.testing.assert_array_equal(decode(probs, delta), np.argmax(np.log(probs) + delta, axis=1))


def test_decode_rejects_non_probabilities():
    with pytest.raises(ValueError, match="probabilities"):
        decode(np.full((2, 9), 0.5), np.zeros(9))
    with pytest.raises(ValueError, match=r"shape \(1, 9\)"):
        decode(np.full((2, 9), 1 / 9), np.zeros(8))


# --- the metric and vectorised scoring -----------------------------------------------------------


def test_macro_f1_equals_sklearn_exactly():
    rng = np.random.default_rng(3)
    for n in (1, 7, 50, 500):
        y, p = rng.integers(0, 9, size=n), rng.integers(0, 9, size=n)
        assert macro_f1(y, p) == sk_macro_f1(y, p)
        expected = f1_score(y, p, labels=range(9), average=None, zero_division=0)
        np.testing.assert_array_equal(per_class_f1(y, p), expected)
    assert macro_f1([0, 0], [0, 0]) == 0.0  # level 0 is not scored


def test_scorer_equals_sklearn_exactly():
    rng = np.random.default_rng(4)
    logits, y, _ = random_problem(rng, n=400, n_members=1)
    probs = softmax(logits[0])
    deltas = rng.uniform(-3, 3, size=(300, 9))
    tau7s = rng.uniform(0.3, 0.99, size=300)
    for t in (None, tau7s):
        scores = CandidateScorer([probs], y).score(np.ones((len(deltas), 1)), deltas, t)
        expected = [sk_macro_f1(y, decode(probs, d, None if t is None else t[i])) for i, d in enumerate(deltas)]
        assert scores.tolist() == expected


def test_scorer_batches_match_single_decodes_bit_for_bit():
    rng = np.random.default_rng(5)
    logits, y, _ = random_problem(rng, n=250, n_members=3)
    k = 40
    weights = simplex_weights(rng.uniform(size=(k, 2)))
    deltas = rng.uniform(-3, 3, size=(k, 9))
    tau7s = rng.uniform(0.3, 0.99, size=k)
    small = CandidateScorer.from_logits(logits, y, max_chunk_bytes=1)  # one candidate per chunk
    large = CandidateScorer.from_logits(logits, y, max_chunk_bytes=2**26)  # all candidates in one chunk
    assert small.chunk_size == 1 and large.chunk_size >= k
    pred = large.predict(weights, deltas, tau7s)
    np.testing.assert_array_equal(pred, small.predict(weights, deltas, tau7s))
    assert large.score(weights, deltas, tau7s).tolist() == small.score(weights, deltas, tau7s).tolist()
    for i in range(k):
        single = decode(blend(logits, weights[i]), deltas[i], tau7s[i])
        np.testing.assert_array_equal(pred[i], single)
        assert large.score(weights[i:i + 1], deltas[i:i + 1], tau7s[i:i + 1])[0] == sk_macro_f1(y, single)


def test_scorer_validates_candidates():
    rng = np.random.default_rng(6)
    logits, y, _ = random_problem(rng, n=20)
    scorer = CandidateScorer.from_logits(logits, y)
    with pytest.raises(ValueError, match="simplex"):
        scorer.score([[0.7, 0.7]], np.zeros((1, 9)))
    with pytest.raises(ValueError, match=r"shape \(1, 9\)"):
        scorer.score([[0.5, 0.5]], np.zeros((2, 9)))
    with pytest.raises(ValueError, match="one threshold per candidate"):
        scorer.score([[0.5, 0.5]], np.zeros((1, 9)), [0.5, 0.5])
    with pytest.raises(ValueError, match="levels 0..8"):
        CandidateScorer.from_logits(logits, np.full(20, 9))
    with pytest.raises(ValueError, match="10 entries; expected 20"):
        CandidateScorer.from_logits(logits, y[:10])


# --- the gain estimate ---------------------------------------------------------------------------


def row_number_logits(n):
    """Logits whose column 0 carries the row number: the plain blend predicts level 0 (not scored) everywhere."""
    logits = np.zeros((n, 9))
    logits[:, 0] = np.arange(n)
    return logits


def test_gain_estimate_never_fits_and_scores_the_same_row():
    """A rule that memorises its training rows gains nothing if, and only if, no scored row was seen in
    its fit: each row's logits carry its row number, the fit remembers labels by row number."""
    rng = np.random.default_rng(7)
    n = 240
    y = rng.integers(1, 9, size=n)  # no level 0: a leaked row would score
    logits = row_number_logits(n)
    seen = []

    def fit(fit_logits, fit_y, split):
        seen.append((split, set(fit_logits[0][:, 0].astype(int).tolist())))
        memory = dict(zip(fit_logits[0][:, 0].astype(int).tolist(), fit_y.tolist()))
        return lambda lg: np.array([memory.get(int(r), 0) for r in lg[0][:, 0]])

    est = estimate_gain(fit, [logits], y, n_splits=5, n_repeats=3, seed=0)
    assert est.plain_f1 == 0.0 and est.gain == 0.0 and est.fold_gain.shape == (3, 5)
    assert (est.predictions == 0).all()
    assert [split for split, _ in seen] == list(range(15))
    for split, fit_rows in seen:
        held = set(np.flatnonzero(est.fold_of_row[split // 5] == split % 5).tolist())
        assert held and not held & fit_rows and held | fit_rows == set(range(n))
    assert not np.array_equal(est.fold_of_row[0], est.fold_of_row[1])  # each repeat shuffles afresh

    # The same memoriser fitted on everything would score perfectly: the zero above is the split's doing.
    assert macro_f1(y, fit([logits], y, 0)([logits])) == 1.0


def test_gain_is_the_mean_of_paired_per_fold_gains():
    rng = np.random.default_rng(8)
    logits, y, _ = random_problem(rng, n=300)
    plain = decode(blend(logits, [0.5, 0.5]), np.zeros(9))
    bias = np.array([1.0, 1.5, 1.5, 1.0, 1.0, 1.5, 1.0, 0.0, 2.0])  # a fixed bias against the majority level
    fixed = lambda *_: (lambda lg: decode(blend(lg, [0.5, 0.5]), bias))  # a fit that learns nothing
    est = estimate_gain(fixed, logits, y, n_splits=3, n_repeats=2, seed=1)
    assert est.plain_f1 == sk_macro_f1(y, plain)
    np.testing.assert_array_equal(est.predictions, np.stack([decode(blend(logits, [0.5, 0.5]), bias)] * 2))
    expected = [[sk_macro_f1(y[est.fold_of_row[r] == k], est.predictions[r][est.fold_of_row[r] == k])
                 - sk_macro_f1(y[est.fold_of_row[r] == k], plain[est.fold_of_row[r] == k]) for k in range(3)]
                for r in range(2)]
    np.testing.assert_allclose(est.fold_gain, expected, rtol=0, atol=1e-15)
    assert est.gain == pytest.approx(np.mean(expected)) and est.gain > 0
    assert est.calibrated_f1 == pytest.approx(est.plain_f1 + est.gain)
    assert est.gain_fold_std == pytest.approx(np.std(expected))


def test_gain_of_the_plain_rule_is_zero_and_of_a_harmful_rule_negative():
    rng = np.random.default_rng(3)
    logits, y, _ = random_problem(rng, n=300)
    assert estimate_gain(lambda *_: plain_decode, logits, y, n_splits=2).gain == 0.0
    always_8 = lambda *_: (lambda lg: np.full(len(lg[0]), 8))
    assert estimate_gain(always_8, logits, y, n_splits=2).gain < 0


def test_gain_estimate_with_groups_keeps_each_group_in_one_fold_and_checks_its_input():
    rng = np.random.default_rng(4)
    logits, y, groups = random_problem(rng, n=300)
    est = estimate_gain(lambda *_: plain_decode, logits, y, n_splits=3, n_repeats=2, groups=groups)
    for r in range(2):
        assert all(len(set(est.fold_of_row[r][groups == g])) == 1 for g in np.unique(groups))
    with pytest.raises(ValueError, match="number of groups"):
        estimate_gain(lambda *_: plain_decode, logits, y, n_splits=3, groups=np.zeros(300))
    with pytest.raises(ValueError, match="at most the number of rows"):
        estimate_gain(lambda *_: plain_decode, [x[:1] for x in logits], y[:1], n_splits=2)
    with pytest.raises(ValueError, match=">= 2"):
        estimate_gain(lambda *_: plain_decode, logits, y, n_splits=1)
    with pytest.raises(ValueError, match="n_repeats"):
        estimate_gain(lambda *_: plain_decode, logits, y, n_repeats=0)


def test_plain_rule_is_the_equal_weight_argmax():
    rng = np.random.default_rng(5)
    logits, _, _ = random_problem(rng, n=200, n_members=3)
    expected = np.argmax(sum(softmax(x) for x in logits), axis=1)
    np.testing.assert_array_equal(plain_decode(logits), expected)
    spec = EnsembleSpec.plain(["a", "b", "c"], data_digest="d")
    assert spec.tau7 is None and spec.delta == [0.0] * 9 and spec.data_digest == "d"
    np.testing.assert_array_equal(spec.decode_logits(logits), expected)


# --- the spec file -------------------------------------------------------------------------------


def test_ensemble_spec_round_trip_reproduces_predictions(tmp_path):
    rng = np.random.default_rng(9)
    logits, y, _ = random_problem(rng, n=500)
    weights = simplex_weights(rng.uniform(size=(1, 1)))[0]
    delta = rng.uniform(-3, 3, size=9)
    delta[7] = 0.0
    tau7 = float(rng.uniform(0.3, 0.99))
    spec = EnsembleSpec(members=[{"run_id": "a1", "weight": weights[0]}, {"run_id": "b2", "weight": weights[1]}],
                        delta=delta.tolist(), tau7=tau7, data_digest="sha256:abc", metrics={"oof_macro_f1": 0.4})
    expected = CandidateScorer.from_logits(logits, y).predict(weights[None], delta[None], [tau7])[0]
    np.testing.assert_array_equal(spec.decode_logits(logits), expected)

    loaded = EnsembleSpec.from_json(spec.to_json(tmp_path / "ensemble.json"))
    assert loaded == spec and loaded.run_ids == ["a1", "b2"] and loaded.label_names == list(LABEL_NAMES)
    np.testing.assert_array_equal(loaded.decode_logits(logits), expected)
    saved = json.loads((tmp_path / "ensemble.json").read_text())
    assert saved["rule"] == DECODE_RULE and saved["tau7"] == tau7 and saved["delta"] == delta.tolist()

    no_gate = EnsembleSpec.from_dict({**spec.to_dict(), "tau7": None})
    np.testing.assert_array_equal(no_gate.decode_logits(logits), decode(blend(logits, weights), delta))


def test_ensemble_spec_refuses_inconsistent_files():
    good = {"members": [{"run_id": "a", "weight": 1.0}], "delta": [0.0] * 9, "tau7": None}
    EnsembleSpec.from_dict(good)
    with pytest.raises(ValueError, match="simplex"):
        EnsembleSpec.from_dict({**good, "members": [{"run_id": "a", "weight": 0.9}]})
    with pytest.raises(ValueError, match="delta"):
        EnsembleSpec.from_dict({**good, "delta": [0.0] * 8})
    with pytest.raises(ValueError, match="label_names"):
        EnsembleSpec.from_dict({**good, "label_names": ["x"] * 9})
    with pytest.raises(ValueError, match="decode rule"):
        EnsembleSpec.from_dict({**good, "rule": "something else"})
    with pytest.raises(ValueError, match="Unknown EnsembleSpec fields"):
        EnsembleSpec.from_dict({**good, "temperature": 2.0})
    with pytest.raises(ValueError, match="Expected logits of 1 members"):
        EnsembleSpec.from_dict(good).decode_logits([np.zeros((3, 9))] * 2)


UNIFORM = np.full((2, 9), 1 / 9)


@pytest.mark.parametrize("call, match", [
    (lambda: check_logits(np.zeros((2, 8)), "oof logits"), r"^oof logits must have shape \(n_rows, 9\)"),
    (lambda: check_logits(np.zeros((2, 9)), "oof logits", n_rows=3), "^oof logits has 2 rows; expected 3"),
    (lambda: check_logits(np.full((2, 9), np.nan), "oof logits"), "^oof logits contains NaN"),
    (lambda: check_probs(UNIFORM * 2, "test probs"), "^test probs must hold probabilities"),
    (lambda: check_labels([0, 9], "y_true"), r"^y_true must hold levels 0..8; got values in \[0, 9\]"),
    (lambda: check_labels([0.5], "y_true"), "^y_true must hold integer labels"),
    (lambda: check_weights([0.7, 0.7], 2, "member weights"), "^member weights must lie on the simplex"),
    (lambda: check_weights([1.0], 2, "member weights"), "^member weights must have 2 entries"),
    (lambda: check_deltas(np.zeros((1, 8)), 1, "delta"), r"^delta must have shape \(1, 9\)"),
    (lambda: check_tau7s([1.5], 1, "tau7"), r"^tau7 must lie in \(0, 1\]"),
    (lambda: check_member_logits([np.zeros((2, 9)), np.zeros((3, 9))]), "^logits of member 1 has 3 rows; expected 2"),
    (lambda: check_member_probs([UNIFORM, UNIFORM[:, :8]]), "^probabilities of member 1 must have shape"),
    (lambda: check_member_logits([]), "At least one member"),
])
def test_each_check_names_its_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_checks_return_float64_and_int64_arrays():
    assert check_logits([[0] * 9]).dtype == np.float64 and check_labels(np.array([1, 2], np.int8)).dtype == np.int64
    assert check_tau7s(None, 3) is None
    assert check_member_probs([UNIFORM, UNIFORM]).shape == (2, 2, 9)
