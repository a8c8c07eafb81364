"""`main`: prepare, train each seed, tune, register, promote and predict, as one pipeline run."""
from entrypoints.common import stage_command
from psydef.stages.config import MainConfig


@stage_command("main", MainConfig)
def main(config: MainConfig, experiment_id: str):
    """The whole chain on DATA_DIR (train.json + test.json) as nested runs of one pipeline run."""
    from psydef.stages.pipeline import run_main

    run_main(config, experiment_id=experiment_id)


if __name__ == "__main__":
    main()
