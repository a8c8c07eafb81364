"""`promote`: move the `production` alias to a model version (champion/challenger gate)."""
from entrypoints.common import stage_command
from psydef.stages.config import PromoteConfig


@stage_command("promote", PromoteConfig)
def promote(config: PromoteConfig, experiment_id: str):
    """Load a version, check that it predicts, gate it against production and make it production."""
    from psydef.stages.promote import promote as promote_version

    promote_version(config.version, name=config.name, force=config.force, legacy_stage=config.legacy_stage,
                    min_gain=config.min_gain)


if __name__ == "__main__":
    promote()
