"""`train`: one seed over all folds (or one fold), fold runs nested under a parent run."""
from entrypoints.common import stage_command
from psydef.stages.config import TrainConfig


@stage_command("train", TrainConfig)
def train(config: TrainConfig, experiment_id: str):
    """Train one seed: a parent run, one nested run per fold with OOF/test logits and the adapter."""
    from psydef.stages.train import run_train

    run_train(config, experiment_id=experiment_id)


if __name__ == "__main__":
    train()
