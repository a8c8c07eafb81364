"""The `psydef` command, generated from one table of entry points (:data:`ENTRY_POINTS`).

Each row names a command, the settings dataclass its options are generated from
(:mod:`psydef.stages.config`), the function it runs (``module:name``, imported only when the command
runs, so ``psydef NAME --help`` loads neither MLflow nor torch nor pandas) and its one-line help. The
MLproject's entry points are the tracked rows, run as ``python -m entrypoints NAME --option {param}
...`` (tests/test_config.py checks both ways). A command checks its settings before MLflow is touched,
then configures tracking and calls the function; bad settings, missing files and bad input exit
non-zero with one line. While it runs, psydef's log records are its console lines on stdout
(:func:`psydef.progress.console_logging`: level INFO, or $PSYDEF_LOG_LEVEL).
"""
from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Callable
from pathlib import Path

import click

from psydef import progress, tracking
from psydef.settings import base_type, option_name, resolve_choices
from psydef.stages.config import (AggregateConfig, FetchConfig, MainConfig, PredictConfig, PrepareConfig,
                                  PromoteConfig, RegisterConfig, TrainConfig, TuneConfig)

_METAVARS = {int: "INTEGER", float: "FLOAT", bool: "BOOLEAN", Path: "PATH", str: "TEXT", tuple: "LIST", dict: "K=V,..."}


def _config_only(function, config, experiment_id):
    function(config)


def _in_experiment(function, config, experiment_id):
    """For a stage that creates runs itself (train's parent, tune, main's pipeline run)."""
    function(config, experiment_id=experiment_id)


def _print_paths(function, config: FetchConfig, experiment_id):
    for split, path in function(config.dest, revision=config.revision).items():
        click.echo(f"{split}: {path}")


@dataclasses.dataclass(frozen=True)
class EntryPoint:
    """A command: its options are the fields of ``config``; it runs ``call(function, config,
    experiment_id)``. ``tracked``: it opens MLflow runs, so it takes ``--tracking-uri`` and
    ``--experiment-name`` and is an MLproject entry point."""
    config: type
    function: str
    help: str
    call: Callable = _config_only
    tracked: bool = True


ENTRY_POINTS = {
    "fetch-data": EntryPoint(FetchConfig, "psydef.core.fetch:fetch_data",
                             "Download Splits/train.json and Splits/test.json of AIMH/PsyDefConv (CC BY-NC 4.0) "
                             "into DEST.", call=_print_paths, tracked=False),
    "prepare": EntryPoint(PrepareConfig, "psydef.stages.prepare:run_prepare",
                          "Validate train.json/test.json, augment minority levels and log grouped stratified folds."),
    "train": EntryPoint(TrainConfig, "psydef.stages.train:run_train",
                        "Train one seed: a parent run, one nested run per fold with OOF/test logits and the adapter.",
                        call=_in_experiment),
    "aggregate": EntryPoint(AggregateConfig, "psydef.stages.train:run_aggregate",
                            "Aggregate a train run whose folds were trained as separate jobs (-P fold=k) and end it "
                            "FINISHED: what the job completing the last fold does; running it again rewrites the same "
                            "results."),
    "tune": EntryPoint(TuneConfig, "psydef.stages.tune:run_tune",
                       "Search bias vectors, blend weights and the level-7 gate on the members' logged OOF logits.",
                       call=_in_experiment),
    "register": EntryPoint(RegisterConfig, "psydef.stages.register:run_register",
                           "Register the tuned ensemble (members' fold adapters + calibration) as a new version of "
                           "NAME."),
    "promote": EntryPoint(PromoteConfig, "psydef.stages.promote:run_promote",
                          "Load a version, check that it predicts, gate it against production and make it "
                          "production."),
    "predict": EntryPoint(PredictConfig, "psydef.stages.predict:run_predict",
                          "Write prediction.json (+ .zip) for every record; log metrics when the file has labels."),
    "main": EntryPoint(MainConfig, "psydef.stages.pipeline:run_main",
                       "The whole chain on DATA_DIR (train.json + test.json) as nested runs of one pipeline run.",
                       call=_in_experiment),
}


class SettingType(click.ParamType):
    """A setting's CLI text, parsed as the config parses ``-P`` values (``''`` for None, lists as
    ``a,b``, flags as ``true``/``false``)."""

    def __init__(self, config: type, name: str):
        self.config, self.setting = config, name
        self.field = {f.name: f for f in dataclasses.fields(config)}[name]
        self.kind, self.optional = base_type(typing.get_type_hints(config)[name])
        self.name = _METAVARS.get(typing.get_origin(self.kind) or self.kind, "TEXT").lower()

    def get_metavar(self, param, ctx=None) -> str:
        if self.field.metadata["choices"]:  # imported only when help is printed for this command
            return "[" + "|".join(map(str, resolve_choices(self.field.metadata["choices"]))) + "]"
        metavar = _METAVARS.get(typing.get_origin(self.kind) or self.kind, "TEXT")
        none = self.field.metadata["none"]
        return f"{metavar}|{none}" if self.optional and none else metavar

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            return self.config.parse(self.setting, value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


def _option(config: type, f: dataclasses.Field):
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    kwargs = {"type": SettingType(config, f.name), "help": f.metadata["help"], "required": required}
    if not required:
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs |= {"default": config.spell(f.name, default), "show_default": default not in (None, "", (), {})}
    return click.option(option_name(f.name), f.name, **kwargs)


def command(name: str) -> click.Command:
    """The click command of entry point ``name``."""
    entry = ENTRY_POINTS[name]

    def run(experiment_name=None, tracking_uri=None, **values):
        try:
            settings = entry.config(**values)
        except ValueError as err:
            raise click.UsageError(str(err)) from err
        module, function = entry.function.split(":")
        try:
            with progress.console_logging(progress.console_level()):
                experiment_id = tracking.configure(tracking_uri, experiment_name) if entry.tracked else None
                entry.call(getattr(importlib.import_module(module), function), settings, experiment_id)
        except (ValueError, FileNotFoundError, KeyError) as err:
            raise click.ClickException(str(err)) from err

    for f in reversed(dataclasses.fields(entry.config)):
        run = _option(entry.config, f)(run)
    if entry.tracked:
        run = click.option("--experiment-name", default=None, envvar="MLFLOW_EXPERIMENT_NAME",
                           help=f"MLflow experiment (default: {tracking.DEFAULT_EXPERIMENT}).")(run)
        run = click.option("--tracking-uri", default=None, envvar="MLFLOW_TRACKING_URI",
                           help=f"MLflow tracking URI (default: {tracking.DEFAULT_TRACKING_URI}).")(run)
    return click.command(name, help=entry.help)(run)


@click.group()
def cli():
    """psydef: MLflow-tracked PsyDefDetect experiments (prepare -> train -> tune -> register -> promote -> predict).

    Progress lines go to stdout; PSYDEF_LOG_LEVEL=WARNING keeps only warnings."""


for _name in ENTRY_POINTS:
    cli.add_command(command(_name))

if __name__ == "__main__":
    cli()
