"""`prepare`: validate the data, augment minority targets, assign folds, log them to MLflow."""
import click

from entrypoints.common import tracked
from psydef.core.folds import GROUP_BY
from psydef.stages.prepare import run_prepare


@click.command("prepare")
@click.option("--data-dir", default="data/psydefconv", show_default=True, type=click.Path(),
              help="Folder with train.json and optionally test.json.")
@click.option("--seed", default=42, show_default=True, type=int)
@click.option("--n-splits", default=5, show_default=True, type=int)
@click.option("--group-by", default="dialogue", show_default=True, type=click.Choice(GROUP_BY),
              help="dialogue: honest for new conversations; utterance: mirrors the record-level test split.")
@tracked
def prepare(data_dir, seed, n_splits, group_by):
    """Validate train.json/test.json, augment minority levels and log grouped stratified folds."""
    run_prepare(data_dir, seed=seed, n_splits=n_splits, group_by=group_by)


if __name__ == "__main__":
    prepare()
