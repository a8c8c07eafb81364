"""What every entry point shares: options generated from the stage's config, where to track, and
turning bad settings and bad input into a one-line error with a non-zero exit.

Only click and :mod:`psydef.settings` are imported here: the stage itself is imported by the
command when it runs, so ``psydef --help`` does not load MLflow, torch or pandas."""
from __future__ import annotations

import dataclasses
import functools
import typing
from pathlib import Path

import click

from psydef import tracking
from psydef.settings import base_type, option_name, resolve_choices

_METAVARS = {int: "INTEGER", float: "FLOAT", bool: "BOOLEAN", Path: "PATH", str: "TEXT", tuple: "LIST", dict: "K=V,..."}


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


def stage_command(name: str, config: type):
    """A click command named ``name`` whose options are the fields of ``config``, plus
    ``--tracking-uri``/``--experiment-name``. The decorated ``body(config, experiment_id)`` runs once
    the settings are checked (before MLflow is touched) and MLflow is configured; bad settings,
    missing files and bad input exit non-zero with one line."""

    def decorate(body):
        @functools.wraps(body)
        def command(experiment_name, tracking_uri, **values):
            try:
                settings = config(**values)
            except ValueError as err:
                raise click.UsageError(str(err)) from err
            try:
                return body(settings, tracking.configure(tracking_uri, experiment_name))
            except (ValueError, FileNotFoundError, KeyError) as err:
                raise click.ClickException(str(err)) from err

        for f in reversed(dataclasses.fields(config)):
            command = _option(config, f)(command)
        command = click.option("--experiment-name", default=None, envvar="MLFLOW_EXPERIMENT_NAME",
                               help=f"MLflow experiment (default: {tracking.DEFAULT_EXPERIMENT}).")(command)
        command = click.option("--tracking-uri", default=None, envvar="MLFLOW_TRACKING_URI",
                               help=f"MLflow tracking URI (default: {tracking.DEFAULT_TRACKING_URI}).")(command)
        return click.command(name)(command)

    return decorate
