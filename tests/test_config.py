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
from psydef.settings import base_type, option_name
from psydef.stages.config import (MainConfig, MemberSpec, PredictConfig, PrepareConfig, PromoteConfig, TrainConfig,
                                  TuneConfig)

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
    assert main.train(42, main.members[0]).backbone_hyper() == TrainConfig().backbone_hyper()
    tune = main.tune([])
    assert (tune.n_trials, tune.inner_trials, tune.n_jobs) == (TuneConfig().n_trials, TuneConfig().inner_trials,
                                                              TuneConfig().n_jobs)
    assert [main.prepare(seed) for seed in main.seeds] == [PrepareConfig(seed=seed) for seed in main.seeds]
    assert main.predict().out_dir == PredictConfig().out_dir
    assert main.min_gain == PromoteConfig().min_gain  # the margin main's promote gates with
    assert set(main.params()) == {f.name for f in dataclasses.fields(MainConfig)}  # what the pipeline run logs


LLM = "qwen3-8b-qlora"  # its hyper-parameters include epochs and learning_rate (checked without building it)
BAD = {  # command line -> what the one-line error must say
    ("train", "--epochs", "0"): r"--epochs: must be >= 1, got 0",
    ("promote", "--min-gain", "-0.01"): r"--min-gain: must be >= 0",
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
    ("main", "--members", "minilm;minilm:nope=1"):
        r"--members \(member 'minilm:nope=1'\): unknown hyper-parameter\(s\) nope for backbone minilm; valid: ",
    ("main", "--members", f"minilm;{LLM}:epochs=0"): rf"--members \(member '{LLM}:epochs=0'\) epochs: must be >= 1",
    ("main", "--members", "minilm;bert:C=1"): r"--members \(member 'bert:C=1'\): must be one of auto, minilm, "
                                              r"qwen3-8b-qlora; got 'bert'",
    ("main", "--members", "minilm:combine"): r"--members \(member 'minilm:combine'\): 'combine' is not key=value",
    ("main", "--members", "minilm;minilm:C=0.5"): r"--members: 'minilm' and 'minilm:C=0.5' are the same member",
    ("main", "--members", ";"): r"--members: give at least one member",
    ("main", "--seeds", "1,1"): r"--seeds: a seed is listed twice",
    ("tune", "--members", "minilm:nope=1"): r"--members \(member 'minilm:nope=1'\): unknown hyper-parameter",
    ("tune", "--members", "minilm", "--train-runs", "abc"): r"--members picks train runs when --train-runs is not",
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


def test_a_member_list_parses_into_checked_members_each_with_one_canonical_tag():
    members = MainConfig.parse("members", f"minilm; minilm:combine=vote,C=1 ;{LLM}:epochs=2")
    config = MainConfig(members=members)
    assert [str(m) for m in config.members] == ["minilm", "minilm:combine=vote,C=1.0", f"{LLM}:epochs=2"]
    assert config.params()["members"] == f"minilm;minilm:combine=vote,C=1.0;{LLM}:epochs=2"  # the pipeline run's
    # what train runs are tagged and found by: values at their defaults dropped, keys sorted
    assert [config.train(42, m).member_tag() for m in config.members] == [
        "minilm", "minilm:C=1.0,combine=vote", f"{LLM}:epochs=2"]
    assert TrainConfig(backbone="minilm", hyper={"C": 0.5}).member_tag() == "minilm"
    assert MainConfig.parse("members", "auto") == MainConfig().members == (MemberSpec(),)
    with pytest.raises(ValueError, match=r"--members \(member 'minilm:foo=1'\): unknown hyper-parameter\(s\) foo"):
        MainConfig(members=(MemberSpec("minilm"), MemberSpec("minilm", {"foo": 1})))
    with pytest.raises(ValueError, match=rf"--members \(member '{LLM}:learning_rate=-1'\) learning_rate: must be > 0"):
        TuneConfig(members=(MemberSpec(LLM, {"learning_rate": -1}),))


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


# Every bounded field of every registered backbone, refused by `psydef train --hyper` (and by the
# backbone's own constructor). backbone -> (--hyper text, what the one-line error must say).
BAD_HYPER = {
    "minilm": [
        ("combine=foo", r"--hyper combine: must be one of stack, vote; got 'foo'"),
        ("C=-1", r"--hyper C: must be > 0, got -1"),
        ("C=0", r"--hyper C: must be > 0"),
        ("C=NaN", r"--hyper C: must be a finite number"),
        ("C=abc", r"--hyper C: expected float, got 'abc'"),
        ("class_weight=foo", r"--hyper class_weight: must be one of balanced, none; got 'foo'"),
        ("context_turns=-1", r"--hyper context_turns: must be >= 1"),
        ("char_ngrams=1", r"--hyper char_ngrams: expected bool, got 1"),
        ("max_char_features=0", r"--hyper max_char_features: must be >= 1"),
        ("max_length=-5", r"--hyper max_length: must be >= 0"),
        ("max_length=513", r"--hyper max_length: must be <= 512"),
        ("max_length=2", r"--hyper: minilm max_length: must be 0 \(none\) or >= 3, got 2"),
        ("previous_max_length=-1", r"--hyper previous_max_length: must be >= 0"),
        ("context_max_length=1000", r"--hyper context_max_length: must be <= 512"),
        ("max_length=0,context_max_length=64", r"--hyper: minilm previous_max_length and context_max_length need "
                                               r"max_length > 0"),
        ("dense_weight=-1", r"--hyper dense_weight: must be >= 0"),
        ("length_weight=-0.5", r"--hyper length_weight: must be >= 0"),
        ("max_iter=0", r"--hyper max_iter: must be >= 1"),
        ("max_iter=2.5", r"--hyper max_iter: expected int, got 2.5"),
        ("tol=0", r"--hyper tol: must be > 0"),
        ("encoder=bert", r"--hyper encoder: must be one of minilm, mpnet; got 'bert'"),
        ("n_bags=0", r"--hyper n_bags: must be >= 1"),
        ("row_subsample=0", r"--hyper row_subsample: must be > 0"),
        ("feature_subsample=1.5", r"--hyper feature_subsample: must be <= 1"),
    ],
    "qwen3-8b-qlora": [
        ("max_length=-5", r"--hyper max_length: must be >= 256"),
        ("max_turns=-1", r"--hyper max_turns: must be >= 0"),
        ("lora_r=0", r"--hyper lora_r: must be >= 1"),
        ("lora_alpha=0", r"--hyper lora_alpha: must be >= 1"),
        ("lora_dropout=1", r"--hyper lora_dropout: must be < 1"),
        ("lora_dropout=-0.1", r"--hyper lora_dropout: must be >= 0"),
        ("learning_rate=0", r"--hyper learning_rate: must be > 0"),
        ("learning_rate=Infinity", r"--hyper learning_rate: must be a finite number"),
        ("epochs=0", r"--hyper epochs: must be >= 1"),
        ("batch_size=0", r"--hyper batch_size: must be >= 1"),
        ("grad_accum=0", r"--hyper grad_accum: must be >= 1"),
        ("warmup_ratio=1.5", r"--hyper warmup_ratio: must be <= 1"),
        ("warmup_ratio=-0.1", r"--hyper warmup_ratio: must be >= 0"),
        ("max_grad_norm=0", r"--hyper max_grad_norm: must be > 0"),
        ("label_smoothing=1", r"--hyper label_smoothing: must be < 1"),
        ("label_smoothing=-0.05", r"--hyper label_smoothing: must be >= 0"),
        ("load_in_4bit=yes", r"--hyper load_in_4bit: expected bool, got 'yes'"),
        ("eval_batch_size=0", r"--hyper eval_batch_size: must be >= 1"),
        ("compute_dtype=float16", r"--hyper compute_dtype: must be one of auto, bfloat16, float32; got 'float16'"),
        ("attn_implementation=flash", r"--hyper attn_implementation: must be one of auto, sdpa, flash_attention_2, "
                                      r"eager; got 'flash'"),
        ("eval_every=-1", r"--hyper eval_every: must be >= 0"),
        ("checkpoint_every=-1", r"--hyper checkpoint_every: must be >= 0"),
    ],
}
BOUND_KEYS = ("ge", "gt", "le", "lt", "choices")


def _registered_backbones():
    from psydef.backbones import BACKBONES, backbone_class

    return {name: backbone_class(name) for name in BACKBONES}


@pytest.mark.parametrize(("backbone", "hyper", "message"),
                         [(b, h, m) for b, cases in BAD_HYPER.items() for h, m in cases])
def test_a_bad_backbone_hyper_parameter_is_a_usage_error_before_any_store_or_data(backbone, hyper, message, tmp_path):
    """--data-dir does not exist (nothing could have been read) and the store's database is never
    created (no run, no experiment: MLflow is not touched)."""
    store = tmp_path / "mlflow.db"
    result = CliRunner().invoke(cli, ["train", "--backbone", backbone, "--hyper", hyper, "--data-dir",
                                      str(tmp_path / "no-data"), "--tracking-uri", f"sqlite:///{store}"])
    assert result.exit_code == 2, result.output  # a usage error: nothing was attempted
    assert re.search(message, result.output.replace("\n", " ")), result.output
    assert not store.exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize(("backbone", "hyper", "message"),
                         [(b, h, m) for b, cases in BAD_HYPER.items() for h, m in cases])
def test_a_bad_hyper_parameter_is_refused_by_the_backbone_itself(backbone, hyper, message):
    """The library is safe too: constructing the backbone directly raises a ValueError naming the field."""
    from psydef.settings import parse_hyper

    direct = message.removeprefix("--hyper: ") if message.startswith("--hyper: ") else \
        re.escape(backbone) + message.removeprefix("--hyper")
    with pytest.raises(ValueError, match="^" + direct):
        _registered_backbones()[backbone](**parse_hyper(hyper))


def test_every_bounded_backbone_field_has_a_bad_value_in_the_table():
    for name, cls in _registered_backbones().items():
        bounded = {f.name for f in dataclasses.fields(cls) if any(f.metadata.get(k) is not None for k in BOUND_KEYS)}
        tried = {part.split("=")[0] for hyper, _ in BAD_HYPER[name] for part in hyper.split(",")}
        assert bounded <= tried, f"{name}: no bad value tried for {sorted(bounded - tried)}"


@pytest.mark.parametrize("cls", [*_registered_backbones().values(), *(entry.config for entry in ENTRY_POINTS.values())], ids=lambda c: c.__name__)
def test_every_field_declares_its_type_and_every_number_its_bounds(cls):
    """Backbone hyper-parameters and stage settings alike: declared with psydef.settings.setting, typed,
    and a number bounded or saying why not, so a new field cannot escape the checks."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        assert "help" in f.metadata and f.metadata["help"], f"{cls.__name__}.{f.name}: not declared with setting()"
        kind, _ = base_type(hints[f.name])
        assert isinstance(kind, type) or typing.get_origin(kind), f"{cls.__name__}.{f.name}: no type"
        item = typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else kind
        if item in (int, float):
            assert any(f.metadata[k] is not None for k in BOUND_KEYS) or f.metadata["unbounded"], \
                f"{cls.__name__}.{f.name}: a number without a bound (give ge/gt/le/lt, or unbounded='why')"


SEEDS = {("prepare", "--seed", "-1"): r"--seed: must be >= 0, got -1",
         ("train", "--seed", str(2**32)): r"--seed: must be <= 4294967295",
         ("tune", "--seed", "-3"): r"--seed: must be >= 0",
         ("main", "--seeds", "42,-1"): r"--seeds item: must be >= 0, got -1"}


@pytest.mark.parametrize("args", SEEDS)
def test_a_seed_out_of_numpys_range_is_a_usage_error(args, tmp_path):
    store = tmp_path / "mlflow.db"
    data = ["--data-dir", str(tmp_path / "no-data")] if args[0] in ("prepare", "train", "main") else []
    result = CliRunner().invoke(cli, [*args, *data, "--tracking-uri", f"sqlite:///{store}"])
    assert result.exit_code == 2 and re.search(SEEDS[args], result.output.replace("\n", " ")), result.output
    assert not store.exists()
