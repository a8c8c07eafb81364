"""How many trials the calibration search needs, per sampler, and what scoring costs.

    python bench/search.py                          # realistic synthetic OOF logits of two seeds
    python bench/search.py --oof a.npz,b.npz        # real OOF bundles: arrays ids, logits, y, groups
    python bench/search.py --train-runs             # OOF logits logged by the latest two train runs (seeds)
    python bench/search.py --train-runs A,B --tracking-uri sqlite:///mlflow.db   # these train runs
    python bench/search.py --storages               # what a stored study costs (in memory, SQLite, journal)
    python bench/search.py --storages --postgres postgresql+psycopg2://USER@HOST/DB   # ... and PostgreSQL

Prints the best OOF macro-F1 (levels 1..8) after 100, 300, 1,000, 2,200 and 22,000 trials for each
sampler (random is the anchor: the paper's random search of 22,000 bias vectors), the wall time of
each study, and the wall time of scoring 22,000 candidates in numpy alone. TPE's and CMA-ES's cost
per trial grows with the history, so their studies stop at --time-cap seconds and say where.

``--storages`` times the same study (tune's default batches) in memory and on each storage tune
accepts, run_study's way (an in-memory mirror, the cross-process lock per batch, complete trials
written back) against Optuna's own storages with batched ask/tell: why the mirror stays.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import optuna

from psydef import tracking
from psydef.stages import tune
from psydef.calibration import SAMPLERS
from psydef.calibration.score import CandidateScorer
from psydef.calibration.study import SearchSpace, run_study
from psydef.stages.tune import align_members

CHECKPOINTS = (100, 300, 1_000, 2_200, 22_000)
PRIOR = np.array([10, 4, 3, 10, 8, 5, 6.5, 52, 1.5]) / 100  # level 7 ~52 %, level 8 ~1.5 %


def synthetic_oof(seed: int, n_rows: int, n_dialogues: int, n_members: int = 2):
    """OOF logits of ``n_members`` seeds of one model: a true-class signal and the log prior (so the
    plain argmax over-predicts level 7, as the paper's models do), an error shared by the seeds
    (same model, same data) and noise of each seed's own."""
    rng = np.random.default_rng(seed)
    groups = np.sort(rng.integers(0, n_dialogues, size=n_rows))
    y = rng.choice(len(PRIOR), size=n_rows, p=PRIOR)
    shared = 0.8 * rng.normal(size=(n_rows, len(PRIOR)))
    logits = [1.2 * np.eye(len(PRIOR))[y] + np.log(PRIOR) + shared + 0.7 * rng.normal(size=shared.shape)
              for _ in range(n_members)]
    ids = [f"d{g:03d}_r{i:04d}" for i, g in enumerate(groups)]
    return ids, logits, y, groups


def load_oof(paths: list[str]):
    bundles = [np.load(p, allow_pickle=False) for p in paths]
    ids, logits = align_members([(p, b["ids"].tolist(), b["logits"]) for p, b in zip(paths, bundles)])
    ys, groups = [], []
    for b in bundles:
        position = {i: row for row, i in enumerate(b["ids"].tolist())}
        rows = [position[i] for i in ids]
        ys.append(b["y"][rows])
        groups.append(b["groups"][rows])
    if any(not (np.array_equal(ys[0], v) and np.array_equal(groups[0], g)) for v, g in zip(ys, groups)):
        raise SystemExit(f"{paths} disagree on y or groups for the same ids.")
    return ids, logits, ys[0], groups[0]


def optuna_ask_tell(scorer: CandidateScorer, storage, n_trials: int, seed: int, batch: int = 8) -> None:
    """The alternative to run_study's in-memory mirror: TPE batches asked and told on the storage itself."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    space = SearchSpace(scorer.n_members)
    if storage is not None and not storage.startswith(("sqlite:", "postgresql")):
        storage = JournalStorage(JournalFileBackend(storage))
    study = optuna.create_study(storage=storage, sampler=optuna.samplers.TPESampler(seed=seed), direction="maximize",
                                study_name=f"bench-direct-{time.time_ns()}")
    while len(study.trials) < n_trials:
        trials = [study.ask(fixed_distributions=space.distributions()) for _ in range(min(batch, n_trials - len(study.trials)))]
        values = scorer.score(*space.to_arrays(space.params_matrix([t.params for t in trials])))
        for trial, value in zip(trials, values.tolist()):
            study.tell(trial, value)


def compare_storages(scorer: CandidateScorer, postgres: str | None, tpe_trials: int, random_trials: int,
                     seed: int) -> None:
    """run_study (in-memory mirror, lock, write-back) on each storage, against Optuna's own storages
    with batched ask/tell (TPE; random trials are stored with add_trials either way)."""
    with tempfile.TemporaryDirectory() as tmp:
        storages = {"in memory": None, "sqlite": f"sqlite:///{tmp}/optuna.db", "journal": f"{tmp}/optuna.journal"}
        if postgres:
            storages["postgresql"] = postgres
        print(f"\nstudy wall time by storage (one process; batches: tpe 8, random 1024)\n"
              f"{'storage':11} {'sampler':8} {'how':32} {'trials':>7} {'wall s':>7} {'ms/trial':>9}")
        runs = [("tpe", tpe_trials, "run_study (mirror + write-back)"), ("tpe", tpe_trials, "Optuna ask/tell on the storage"),
                ("random", random_trials, "run_study (add_trials)")]
        for sampler, n, how in runs:
            for label, storage in storages.items():
                if storage is None and how.startswith("Optuna"):
                    continue
                t = time.perf_counter()
                if how.startswith("Optuna"):
                    optuna_ask_tell(scorer, storage, n, seed)
                else:
                    run_study(scorer, n_trials=n, sampler=sampler, seed=seed, storage=storage, show_progress=False,
                              study_name=f"bench-{sampler}-{time.time_ns()}")
                wall = time.perf_counter() - t
                print(f"{label:11} {sampler:8} {how:32} {n:7,} {wall:7.1f} {1000 * wall / n:9.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--oof", help="comma-separated .npz files (ids, logits, y, groups), one per member")
    parser.add_argument("--train-runs", nargs="?", const="",
                        help="comma-separated train run ids; no value: the latest two train runs of different seeds "
                             "that share the newest one's data digest and backbone (what tune picks)")
    parser.add_argument("--tracking-uri", default=tracking.DEFAULT_TRACKING_URI, help="with --train-runs")
    parser.add_argument("--samplers", default="random,tpe,cmaes")
    parser.add_argument("--n-trials", type=int, default=22_000)
    parser.add_argument("--time-cap", type=float, default=90.0, help="seconds per TPE or CMA-ES study")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=1_870, help="synthetic: OOF rows (80%% of 2,336 seeker turns)")
    parser.add_argument("--dialogues", type=int, default=160, help="synthetic: dialogues")
    parser.add_argument("--no-gate", action="store_true", help="search without the tau7 gate")
    parser.add_argument("--storages", action="store_true", help="only compare the study's storages")
    parser.add_argument("--postgres", help="with --storages: a postgresql+psycopg2:// address to compare too")
    parser.add_argument("--storage-trials", default="2000,20000", help="with --storages: tpe,random trials")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    if args.oof:
        paths = args.oof.split(",")
        ids, logits, y, groups = load_oof(paths)
        print(f"data: OOF logits read from {paths}")
    elif args.train_runs is not None:
        experiment_id = tracking.configure(args.tracking_uri)
        run_ids = (args.train_runs.split(",") if args.train_runs
                   else [r.info.run_id for r in tune.pick_train_runs(experiment_id)[:2]])
        oof = tune.load_oof(run_ids)
        ids, logits, y, groups = oof.ids, oof.logits, oof.y, oof.groups
        print(f"data: OOF logits logged by train runs {run_ids} in {tracking.redact_uri(args.tracking_uri)}")
    else:
        ids, logits, y, groups = synthetic_oof(args.seed, args.rows, args.dialogues)
        print("data: SYNTHETIC OOF logits (no --oof or --train-runs given): 2 seeds, shared error + own noise, majority-biased")
    print(f"rows {len(ids)}, dialogues {len(np.unique(groups))}, members {len(logits)}, "
          f"level counts {np.bincount(y, minlength=9).tolist()}")

    scorer = CandidateScorer.from_logits(logits, y)
    m = scorer.n_members
    raw = scorer.score(np.full((1, m), 1 / m), np.zeros((1, 9)))[0]
    print(f"raw equal-weight argmax OOF macro-F1: {raw:.4f}")

    if args.storages:
        tpe_trials, random_trials = map(int, args.storage_trials.split(","))
        compare_storages(scorer, args.postgres, tpe_trials, random_trials, args.seed)
        return

    space = SearchSpace(m, gate=not args.no_gate)
    candidates = space.to_arrays(space.sample(np.random.default_rng(args.seed), 22_000))
    t = time.perf_counter()
    scorer.score(*candidates)
    elapsed = time.perf_counter() - t
    print(f"scoring 22,000 candidates (numpy only, chunks of {scorer.chunk_size}): {elapsed:.2f} s = "
          f"{22_000 / elapsed:,.0f} candidates/s = {22_000 * len(y) / elapsed / 1e6:.1f} M candidate-rows/s")

    header = f"{'sampler':8} {'trials':>7} {'wall s':>7} " + " ".join(f"{f'@{c:,}':>8}" for c in CHECKPOINTS)
    rows = []
    for sampler in args.samplers.split(","):
        if sampler not in SAMPLERS:
            raise SystemExit(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
        cap = None if sampler == "random" else args.time_cap
        t = time.perf_counter()
        result = run_study(scorer, n_trials=args.n_trials, sampler=sampler, seed=args.seed,
                           gate=not args.no_gate, timeout=cap)
        wall = time.perf_counter() - t
        best = result.best_so_far()
        cells = " ".join(f"{best[c - 1]:8.4f}" if c <= len(best) else f"{'-':>8}" for c in CHECKPOINTS)
        note = f"  (stopped by the {cap:.0f} s time cap)" if len(best) < args.n_trials else ""
        rows.append(f"{sampler:8} {len(best):7,} {wall:7.1f} {cells}{note}")
    print(f"\nbest OOF macro-F1 (levels 1..8, in-sample) after N trials; '-' = not reached\n{header}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
