"""`aggregate`: a train run's OOF logits, test probabilities and metrics from its complete fold runs."""
import click

from entrypoints.common import tracked
from psydef import tracking
from psydef.stages.prepare import load_prepared
from psydef.stages.train import aggregate as aggregate_folds


@click.command("aggregate")
@click.option("--parent-run-id", required=True, help="The train (parent) run whose fold runs to aggregate.")
@click.option("--data-dir", default="data/psydefconv", show_default=True, type=click.Path())
@click.option("--prepare-run-id", default="", help="The prepare run of its folds (default: the run's "
                                                   f"{tracking.PREPARE_RUN_ID} tag).")
@tracked
def aggregate(parent_run_id, data_dir, prepare_run_id):
    """Aggregate a train run whose folds were trained as separate jobs (-P fold=k) and end it FINISHED:
    what the job completing the last fold does; running it again rewrites the same results."""
    parent = tracking.get_run(parent_run_id, tracking.TRAIN)
    tagged = parent.data.tags.get(tracking.PREPARE_RUN_ID, "")
    if prepare_run_id and tagged and prepare_run_id != tagged:
        raise ValueError(f"train run {parent_run_id} was trained on the folds of prepare run {tagged}, "
                         f"not {prepare_run_id}")
    aggregate_folds(parent_run_id, load_prepared(prepare_run_id or tagged, data_dir))


if __name__ == "__main__":
    aggregate()
