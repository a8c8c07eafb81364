"""`aggregate`: a train run's OOF logits, test probabilities and metrics from its complete fold runs."""
from entrypoints.common import stage_command
from psydef.stages.config import AggregateConfig


@stage_command("aggregate", AggregateConfig)
def aggregate(config: AggregateConfig, experiment_id: str):
    """Aggregate a train run whose folds were trained as separate jobs (-P fold=k) and end it FINISHED:
    what the job completing the last fold does; running it again rewrites the same results."""
    from psydef.stages.train import run_aggregate

    run_aggregate(config)


if __name__ == "__main__":
    aggregate()
