"""`predict`: label an official-format file with a registered ensemble; write the CodaBench files."""
import click

from entrypoints.common import tracked
from psydef import tracking
from psydef.stages.predict import run_predict


@click.command("predict")
@click.option("--data-dir", default="data/psydefconv", show_default=True, type=click.Path(),
              help="Folder holding test.json, or the path of any official-format split file.")
@click.option("--model-uri", default=tracking.PRODUCTION_URI, show_default=True,
              help="Model to predict with: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model ...")
@click.option("--out-dir", default=".", show_default=True, type=click.Path(),
              help="Where prediction.json and prediction.zip are written.")
@tracked
def predict(data_dir, model_uri, out_dir):
    """Write prediction.json (+ .zip) for every record; log metrics when the file has labels."""
    run_predict(data_dir, model_uri=model_uri, out_dir=out_dir)


if __name__ == "__main__":
    predict()
