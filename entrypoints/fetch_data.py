"""`fetch-data`: download the official PsyDefConv splits from the Hugging Face Hub."""
import click

from psydef.stages.config import DATA_DIR


@click.command("fetch-data")
@click.option("--dest", default=str(DATA_DIR), show_default=True, type=click.Path(),
              help="Where train.json and test.json go.")
@click.option("--revision", default=None, help="A branch, tag or commit of AIMH/PsyDefConv.")
def fetch_data(dest, revision):
    """Download Splits/train.json and Splits/test.json of AIMH/PsyDefConv (CC BY-NC 4.0) into DEST."""
    from psydef.core.fetch import fetch_data as fetch  # huggingface_hub: not loaded for --help

    try:
        paths = fetch(dest, revision=revision)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    for split, path in paths.items():
        click.echo(f"{split}: {path}")


if __name__ == "__main__":
    fetch_data()
