"""`prepare`: validate the data, augment minority targets, assign folds, log them to MLflow."""
from entrypoints.common import stage_command
from psydef.stages.config import PrepareConfig


@stage_command("prepare", PrepareConfig)
def prepare(config: PrepareConfig, experiment_id: str):
    """Validate train.json/test.json, augment minority levels and log grouped stratified folds."""
    from psydef.stages.prepare import run_prepare

    run_prepare(config)


if __name__ == "__main__":
    prepare()
