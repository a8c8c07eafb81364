"""The `psydef` command: one subcommand per MLproject entry point."""
import click

from entrypoints.aggregate import aggregate
from entrypoints.fetch_data import fetch_data
from entrypoints.main import main
from entrypoints.predict import predict
from entrypoints.prepare import prepare
from entrypoints.promote import promote
from entrypoints.register import register
from entrypoints.train import train
from entrypoints.tune import tune


@click.group()
def cli():
    """psydef: MLflow-tracked PsyDefDetect experiments (prepare -> train -> tune -> register -> promote -> predict)."""


for command in (fetch_data, prepare, train, aggregate, tune, register, promote, predict, main):
    cli.add_command(command)

if __name__ == "__main__":
    cli()
