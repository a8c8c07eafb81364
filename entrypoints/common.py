"""What every entry point shares: where to track, and turning input errors into clean exits."""
from __future__ import annotations

import functools

import click

from psydef import tracking


def tracked(command):
    """Add ``--tracking-uri``/``--experiment-name``, configure MLflow before the command runs, and
    report bad input (ValueError, missing files) as a one-line error with a non-zero exit."""

    @click.option("--experiment-name", default=None, envvar="MLFLOW_EXPERIMENT_NAME",
                  help=f"MLflow experiment (default: {tracking.DEFAULT_EXPERIMENT}).")
    @click.option("--tracking-uri", default=None, envvar="MLFLOW_TRACKING_URI",
                  help=f"MLflow tracking URI (default: {tracking.DEFAULT_TRACKING_URI}).")
    @functools.wraps(command)
    def wrapper(*args, experiment_name, tracking_uri, **kwargs):
        try:
            tracking.configure(tracking_uri, experiment_name)
            return command(*args, **kwargs)
        except (ValueError, FileNotFoundError, KeyError) as err:
            raise click.ClickException(str(err)) from err

    return wrapper
