"""`tune`: calibrate the ensemble of logged train runs on their OOF logits (Optuna), log ensemble.json."""
import click

from entrypoints.common import tracked
from psydef.calibration.study import SAMPLERS
from psydef.stages.tune import run_tune


@click.command("tune")
@click.option("--train-runs", default="", help="Comma-separated train (parent) run ids; default: the latest "
                                               "FINISHED train run of each seed sharing the newest one's data "
                                               "digest and backbone.")
@click.option("--n-trials", default=2000, show_default=True, type=click.IntRange(min=1),
              help="Complete trials the study should hold (a stored study is resumed up to this total).")
@click.option("--sampler", default="tpe", show_default=True, type=click.Choice(SAMPLERS))
@click.option("--gate", default=True, show_default=True, type=click.BOOL,
              help="Search the level-7 confidence gate tau7 as well (true/false).")
@click.option("--seed", default=0, show_default=True, type=int, help="Sampler seed; give each parallel tune its own.")
@click.option("--storage", default="", help="Optuna storage: sqlite:///optuna.db or a journal file (path.journal); "
                                            "default: in memory.")
@click.option("--study-name", default="", help="Default: calibration-<member run id prefixes>.")
@click.option("--inner-trials", default=500, show_default=True, type=click.IntRange(min=1),
              help="Trials of each search rerun inside the estimate of the calibration's gain.")
@tracked
def tune(train_runs, n_trials, sampler, gate, seed, storage, study_name, inner_trials):
    """Search bias vectors, blend weights and the level-7 gate on the members' logged OOF logits."""
    run_tune([r.strip() for r in train_runs.split(",") if r.strip()] or None, n_trials=n_trials, sampler=sampler,
             gate=gate, seed=seed, storage=storage or None, study_name=study_name or None,
             inner_trials=inner_trials)


if __name__ == "__main__":
    tune()
