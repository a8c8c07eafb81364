"""`train`: one seed over all folds (or one fold), fold runs nested under a parent run."""
import json

import click

from entrypoints.common import tracked
from psydef.backbones import AUTO, BACKBONES
from psydef.stages.train import run_train


def parse_hyper(value: str) -> dict:
    """``key=value,key=value`` (values parsed as JSON where they parse, else kept as strings)."""
    hyper = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not key=value", param_hint="--hyper")
        try:
            hyper[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            hyper[key.strip()] = raw
    return hyper


@click.command("train")
@click.option("--data-dir", default="data/psydefconv", show_default=True, type=click.Path())
@click.option("--seed", default=42, show_default=True, type=int)
@click.option("--prepare-run-id", default="", help="Use this prepare run's folds (default: run prepare first).")
@click.option("--backbone", default=AUTO, show_default=True, type=click.Choice([AUTO, *BACKBONES]),
              help="auto = qwen3-8b-qlora when CUDA is available, else minilm.")
@click.option("--model", default="Qwen/Qwen3-8B", show_default=True, help="HF id or local path (LLM backbone).")
@click.option("--fold", default="all", show_default=True, help="'all', or one fold index (trains under a parent).")
@click.option("--parent-run-id", default="", help="With --fold k: the parent run to train under.")
@click.option("--resume", default=False, type=bool, help="true: reuse the finished folds of the latest parent.")
@click.option("--epochs", default="", help="Training epochs (default: the backbone's).")
@click.option("--learning-rate", default="", help="Learning rate (default: the backbone's).")
@click.option("--hyper", default="", help="More backbone hyper-parameters as key=value,key=value.")
@tracked
def train(data_dir, seed, prepare_run_id, backbone, model, fold, parent_run_id, resume, epochs, learning_rate, hyper):
    """Train one seed: a parent run, one nested run per fold with OOF/test logits and the adapter."""
    params = parse_hyper(hyper)
    params |= parse_hyper(f"epochs={epochs}" * bool(epochs) + f",learning_rate={learning_rate}" * bool(learning_rate))
    if fold != "all" and not fold.lstrip("-").isdigit():
        raise click.BadParameter(f"{fold!r} is neither 'all' nor a fold index", param_hint="--fold")
    run_train(data_dir, seed=seed, prepare_run_id=prepare_run_id or None, backbone=backbone, model=model,
              fold=None if fold == "all" else int(fold), parent_run_id=parent_run_id or None,
              resume=resume, hyper=params)


if __name__ == "__main__":
    train()
