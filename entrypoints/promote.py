"""`promote`: move the `production` alias to a model version (champion/challenger gate)."""
import click

from entrypoints.common import tracked
from psydef import tracking
from psydef.stages.promote import promote as promote_version


@click.command("promote")
@click.option("--version", default="", help="Model version to promote (default: the newest).")
@click.option("--name", default=tracking.MODEL_NAME, show_default=True, help="Registered model name.")
@click.option("--force", default=False, type=bool,
              help=f"true: promote even if its {tracking.NESTED_F1} is below production's.")
@click.option("--legacy-stage", default=False, type=bool,
              help=f"true: also move it to the deprecated registry stage {tracking.LEGACY_STAGE!r}.")
@tracked
def promote(version, name, force, legacy_stage):
    """Load a version, check that it predicts, gate it against production and make it production."""
    promote_version(version or None, name=name, force=force, legacy_stage=legacy_stage)


if __name__ == "__main__":
    promote()
