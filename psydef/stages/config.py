"""Every stage's settings: one frozen dataclass per stage, the only source of their defaults.

A field's metadata holds its help text, its bounds and its choices (:mod:`psydef.settings`); the
click options of ``psydef`` (:mod:`psydef.cli`) are generated from the fields, the MLproject parameters
must match them (tests/test_config.py), and each stage logs :meth:`Settings.params` as its run's params.
Construction checks every value (type, bounds, choices, backbone hyper-parameters), so a bad
setting fails here, before any data is read or any run is created, with the option's name.

Nothing heavy is imported at module level: ``psydef --help`` reads these classes.
"""
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from psydef import tracking
from psydef.settings import Settings, check_hyper, check_value, option_name, parse_hyper, setting, spell_hyper

DATA_DIR = Path("data/psydefconv")
MAX_SEED = 2**32 - 1  # numpy's RandomState (sklearn's folds, Optuna's samplers) takes seeds in [0, 2**32)


# ------------------------------------------------------------------------------------------------
# Ensemble members: ``backbone`` or ``backbone:key=value,...``, several joined by ``;``


@dataclass(frozen=True)
class MemberSpec:
    """One member of an ensemble by design: a backbone and its hyper-parameters (``hyper`` as
    :func:`parse_hyper` gives it); each member is trained once per seed."""
    backbone: str = "auto"
    hyper: dict = field(default_factory=dict)

    def __str__(self) -> str:
        """As given: ``backbone`` or ``backbone:key=value,...``."""
        return self.backbone + (f":{spell_hyper(self.hyper)}" if self.hyper else "")

    def checked(self, option: str = "--members") -> "MemberSpec":
        """The backbone checked against the choices and ``hyper`` against its fields (what
        :func:`check_hyper` does for ``--hyper``), the messages naming ``option`` and this member."""
        where = f"{option} (member {str(self)!r})"
        check_value(where, str, self.backbone, {"choices": "psydef.backbones:CHOICES"})
        from psydef.backbones import resolve_backbone_name

        return MemberSpec(self.backbone, check_hyper(resolve_backbone_name(self.backbone), self.hyper, option=where))


def member_tag(backbone: str, hyper: dict) -> str:
    """The canonical spelling of a trained member, what its train runs are tagged and found by: the
    resolved backbone, then the checked hyper-parameters that differ from the backbone's defaults,
    sorted by name (``minilm:C=0.5`` and ``minilm`` are one member)."""
    from psydef.backbones import backbone_class

    defaults = {f.name: f.default for f in dataclasses.fields(backbone_class(backbone))
                if f.default is not dataclasses.MISSING}
    differ = {k: hyper[k] for k in sorted(hyper) if k not in defaults or hyper[k] != defaults[k]}
    return backbone + (f":{spell_hyper(differ)}" if differ else "")


def parse_members(text: str) -> tuple[MemberSpec, ...]:
    """``backbone[:key=value,...];...`` -> the member specs (their values are checked by the config)."""
    members = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        backbone, _, hyper = item.partition(":")
        try:
            members.append(MemberSpec(backbone.strip(), parse_hyper(hyper)))
        except ValueError as err:
            raise ValueError(f"--members (member {item!r}): {str(err).removeprefix('--hyper: ')}") from None
    return tuple(members)


def spell_members(members: tuple[MemberSpec, ...]) -> str:
    return ";".join(map(str, members))


# ------------------------------------------------------------------------------------------------
# The stages


def _like(config: type, name: str, **changes):
    """The setting ``name`` of ``config`` again (default, help, bounds), for a command that passes
    it on (``main``); ``changes`` override parts of it."""
    f = {f.name: f for f in dataclasses.fields(config)}[name]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return setting(changes.pop("default", default), **{**f.metadata, **changes})


@dataclass(frozen=True)
class FetchConfig(Settings):
    """``fetch-data``: downloads the splits; opens no run, so it is not an MLproject entry point."""
    dest: Path = setting(DATA_DIR, "Where train.json and test.json go.")
    revision: str | None = setting(None, "A branch, tag or commit of AIMH/PsyDefConv.")


@dataclass(frozen=True)
class PrepareConfig(Settings):
    data_dir: Path = setting(DATA_DIR, "Folder with train.json and optionally test.json.", input_path=True)
    seed: int = setting(42, "Seed of the augmentation and of the fold assignment.", ge=0, le=MAX_SEED)
    n_splits: int = setting(5, "Number of cross-validation folds.", ge=2)
    group_by: str = setting("dialogue", "dialogue: honest for new conversations; utterance: mirrors the "
                                        "record-level test split.", choices="psydef.core.folds:GROUP_BY")


@dataclass(frozen=True)
class TrainConfig(Settings):
    data_dir: Path = _like(PrepareConfig, "data_dir")
    seed: int = setting(42, "Training seed.", ge=0, le=MAX_SEED)
    prepare_run_id: str | None = setting(None, "Use this prepare run's folds (default: the latest FINISHED prepare "
                                               "run of the same data and seed, else a prepare nested under the "
                                               "train run).")
    backbone: str = setting("auto", "auto = qwen3-8b-qlora when CUDA is available, else minilm.",
                            choices="psydef.backbones:CHOICES")
    model: str | None = setting(None, "HF id or local path of the LLM backbone's base model (default: the backbone's).")
    fold: int | None = setting(None, "'all', or one fold index (trains under a parent).", ge=0, none="all")
    parent_run_id: str | None = setting(None, "With --fold k: the parent run to train under (default: the latest "
                                              "matching one, else a new one).")
    resume: bool = setting(False, "true: reopen the latest matching parent and train only its unfinished folds; "
                                  "a fold killed mid-way continues from its last checkpoint (the LLM backbone's).")
    epochs: int | None = setting(None, "Training epochs (default: the backbone's).", ge=1)
    learning_rate: float | None = setting(None, "Learning rate (default: the backbone's).", gt=0)
    hyper: dict = setting({}, "More backbone hyper-parameters as key=value,key=value.", parse=parse_hyper,
                          spell=spell_hyper)

    def check(self) -> None:
        if self.prepare_run_id is None and (self.fold is not None or self.resume or self.parent_run_id):
            raise ValueError("--resume, --fold and --parent-run-id need --prepare-run-id (the folds the parent "
                             "was trained on)")
        self.backbone_hyper()  # --hyper, --epochs, --learning-rate checked against the backbone's fields

    def backbone_name(self) -> str:
        """The backbone ``auto`` stands for on this machine."""
        from psydef.backbones import resolve_backbone_name

        return resolve_backbone_name(self.backbone)

    def backbone_hyper(self) -> dict:
        """The backbone's hyper-parameters: ``hyper`` with ``epochs``, ``learning_rate`` and ``model``
        where given (``model`` only for a backbone that takes one)."""
        name = self.backbone_name()
        extra = {k: getattr(self, k) for k in ("epochs", "learning_rate") if getattr(self, k) is not None}
        from psydef.backbones import backbone_class

        if self.model is not None and "model" in {f.name for f in dataclasses.fields(backbone_class(name))}:
            extra["model"] = self.model
        # each of --epochs, --learning-rate, --model named by its own option in the messages
        return check_hyper(name, {**self.hyper, **extra}, options={key: option_name(key) for key in extra})

    def member_tag(self) -> str:
        """The member this training is (:func:`member_tag`): what tune and a resumed ``main`` find it by."""
        return member_tag(self.backbone_name(), self.backbone_hyper())


@dataclass(frozen=True)
class AggregateConfig(Settings):
    parent_run_id: str = setting(help="The train (parent) run whose fold runs to aggregate.")
    data_dir: Path = _like(PrepareConfig, "data_dir")
    prepare_run_id: str | None = setting(None, f"The prepare run of its folds (default: the run's "
                                               f"{tracking.PREPARE_RUN_ID} tag).")


@dataclass(frozen=True)
class TuneConfig(Settings):
    train_runs: tuple[str, ...] = setting((), "Comma-separated train (parent) run ids; default: the latest FINISHED "
                                              "train run of each member and seed (see --members) sharing the "
                                              "newest one's data digest.")
    members: tuple[MemberSpec, ...] = setting((), "Without --train-runs: the members to pick train runs of, as "
                                                  "main's --members; default: the newest train run's member.",
                                              parse=parse_members, spell=spell_members)
    n_trials: int = setting(2000, "Complete trials the study should hold (a stored study is resumed up to this "
                                  "total).", ge=1)
    sampler: str = setting("tpe", "Optuna sampler.", choices="psydef.calibration:SAMPLERS")
    gate: bool = setting(True, "Search the level-7 confidence gate tau7 as well (true/false).")
    seed: int = setting(0, "Sampler seed; give each parallel tune its own.", ge=0, le=MAX_SEED)
    storage: str | None = setting(None, "Optuna storage: sqlite:///optuna.db or a journal file (path.journal); "
                                        "default: in memory.")
    study_name: str | None = setting(None, "Default: calibration-<member run id prefixes>.")
    inner_trials: int = setting(500, "Trials of each search rerun inside the estimate of the calibration's gain.",
                               ge=1)
    n_jobs: int = setting(-1, "Processes at once: the main search in this one, the gain estimate's searches in the "
                              "others (-1: one per CPU; 1: all here, one after the other). The result is the same.",
                          ge=-1)

    def check(self) -> None:
        if self.n_jobs == 0:
            raise ValueError("--n-jobs: 0 processes cannot run anything; give -1 (one per CPU) or a count >= 1")
        if self.train_runs and self.members:
            raise ValueError("--members picks train runs when --train-runs is not given: give one of them")
        object.__setattr__(self, "members", _checked_members(self.members))


@dataclass(frozen=True)
class RegisterConfig(Settings):
    tune_run: str = setting(help="Run id of the tune run whose ensemble.json to register.")
    name: str = setting(tracking.MODEL_NAME, "Registered model name.")


@dataclass(frozen=True)
class PromoteConfig(Settings):
    version: int | None = setting(None, "Model version to promote (default: the newest).", ge=1)
    name: str = _like(RegisterConfig, "name")
    force: bool = setting(False, f"true: promote even if its {tracking.GATE_METRIC} does not beat production's by "
                                 "min_gain.")
    legacy_stage: bool = setting(False, f"true: also move it to the deprecated registry stage "
                                        f"{tracking.LEGACY_STAGE!r}.")
    min_gain: float = setting(0.01, f"How much higher than production's its {tracking.GATE_METRIC} must be (an "
                                    "equal score never replaces it): about the spread of that estimate's error.", ge=0)


@dataclass(frozen=True)
class PredictConfig(Settings):
    data_dir: Path = setting(DATA_DIR, "Folder holding test.json, or the path of any official-format split file.",
                             input_path=True)
    model_uri: str = setting(tracking.PRODUCTION_URI, "Model to predict with: models:/NAME@ALIAS, "
                                                      "models:/NAME/VERSION, runs:/RUN_ID/model ...")
    out_dir: Path = setting(Path("."), "Where prediction.json and prediction.zip are written.")


@dataclass(frozen=True)
class MainConfig(Settings):
    data_dir: Path = _like(PrepareConfig, "data_dir", help="Folder with train.json and test.json.")
    seeds: tuple[int, ...] = setting((42, 20260407), "Comma-separated seeds: each prepares its own fold partition, "
                                                     "on which every member is trained (the first also tunes).",
                                     ge=0, le=MAX_SEED)
    members: tuple[MemberSpec, ...] = setting(
        (MemberSpec(),), "Ensemble members, each trained for each seed: backbone[:key=value,...] joined by ';' "
                         "(e.g. 'minilm;minilm:combine=vote'); the backbone's hyper-parameters as in train --hyper.",
        parse=parse_members, spell=spell_members)
    resume: bool = setting(False, "true: reuse the FINISHED prepare and train runs of the same data, seeds, members "
                                  "and settings (a rerun after a failure trains only what is missing).")
    n_trials: int = _like(TuneConfig, "n_trials")
    inner_trials: int = _like(TuneConfig, "inner_trials")
    n_jobs: int = _like(TuneConfig, "n_jobs")
    sampler: str = _like(TuneConfig, "sampler")
    gate: bool = _like(TuneConfig, "gate")
    model_name: str = _like(RegisterConfig, "name")
    min_gain: float = _like(PromoteConfig, "min_gain")
    out_dir: Path = _like(PredictConfig, "out_dir")

    def check(self) -> None:
        if not self.seeds:
            raise ValueError("--seeds: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds: a seed is listed twice in {','.join(map(str, self.seeds))}")
        if not self.members:
            raise ValueError("--members: give at least one member")
        object.__setattr__(self, "members", _checked_members(self.members))
        for seed in self.seeds:  # every train and tune setting checked before anything runs
            for member in self.members:
                self.train(seed, member)
        self.tune([])

    def prepare(self, seed: int) -> PrepareConfig:
        return PrepareConfig(data_dir=self.data_dir, seed=seed)

    def train(self, seed: int, member: MemberSpec, prepare_run_id: str | None = None) -> TrainConfig:
        return TrainConfig(data_dir=self.data_dir, seed=seed, prepare_run_id=prepare_run_id, backbone=member.backbone,
                           hyper=member.hyper)

    def tune(self, train_runs: list[str]) -> TuneConfig:
        return TuneConfig(train_runs=tuple(train_runs), n_trials=self.n_trials, sampler=self.sampler, gate=self.gate,
                          seed=self.seeds[0], inner_trials=self.inner_trials, n_jobs=self.n_jobs)

    def register(self, tune_run: str) -> RegisterConfig:
        return RegisterConfig(tune_run=tune_run, name=self.model_name)

    def promote(self, version: int) -> PromoteConfig:
        return PromoteConfig(version=version, name=self.model_name, min_gain=self.min_gain)

    def predict(self) -> PredictConfig:
        return PredictConfig(data_dir=self.data_dir, out_dir=self.out_dir,
                             model_uri=tracking.registered_model_uri(self.model_name, alias=tracking.PRODUCTION))


def _checked_members(members: tuple[MemberSpec, ...]) -> tuple[MemberSpec, ...]:
    """Each member checked (:meth:`MemberSpec.checked`); two that are one member (same backbone here,
    same values) are refused."""
    from psydef.backbones import resolve_backbone_name

    checked = tuple(member.checked() for member in members)
    seen: dict[str, MemberSpec] = {}
    for given, member in zip(members, checked):
        tag = member_tag(resolve_backbone_name(member.backbone), member.hyper)
        if tag in seen:
            raise ValueError(f"--members: {str(seen[tag])!r} and {str(given)!r} are the same member ({tag})")
        seen[tag] = given
    return checked
