"""The `psydef` command: one subcommand per MLproject entry point."""
import click

from entrypoints.prepare import prepare
from entrypoints.train import train
from entrypoints.tune import tune


@click.group()
def cli():
    """psydef: MLflow-tracked PsyDefDetect experiments (prepare -> train -> tune -> register -> promote -> predict)."""


for command in (prepare, train, tune):
    cli.add_command(command)

if __name__ == "__main__":
    cli()
