"""`main`: prepare, train each seed, tune, register, promote and predict, as one pipeline run."""
import click

from entrypoints.common import tracked
from entrypoints.train import parse_hyper
from psydef import tracking
from psydef.backbones import AUTO, BACKBONES
from psydef.stages.pipeline import run_main
from psydef.calibration.study import SAMPLERS


@click.command("main")
@click.option("--data-dir", default="data/psydefconv", show_default=True, type=click.Path())
@click.option("--seeds", default="42,20260407", show_default=True, help="Comma-separated training seeds.")
@click.option("--backbone", default=AUTO, show_default=True, type=click.Choice([AUTO, *BACKBONES]))
@click.option("--model", default="Qwen/Qwen3-8B", show_default=True, help="HF id or local path (LLM backbone).")
@click.option("--hyper", default="", help="Backbone hyper-parameters as key=value,key=value.")
@click.option("--n-trials", default=2000, show_default=True, type=int)
@click.option("--inner-trials", default=500, show_default=True, type=int, help="Trials per search inside the gain estimate.")
@click.option("--sampler", default="tpe", show_default=True, type=click.Choice(SAMPLERS))
@click.option("--gate", default=True, show_default=True, type=bool, help="Use the level-7 confidence gate.")
@click.option("--model-name", default=tracking.MODEL_NAME, show_default=True)
@click.option("--out-dir", default=".", show_default=True, type=click.Path(), help="Where prediction.json goes.")
@tracked
def main(data_dir, seeds, backbone, model, hyper, n_trials, inner_trials, sampler, gate, model_name, out_dir):
    """The whole chain on DATA_DIR (train.json + test.json) as nested runs of one pipeline run."""
    try:
        seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError as err:
        raise click.BadParameter(f"{seeds!r} is not a comma-separated list of integers", param_hint="--seeds") from err
    run_main(data_dir, seeds=seed_list, backbone=backbone, model=model, hyper=parse_hyper(hyper), n_trials=n_trials,
             sampler=sampler, gate=gate, inner_trials=inner_trials, model_name=model_name, out_dir=out_dir)


if __name__ == "__main__":
    main()
