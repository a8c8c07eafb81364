"""`predict`: label an official-format file with a registered ensemble; write the CodaBench files."""
from entrypoints.common import stage_command
from psydef.stages.config import PredictConfig


@stage_command("predict", PredictConfig)
def predict(config: PredictConfig, experiment_id: str):
    """Write prediction.json (+ .zip) for every record; log metrics when the file has labels."""
    from psydef.stages.predict import run_predict

    run_predict(config)


if __name__ == "__main__":
    predict()
