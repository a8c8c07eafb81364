"""Wall time of `train` with the CPU default backbone: per fold, in total, and the share spent in
MLflow logging (the fold runs' artifact/metric calls), on a fresh local SQLite store in a temp dir.

    python bench/train_cpu.py --data-dir ../shared/data/psydefconv --seed 42
"""
import argparse
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import mlflow
import torch

from psydef import tracking
from psydef.backbones import CPU_DEFAULT
from psydef.stages.config import PrepareConfig, TrainConfig
from psydef.stages.prepare import run_prepare
from psydef.stages.train import run_train

LOGGING_CALLS = ["log_metrics", "log_params", "log_artifacts", "log_artifact", "set_tag", "set_tags", "log_text"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/psydefconv")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    data_dir = Path(args.data_dir).resolve()
    spent = defaultdict(float)

    def timed(name, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - start
        return wrapper

    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        experiment_id = tracking.configure(f"sqlite:///{tmp}/mlflow.db", "bench")
        prepared = run_prepare(PrepareConfig(data_dir=data_dir, seed=args.seed))
        patches = [mock.patch.object(mlflow, n, timed(n, getattr(mlflow, n))) for n in LOGGING_CALLS]
        for p in patches:
            p.start()
        start = time.perf_counter()
        parent = run_train(TrainConfig(data_dir=data_dir, seed=args.seed, prepare_run_id=prepared.run_id,
                                       backbone=CPU_DEFAULT), experiment_id=experiment_id)
        total = time.perf_counter() - start
        for p in patches:
            p.stop()
        folds = tracking.fold_runs(parent)
        metrics = mlflow.get_run(parent).data.metrics
    logging = sum(spent.values())
    print(f"{CPU_DEFAULT} train, seed {args.seed}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs")
    for k, run in sorted(folds.items()):
        print(f"  fold {k}: {(run.info.end_time - run.info.start_time) / 1000:.1f} s")
    print(f"  total {total:.1f} s, of which MLflow logging {logging:.1f} s ({100 * logging / total:.1f}%)")
    print(f"  OOF official macro-F1 (1..8) {metrics['oof_macro_f1']:.4f}, macro-F1 (0..8) "
          f"{metrics['oof_macro_f1_all']:.4f}, accuracy {metrics['oof_accuracy']:.4f}")


if __name__ == "__main__":
    main()
