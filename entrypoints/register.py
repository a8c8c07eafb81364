"""`register`: log a tune run's ensemble as a pyfunc model and register it as a new model version."""
from entrypoints.common import stage_command
from psydef.stages.config import RegisterConfig


@stage_command("register", RegisterConfig)
def register(config: RegisterConfig, experiment_id: str):
    """Register the tuned ensemble (members' fold adapters + calibration) as a new version of NAME."""
    from psydef.stages.register import register as register_ensemble

    register_ensemble(config.tune_run, name=config.name)


if __name__ == "__main__":
    register()
