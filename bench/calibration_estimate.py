"""Does the calibration's estimated gain predict its gain on records its search never saw?

    python bench/calibration_estimate.py                       # real OOF logits made here (TF-IDF + LR, 2 seeds)
    python bench/calibration_estimate.py --class-weight none   # the same without class weights (a majority bias)
    python bench/calibration_estimate.py --train-runs          # OOF logits logged by the train runs tune would pick
    python bench/calibration_estimate.py --train-runs A,B --tracking-uri sqlite:///mlflow.db

Each of ``--halvings`` random record-level halvings of the OOF rows (stratified by label) is one trial
of what tune does: on half A, :func:`psydef.calibration.calibrate.calibrate_oof` searches the rule and
estimates its gain over the plain blend (equal weights, delta 0, no gate); the searched rule and the plain
blend are then scored on half B, the realised gain. Prints one row per halving and the mean and standard
deviation of (estimated - realised) gain, for the estimator and for the in-sample gain beside it.

Without --train-runs the OOF logits are real, made here from ``--data-dir``'s train.json with no other
engineer's runs: word TF-IDF of the target and of the 6 turns before it, ``LogisticRegression(C=4)``
(balanced class weights unless --class-weight none), out of fold over the 5 dialogue-grouped folds of
``psydef.core.folds.assign_folds`` for seeds 42 and 20260407 (two members), cached under --cache.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import optuna
from sklearn.model_selection import train_test_split

from psydef import tracking
from psydef.calibration import SAMPLERS
from psydef.calibration.calibrate import calibrate_oof
from psydef.calibration.rule import plain_decode
from psydef.calibration.score import macro_f1

SEEDS = (42, 20260407)


def tfidf_oof(data_dir: str, class_weight: str | None, cache: Path):
    """(logits per member, y, dialogue ids): out-of-fold log-probabilities of a TF-IDF + LR model per seed."""
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from psydef.core.data import dataset_digest, read_split
    from psydef.core.folds import assign_folds

    table = read_split(Path(data_dir) / "train.json", labelled=True)
    path = cache / f"tfidf-lr-{class_weight or 'none'}-{dataset_digest(table)}.npz"
    if path.is_file():
        saved = np.load(path, allow_pickle=False)
        print(f"data: OOF logits of TF-IDF + LR (class_weight={class_weight}) read from the cache {path}")
        return [saved[f"logits_{s}"] for s in SEEDS], saved["y"], saved["groups"]
    target = table["current_text"].to_numpy(dtype=object)
    context = np.array([" ".join(t["text"] for t in d[-7:-1]) for d in table["dialogue"]], dtype=object)
    y = table["label"].to_numpy()
    members = []
    for seed in SEEDS:
        folds, logits = assign_folds(table, seed=seed), np.zeros((len(y), 9))
        for k in range(folds.max() + 1):
            fit, held = folds != k, folds == k
            views = [TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True) for _ in range(2)]
            x_fit = hstack([v.fit_transform(t[fit]) for v, t in zip(views, (target, context))]).tocsr()
            x_held = hstack([v.transform(t[held]) for v, t in zip(views, (target, context))]).tocsr()
            model = LogisticRegression(C=4, class_weight=class_weight, max_iter=3000).fit(x_fit, y[fit])
            logits[held] = model.predict_log_proba(x_held)
        members.append(logits)
        print(f"data: OOF logits of seed {seed} made (TF-IDF + LR, class_weight={class_weight})")
    cache.mkdir(parents=True, exist_ok=True)
    groups = table["dialogue_id"].to_numpy(dtype=str)
    np.savez(path, y=y, groups=groups, **{f"logits_{s}": x for s, x in zip(SEEDS, members)})
    return members, y, groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-runs", nargs="?", const="",
                        help="comma-separated train run ids; no value: the runs tune would pick")
    parser.add_argument("--tracking-uri", default=tracking.DEFAULT_TRACKING_URI, help="with --train-runs")
    parser.add_argument("--data-dir", default="../shared/data/psydefconv", help="without --train-runs")
    parser.add_argument("--class-weight", choices=("balanced", "none"), default="balanced",
                        help="without --train-runs: the LR's class weights")
    parser.add_argument("--cache", default="/tmp/psydef-bench", type=Path, help="without --train-runs")
    parser.add_argument("--halvings", type=int, default=10)
    parser.add_argument("--sampler", choices=SAMPLERS, default="random")
    parser.add_argument("--n-trials", type=int, default=2000, help="trials of the search on half A")
    parser.add_argument("--inner-trials", type=int, default=2000, help="trials of each search inside the estimate")
    parser.add_argument("--n-splits", type=int, default=5)
    parser.add_argument("--n-repeats", type=int, default=2)
    parser.add_argument("--group-by", choices=("record", "dialogue"), default="record",
                        help="the estimate's folds (the halvings are always record-level)")
    parser.add_argument("--no-gate", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-jobs", type=int, default=-1, help="processes at once, as tune's n_jobs (-1: one per CPU)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    if args.train_runs is not None:
        from psydef.stages.tune import load_oof, pick_train_runs

        experiment_id = tracking.configure(args.tracking_uri)
        run_ids = (args.train_runs.split(",") if args.train_runs
                   else [r.info.run_id for r in pick_train_runs(experiment_id)])
        oof = load_oof(run_ids)
        logits, y, groups = oof.logits, oof.y, oof.groups
        print(f"data: OOF logits logged by train runs {run_ids} in {tracking.redact_uri(args.tracking_uri)}")
    else:
        logits, y, groups = tfidf_oof(args.data_dir, None if args.class_weight == "none" else "balanced", args.cache)
    print(f"rows {len(y)}, dialogues {len(np.unique(groups))}, members {len(logits)}, level counts "
          f"{np.bincount(y, minlength=9).tolist()}, plain-blend OOF macro-F1 {macro_f1(y, plain_decode(logits)):.4f}")
    print(f"search: {args.sampler}, {args.n_trials} trials on half A, gate {not args.no_gate}; estimate: "
          f"{args.n_repeats} x {args.n_splits} {args.group_by}-level folds, {args.inner_trials} trials each\n")

    print(f"{'halving':>7} {'in-sample':>9} {'estimated':>9} {'realised':>9} {'est-real':>9} {'chosen':>10} "
          f"{'s':>5}   (gains over the plain blend; realised = on half B)")
    rows, start = [], time.perf_counter()
    for h in range(args.halvings):
        a, b = train_test_split(np.arange(len(y)), test_size=0.5, stratify=y, random_state=args.seed * 1000 + h)
        t = time.perf_counter()
        report = calibrate_oof([x[a] for x in logits], y[a], sampler=args.sampler, n_trials=args.n_trials,
                               inner_n_trials=args.inner_trials, gate=not args.no_gate, n_splits=args.n_splits,
                               n_repeats=args.n_repeats, seed=args.seed + h,
                               groups=groups[a] if args.group_by == "dialogue" else None, n_jobs=args.n_jobs,
                               show_progress=False)
        half_b = [x[b] for x in logits]
        plain_b = macro_f1(y[b], plain_decode(half_b))
        realised = macro_f1(y[b], report.search.spec([f"m{i}" for i in range(len(logits))]).decode_logits(half_b)) - plain_b
        in_sample = report.calibrated_in_sample_f1 - report.raw_f1
        rows.append((in_sample, report.estimate.gain, realised, realised if report.calibrated else 0.0))
        print(f"{h:7d} {in_sample:+9.4f} {report.estimate.gain:+9.4f} {realised:+9.4f} "
              f"{report.estimate.gain - realised:+9.4f} {('calibrated' if report.calibrated else 'plain'):>10} "
              f"{time.perf_counter() - t:5.1f}")
    in_sample, estimated, realised, chosen = map(np.array, zip(*rows))
    print(f"\nover {args.halvings} halvings ({time.perf_counter() - start:.0f} s):")
    print(f"  estimated - realised gain: mean {np.mean(estimated - realised):+.4f}, std {np.std(estimated - realised):.4f}")
    print(f"  in-sample - realised gain: mean {np.mean(in_sample - realised):+.4f}, std {np.std(in_sample - realised):.4f}")
    print(f"  realised gain: mean {np.mean(realised):+.4f}, std {np.std(realised):.4f}; "
          f"of the rule chosen by the estimate (0 when plain): mean {np.mean(chosen):+.4f}")


if __name__ == "__main__":
    main()
