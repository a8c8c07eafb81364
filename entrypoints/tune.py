"""`tune`: calibrate the ensemble of logged train runs on their OOF logits (Optuna), log ensemble.json."""
from entrypoints.common import stage_command
from psydef.stages.config import TuneConfig


@stage_command("tune", TuneConfig)
def tune(config: TuneConfig, experiment_id: str):
    """Search bias vectors, blend weights and the level-7 gate on the members' logged OOF logits."""
    from psydef.stages.tune import run_tune

    run_tune(config, experiment_id=experiment_id)


if __name__ == "__main__":
    tune()
