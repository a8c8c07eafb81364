"""The settings framework: a dataclass field declared with :func:`setting` carries its help text,
its bounds (``ge``/``gt``/``le``/``lt``) and its choices; :func:`check_fields` checks every field of
a dataclass against them. :class:`Settings` (the stage configs, :mod:`psydef.stages.config`) checks
on construction, parses and spells the command-line text and gives the run's params; the backbones
declare their hyper-parameters with :func:`setting` too, check them in ``__post_init__`` and
:func:`check_hyper` checks ``--hyper`` values against the same declarations before anything runs.

Nothing heavy is imported at module level: ``psydef --help`` reads these classes.
"""
import dataclasses
import importlib
import json
import math
import types
import typing
from dataclasses import field
from pathlib import Path


def setting(default=dataclasses.MISSING, help: str = "", *, choices: str | None = None, ge=None, gt=None, le=None,
            lt=None, unbounded: str = "", none: str = "", parse=None, spell=None, input_path: bool = False):
    """A field with its help text; ``choices`` names a tuple as ``module:NAME`` (imported when
    checked, so that ``--help`` stays fast); ``ge``/``gt``/``le``/``lt`` bound numbers
    (``unbounded`` says why a number has no bound); ``none`` is how the CLI and MLproject spell
    ``None``; ``parse``/``spell`` convert the CLI text of a non-scalar setting (a mapping, a list)
    and back; ``input_path`` marks a file or folder that is read (MLproject type ``path``, which
    MLflow checks exists)."""
    metadata = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "unbounded": unbounded,
                "none": none, "parse": parse, "spell": spell, "input_path": input_path}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def option_name(name: str) -> str:
    """A setting's command-line option (``n_trials`` -> ``--n-trials``); ``-P n_trials`` in MLproject."""
    return "--" + name.replace("_", "-")


def resolve_choices(reference: str) -> tuple:
    module, name = reference.split(":")
    return tuple(getattr(importlib.import_module(module), name))


def base_type(annotation):
    """``int`` for ``int | None``; the annotation itself otherwise; ``(type, optional)``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def check_value(where: str, kind, value, meta: dict):
    """``value`` checked against ``kind`` and the bounds and choices in ``meta``; returns it in
    canonical form (a float for an int given to a float setting, a tuple for a list, a Path)."""
    origin = typing.get_origin(kind) or kind
    if origin is bool:
        ok = isinstance(value, bool)
    elif origin is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif origin is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value):
            raise ValueError(f"{where}: must be a finite number, got {value!r}")
    elif origin is Path:
        ok = isinstance(value, (str, Path))
        value = Path(value) if ok else value
    elif origin is tuple:
        item = typing.get_args(kind)[0]
        ok = isinstance(value, (tuple, list))
        if ok:  # the bounds and choices hold for each item
            return tuple(check_value(f"{where} item", item, v, meta) for v in value)
    elif origin is dict:
        ok = isinstance(value, dict)
    else:
        ok = isinstance(value, origin)
    if not ok:
        raise ValueError(f"{where}: expected {getattr(origin, '__name__', origin)}, got {value!r}")
    if meta.get("ge") is not None and value < meta["ge"]:
        raise ValueError(f"{where}: must be >= {meta['ge']}, got {value!r}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        raise ValueError(f"{where}: must be > {meta['gt']}, got {value!r}")
    if meta.get("le") is not None and value > meta["le"]:
        raise ValueError(f"{where}: must be <= {meta['le']}, got {value!r}")
    if meta.get("lt") is not None and value >= meta["lt"]:
        raise ValueError(f"{where}: must be < {meta['lt']}, got {value!r}")
    if meta.get("choices") and value not in (choices := resolve_choices(meta["choices"])):
        raise ValueError(f"{where}: must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def check_fields(obj, where) -> None:
    """Every field of dataclass instance ``obj`` checked against its type and the bounds and choices
    its :func:`setting` declares, and set to its canonical form; ``where(name)`` names a field in
    the messages."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kind, optional = base_type(hints[f.name])
        if value is None and optional:
            continue
        object.__setattr__(obj, f.name, check_value(where(f.name), kind, value, f.metadata))


class Settings:
    """What the stage configs share: checking on construction, CLI parsing and spelling, params."""

    def __post_init__(self):
        check_fields(self, option_name)
        self.check()

    def check(self) -> None:
        """Checks across settings (a subclass's)."""

    @classmethod
    def parse(cls, name: str, text: str):
        """The value of setting ``name`` from its CLI/MLproject text; ValueError naming the option."""
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        kind, optional = base_type(typing.get_type_hints(cls)[name])
        if optional and text == f.metadata["none"]:
            return None
        if f.metadata["parse"]:
            return f.metadata["parse"](text)
        origin = typing.get_origin(kind) or kind
        try:
            if origin is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return text.lower() in ("true", "1")
            if origin is tuple:
                item = typing.get_args(kind)[0]
                return tuple(item(part.strip()) for part in text.split(",") if part.strip())
            return origin(text)
        except ValueError:
            what = (f"comma-separated list of {typing.get_args(kind)[0].__name__}" if origin is tuple
                    else getattr(origin, "__name__", origin))
            raise ValueError(f"{option_name(name)}: {text!r} is not a valid {what}"
                             + (f" (or {f.metadata['none']!r})" if optional and f.metadata["none"] else "")) from None

    @classmethod
    def spell(cls, name: str, value) -> str:
        """How the CLI and MLproject write ``value`` of setting ``name`` (what a run's param holds)."""
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        if value is None:
            return f.metadata["none"]
        if f.metadata["spell"]:
            return f.metadata["spell"](value)
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, tuple):
            return ",".join(map(str, value))
        return str(value)

    def params(self) -> dict[str, str]:
        """Every setting as the run's param, spelled as ``-P`` would give it."""
        return {f.name: self.spell(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)}


# ------------------------------------------------------------------------------------------------
# Backbone hyper-parameters: ``key=value,key=value`` checked against the backbone's dataclass fields


def parse_hyper(text: str) -> dict:
    """``key=value,key=value`` (values parsed as JSON where they parse, else kept as strings)."""
    hyper = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--hyper: {item!r} is not key=value")
        try:
            hyper[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            hyper[key.strip()] = raw
    return hyper


def spell_hyper(hyper: dict) -> str:
    return ",".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in hyper.items())


def check_hyper(backbone: str, hyper: dict, options: dict[str, str] | None = None, option: str = "--hyper") -> dict:
    """``hyper`` checked against the fields of backbone ``backbone``'s dataclass: names, types, the
    bounds and choices each field declares (:func:`setting`), and the backbone's checks across
    fields (its ``__post_init__``, run on an untrained twin: no model is loaded). Returns ``hyper``
    in canonical form. ``option`` names where the values came from (``--hyper``, or a member of
    ``--members``) and ``options`` the command-line option of a key that came from elsewhere
    (``epochs`` from ``--epochs``), for the messages."""
    from psydef.backbones import backbone_class

    options = options or {}
    cls = backbone_class(backbone)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(hyper) - set(known))
    if unknown:
        raise ValueError(f"{options.get(unknown[0], option)}: unknown hyper-parameter(s) {', '.join(unknown)} "
                         f"for backbone {backbone}; valid: {', '.join(known)}")
    hints = typing.get_type_hints(cls)
    checked = {}
    for key, value in hyper.items():
        kind, optional = base_type(hints[key])
        if value is None and optional:
            checked[key] = None
            continue
        if kind is str and not isinstance(value, str):
            value = json.dumps(value)  # a number-like model id, parsed as JSON by parse_hyper
        checked[key] = check_value(options.get(key, f"{option} {key}"), kind, value, known[key].metadata)
    try:
        cls(**checked)
    except ValueError as err:
        raise ValueError(f"{option}: {err}") from None
    return checked
