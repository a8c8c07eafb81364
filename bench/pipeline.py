"""The README's main command on the real data (CPU default backbone, two seeds) in a fresh temporary
tracking store and an empty embedding cache (unless --warm-cache: then $PSYDEF_CACHE_DIR): wall time
per stage and in total, peak memory, and the official OOF macro-F1 before and after calibration.

    python bench/pipeline.py --data-dir ../shared/data/psydefconv [--seeds 42,20260407] [--store-dir DIR]

--store-dir keeps the tracking store (DIR/mlflow.db), e.g. for bench/decode.py --tracking-uri.
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow

from psydef import tracking
from psydef.backbones import CPU_DEFAULT

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/psydefconv")
    parser.add_argument("--seeds", default="42,20260407")
    parser.add_argument("--warm-cache", action="store_true", help="keep $PSYDEF_CACHE_DIR (default: an empty one)")
    parser.add_argument("--store-dir", default=None, help="an empty folder for the tracking store (default: a "
                        "temporary one, deleted at the end)")
    args = parser.parse_args()
    data_dir = Path(args.data_dir).resolve()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = str(Path(args.store_dir).resolve()) if args.store_dir else scratch
        Path(tmp).mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{tmp}/mlflow.db"
        cache = {} if args.warm_cache else {"PSYDEF_CACHE_DIR": f"{tmp}/embedding-cache"}
        env = {**os.environ, **cache, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "main", "-P", f"data_dir={data_dir}",
                   "-P", f"seeds={args.seeds}", "-P", f"out_dir={tmp}", "--env-manager", "local",
                   "--experiment-name", "psydef"]
        start = time.perf_counter()
        subprocess.run(command, env=env, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        total = time.perf_counter() - start
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        tracking.configure(uri, "psydef")
        runs = mlflow.search_runs(experiment_names=["psydef"], output_format="list",
                                  order_by=["attributes.start_time ASC"])
    print(f"main on {data_dir} (seeds {args.seeds}, members auto -> CPU {CPU_DEFAULT}, "
          f"embedding cache {'warm' if args.warm_cache else 'cold'}), {os.cpu_count()} CPUs, "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    for run in runs:
        stage = run.data.tags.get(tracking.STAGE)
        if stage in (tracking.FOLD_RUN, None):
            continue
        print(f"  {stage:9s} {run.info.run_name:40s} {(run.info.end_time - run.info.start_time) / 1000:8.1f} s")
    print(f"  total (mlflow run, start to end) {total:.1f} s; peak resident memory of one process {peak_mib:.0f} MiB")
    for run in runs:
        metrics, stage = run.data.metrics, run.data.tags.get(tracking.STAGE)
        if stage == tracking.TRAIN:
            print(f"  train {tracking.member_of(run)} seed {run.data.tags[tracking.SEED]}: OOF macro-F1 (1..8) "
                  f"{metrics['oof_macro_f1']:.4f}")
        if stage == tracking.TUNE:
            print(f"  tune: OOF macro-F1 (1..8) raw blend {metrics['oof_macro_f1_raw']:.4f}, calibrated in-sample "
                  f"{metrics['oof_macro_f1_calibrated']:.4f}, estimated on unseen rows {metrics['oof_macro_f1_estimated']:.4f}")


if __name__ == "__main__":
    main()
