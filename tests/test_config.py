"""One source for every default: the MLproject parameters are the fields of the stage configs, with
the same defaults and matching types; bad settings fail before any data is read or any run is made;
``psydef --help`` loads neither MLflow nor torch."""
import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from entrypoints.cli import cli
from psydef.stages import config
from psydef.stages.config import (MainConfig, MemberSpec, PredictConfig, PrepareConfig, TrainConfig, TuneConfig, base_type,
                                  option_name)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"prepare": config.PrepareConfig, "train": config.TrainConfig, "aggregate": config.AggregateConfig,
           "tune": config.TuneConfig, "register": config.RegisterConfig, "promote": config.PromoteConfig,
           "predict": config.PredictConfig, "main": config.MainConfig}


def _mlproject_type(cls, f) -> str:
    """What MLflow's example projects would type the setting: numbers int/float, files read path."""
    kind, optional = base_type(typing.get_type_hints(cls)[f.name])
    if f.metadata["input_path"]:
        return "path"
    return {int: "int", float: "float"}.get(kind, "string") if not optional else "string"


@pytest.mark.parametrize("entry_point", CONFIGS)
def test_mlproject_parameters_are_the_config_fields_with_their_defaults(entry_point):
    project = yaml.safe_load((REPO / "MLproject").read_text())
    spec, cls = project["entry_points"][entry_point], CONFIGS[entry_point]
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
    assert spec["command"] == f"python -m entrypoints.{entry_point} {expected}"


def test_main_passes_on_the_defaults_of_the_stages_it_runs():
    main = MainConfig()
    assert main.train(42, main.members[0]).backbone_hyper() == TrainConfig().backbone_hyper()
    tune = main.tune([])
    assert (tune.n_trials, tune.inner_trials, tune.n_jobs) == (TuneConfig().n_trials, TuneConfig().inner_trials,
                                                              TuneConfig().n_jobs)
    assert [main.prepare(seed) for seed in main.seeds] == [PrepareConfig(seed=seed) for seed in main.seeds]
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


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["prepare", "--help"], ["predict", "--help"]])
def test_help_loads_neither_mlflow_nor_torch(argv):
    code = ("import sys; from entrypoints.cli import cli\n"
            f"try:\n    cli({argv!r})\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('mlflow', 'torch', 'transformers', 'sklearn', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out
