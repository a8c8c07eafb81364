"""`register`: log a tune run's ensemble as a pyfunc model and register it as a new model version."""
import click

from entrypoints.common import tracked
from psydef import tracking
from psydef.stages.register import register as register_ensemble


@click.command("register")
@click.option("--tune-run", "tune_run_id", required=True,
              help="Run id of the tune run whose ensemble.json to register.")
@click.option("--name", default=tracking.MODEL_NAME, show_default=True, help="Registered model name.")
@tracked
def register(tune_run_id, name):
    """Register the tuned ensemble (members' fold adapters + calibration) as a new version of NAME."""
    register_ensemble(tune_run_id, name=name)


if __name__ == "__main__":
    register()
