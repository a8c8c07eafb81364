"""The README's main command on the real data (CPU default backbone, two seeds) in a fresh temporary
tracking store: wall time per stage and in total, peak memory, and the official OOF macro-F1 before
and after calibration.

    python bench/pipeline.py --data-dir ../shared/data/psydefconv [--seeds 42,20260407]
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

REPO = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/psydefconv")
    parser.add_argument("--seeds", default="42,20260407")
    args = parser.parse_args()
    data_dir = Path(args.data_dir).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
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
    print(f"main on {data_dir} (seeds {args.seeds}, backbone auto -> CPU minilm), {os.cpu_count()} CPUs, "
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
            print(f"  train seed {run.data.tags[tracking.SEED]}: OOF macro-F1 (1..8) {metrics['oof_macro_f1']:.4f}")
        if stage == tracking.TUNE:
            print(f"  tune: OOF macro-F1 (1..8) raw blend {metrics['oof_macro_f1_raw']:.4f}, calibrated in-sample "
                  f"{metrics['oof_macro_f1_calibrated']:.4f}, estimated on unseen rows {metrics['oof_macro_f1_estimated']:.4f}")


if __name__ == "__main__":
    main()
