"""One source for every default: the MLproject entry points are the tracked rows of the table of entry
points, their parameters the fields of the stage configs, with the same defaults and matching types;
bad settings fail before any data is read or any run is made; ``psydef --help`` loads neither MLflow
nor torch; ``entrypoints/`` is not installed."""
import dataclasses
import fnmatch
import importlib
import re
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from psydef.cli import ENTRY_POINTS, cli
from psydef.stages.config import (MainConfig, PredictConfig, PrepareConfig, TrainConfig, TuneConfig, base_type,
                                  option_name)

REPO = Path(__file__).resolve().parents[1]
MLPROJECT = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
TRACKED = [name for name, entry in ENTRY_POINTS.items() if entry.tracked]


def _mlproject_type(cls, f) -> str:
    """What MLflow's example projects would type the setting: numbers int/float, files read path."""
    kind, optional = base_type(typing.get_type_hints(cls)[f.name])
    if f.metadata["input_path"]:
        return "path"
    return {int: "int", float: "float"}.get(kind, "string") if not optional else "string"


def test_the_mlproject_entry_points_are_the_tracked_rows_of_the_table():
    assert sorted(MLPROJECT) == sorted(TRACKED)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_row_runs_an_existing_function(name):
    module, function = ENTRY_POINTS[name].function.split(":")
    assert callable(getattr(importlib.import_module(module), function))


@pytest.mark.parametrize("entry_point", TRACKED)
def test_mlproject_parameters_are_the_config_fields_with_their_defaults(entry_point):
    spec, cls = MLPROJECT[entry_point], ENTRY_POINTS[entry_point].config
    fields = dataclasses.fields(cls)
    assert list(spec["parameters"]) == [f.name for f in fields]
    for f in fields:
        param = spec["parameters"][f.name]
        assert param["type"] == _mlproject_type(cls, f), f.name
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            assert "default" not in param, f"{f.name} is required in {cls.__name__}"
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert str(param["default"]) == cls.spell(f.name, default), f.name
        assert cls.parse(f.name, str(param["default"])) == default, f.name
    expected = " ".join(f"{option_name(f.name)} {{{f.name}}}" for f in fields)
    assert spec["command"] == f"python -m entrypoints {entry_point} {expected}"


def test_main_passes_on_the_defaults_of_the_stages_it_runs():
    main = MainConfig()
    assert main.train(42).backbone_hyper() == TrainConfig().backbone_hyper()
    tune = main.tune([])
    assert (tune.n_trials, tune.inner_trials, tune.n_jobs) == (TuneConfig().n_trials, TuneConfig().inner_trials,
                                                              TuneConfig().n_jobs)
    assert main.prepare() == PrepareConfig(seed=main.seeds[0])
    assert main.predict().out_dir == PredictConfig().out_dir
    assert set(main.params()) == {f.name for f in dataclasses.fields(MainConfig)}  # what the pipeline run logs


LLM = "qwen3-8b-qlora"  # its hyper-parameters include epochs and learning_rate (checked without building it)
BAD = {  # command line -> what the one-line error must say
    ("train", "--epochs", "0"): r"--epochs: must be >= 1, got 0",
    ("train", "--learning-rate", "-0.1"): r"--learning-rate: must be > 0",
    ("train", "--backbone", LLM, "--hyper", "epochs=abc"): r"--hyper epochs: expected int, got 'abc'",
    ("train", "--backbone", LLM, "--hyper", "learning_rate=-0.1"): r"--hyper learning_rate: must be > 0",
    ("train", "--backbone", LLM, "--hyper", "epochs=0"): r"--hyper epochs: must be >= 1",
    ("train", "--backbone", LLM, "--hyper", "foo=1"):
        rf"--hyper: unknown hyper-parameter\(s\) foo for backbone {LLM}; valid: model, max_length, .*epochs",
    ("train", "--backbone", "minilm", "--hyper", "foo=1,bar=2"):
        r"--hyper: unknown hyper-parameter\(s\) bar, foo for backbone minilm; valid: ",
    ("train", "--hyper", "epochs"): r"--hyper: 'epochs' is not key=value",
    ("train", "--backbone", "bert"): r"--backbone: must be one of auto, minilm, qwen3-8b-qlora; got 'bert'",
    ("train", "--fold", "x"): r"--fold: 'x' is not a valid int \(or 'all'\)",
    ("train", "--fold", "-1"): r"--fold: must be >= 0",
    ("train", "--fold", "1"): r"--fold and --parent-run-id need --prepare-run-id",
    ("train", "--seed", "4.5"): r"--seed: '4.5' is not a valid int",
    ("prepare", "--n-splits", "1"): r"--n-splits: must be >= 2",
    ("prepare", "--group-by", "speaker"): r"--group-by: must be one of dialogue, utterance; got 'speaker'",
    ("tune", "--n-trials", "0"): r"--n-trials: must be >= 1",
    ("tune", "--inner-trials", "0"): r"--inner-trials: must be >= 1",
    ("tune", "--n-jobs", "0"): r"--n-jobs: 0 processes cannot run anything",
    ("tune", "--n-jobs", "-2"): r"--n-jobs: must be >= -1",
    ("tune", "--gate", "maybe"): r"--gate: 'maybe' is not a valid bool",
    ("tune", "--sampler", "grid"): r"--sampler: must be one of tpe, cmaes, random; got 'grid'",
    ("promote", "--version", "0"): r"--version: must be >= 1",
    ("main", "--seeds", ""): r"--seeds: give at least one seed",
    ("main", "--seeds", "1,x"): r"--seeds: '1,x' is not a valid comma-separated list of int",
    ("main", "--backbone", "minilm", "--hyper", "nope=1"): r"unknown hyper-parameter\(s\) nope for backbone minilm",
    ("main", "--backbone", LLM, "--hyper", "epochs=0"): r"--hyper epochs: must be >= 1",
    ("main", "--n-trials", "0"): r"--n-trials: must be >= 1",
}


def test_bad_settings_fail_before_any_data_is_read_or_any_run_is_created(tracking_uri, tmp_path):
    """Each bad command line exits with a usage error naming the option, with a --data-dir that does
    not exist (so nothing could have been read) and a store that stays without runs."""
    for args, message in BAD.items():
        data = ["--data-dir", str(tmp_path / "no-data")] if args[0] in ("prepare", "train", "main") else []
        result = CliRunner().invoke(cli, [*args, *data])
        assert result.exit_code == 2, (args, result.output)  # a usage error: nothing was attempted
        assert re.search(message, result.output.replace("\n", " ")), (args, result.output)
    client = MlflowClient(tracking_uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_bad_settings_in_python_name_the_option():
    with pytest.raises(ValueError, match=r"--epochs: expected int, got '3'"):
        TrainConfig(epochs="3")
    with pytest.raises(ValueError, match=r"--hyper: unknown hyper-parameter\(s\) nope for backbone minilm; valid: "):
        TrainConfig(backbone="minilm", hyper={"nope": 1})
    with pytest.raises(ValueError, match=r"--model: expected str"):
        TrainConfig(backbone=LLM, model=7)
    with pytest.raises(ValueError, match=r"--seeds item: expected int"):
        MainConfig(seeds=("42",))
    assert TrainConfig(backbone=LLM, hyper={"learning_rate": 1}, epochs=2).backbone_hyper() == {"learning_rate": 1.0,
                                                                                               "epochs": 2}


@pytest.mark.parametrize("argv", [["--help"], *([name, "--help"] for name in ENTRY_POINTS)])
def test_help_loads_neither_mlflow_nor_torch(argv):
    """Through ``python -m entrypoints`` (what MLproject runs); the table itself loads no pandas either
    (a command's help may: its choices are imported to be listed)."""
    heavy = ("mlflow", "torch", "transformers", "sklearn", "optuna") + (("pandas",) if argv == ["--help"] else ())
    code = (f"import runpy, sys; sys.argv = ['entrypoints', *{argv!r}]\n"
            "try:\n    runpy.run_module('entrypoints', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "Usage:" in out and out.strip().splitlines()[-1] == "[]", out


def test_the_console_script_is_the_table_and_entrypoints_is_not_installed():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    module, name = project["project"]["scripts"]["psydef"].split(":")
    assert getattr(importlib.import_module(module), name) is cli
    included = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert any(fnmatch.fnmatch("psydef.cli", pattern) for pattern in included)
    assert not any(fnmatch.fnmatch(package, pattern) for package in ("entrypoints", "entrypoints.x")
                   for pattern in included), included
