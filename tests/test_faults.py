"""Faults injected on purpose: a broken adapter file, a tracking server that is not there, stage
processes killed (SIGKILL, SIGTERM) or silent on another machine.

The store is the registered tiny ensemble of tests/fixtures/stores.py (``registry_store``, ``champion``); the
killed processes are real ``python -m entrypoints NAME`` jobs (tests/fixtures/jobs.py: ``TrainJobs``)."""
import logging
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from psydef.cli import cli
from psydef import tracking
from psydef.backbones.minilm import VOCAB_FILE, WEIGHTS_FILE
from tests.fixtures.jobs import REPO, TrainJobs
from tests.fixtures.server import clean_env, free_port

NAME = tracking.MODEL_NAME


@pytest.fixture(scope="module")
def store(registry_store, champion, tmp_path_factory):
    """The registry store, plus two fake train runs with OOF logits (test_tune's) to tune."""
    from tests.fixtures.fake_runs import Store

    fake = Store(tmp_path_factory.mktemp("tune-members"),
                 MlflowClient().get_experiment_by_name(registry_store.experiment).experiment_id)
    prepare = fake.prepare()
    registry_store.tune_members = [fake.train(prepare, seed) for seed in (11, 12)]
    return registry_store


def _versions() -> list[int]:
    return sorted(int(v.version) for v in MlflowClient().search_model_versions(f"name = '{NAME}'"))


def _cli(store, *args):
    return CliRunner().invoke(cli, [*args, "--tracking-uri", store.uri, "--experiment-name", store.experiment])


def _error_line(result) -> str:
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


def _local(artifact_uri: str) -> Path:
    return Path(urllib.parse.urlparse(artifact_uri).path)


# ---- 2. no version that cannot load --------------------------------------------------------------
@pytest.fixture
def truncated_head(store):
    """Fold 1 of the second member with its adapter/linear.safetensors cut in half (restored afterwards)."""
    fold = tracking.fold_runs(store.members[1])[1]
    head = _local(fold.info.artifact_uri) / tracking.ADAPTER_DIR / WEIGHTS_FILE
    backup = head.with_suffix(".bak")
    shutil.copy(head, backup)
    head.write_bytes(backup.read_bytes()[: head.stat().st_size // 2])
    try:
        yield fold
    finally:
        shutil.move(backup, head)


def test_register_refuses_a_model_that_cannot_load_and_names_the_file(store, truncated_head):
    before = _versions()
    error = _error_line(_cli(store, "register", "--tune-run", store.tune.good))
    assert "no version created" in error and "failed to load" in error, error
    assert f"fold run {truncated_head.info.run_id} (fold 1 of train run {store.members[1]})" in error, error
    assert f"adapter/{WEIGHTS_FILE}" in error, error
    assert _versions() == before
    register_run = mlflow.search_runs(experiment_names=[store.experiment], output_format="list",
                                      filter_string=f"tags.`{tracking.STAGE}` = '{tracking.REGISTER}'",
                                      order_by=["attributes.start_time DESC"])[0]
    assert register_run.info.status == "FAILED"
    models = mlflow.search_logged_models(output_format="list",
                                         filter_string=f"source_run_id = '{register_run.info.run_id}'")
    assert [m.status for m in models] == [LoggedModelStatus.FAILED]


def test_predict_names_a_model_that_fails_to_load(store, data_dir, tmp_path):
    """A copy of the champion's model folder with one fold adapter's linear.safetensors truncated."""
    client = MlflowClient()
    champion = client.get_model_version_by_alias(NAME, tracking.PRODUCTION)
    broken = tmp_path / "broken-model"
    shutil.copytree(_local(client.get_model_version_download_uri(NAME, champion.version)), broken)
    heads = sorted(broken.rglob(WEIGHTS_FILE))
    assert heads
    heads[-1].write_bytes(heads[-1].read_bytes()[:100])
    error = _error_line(_cli(store, "predict", "--model-uri", str(broken), "--data-dir", str(data_dir),
                             "--out-dir", str(tmp_path / "out")))
    assert error.startswith(f"Error: {broken} failed to load: "), error
    assert len(error) < 500


# ---- 4. an unreachable tracking server -----------------------------------------------------------
def test_an_unreachable_tracking_server_is_one_line(data_dir, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = subprocess.run([sys.executable, "-m", "entrypoints", "prepare", "--data-dir", str(data_dir)], cwd=tmp_path,
                          env=clean_env() | {"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and f"tracking server {uri} does not answer" in errors[0], proc.stderr


# ---- 5. no run left RUNNING by a dead process --------------------------------------------------
@pytest.fixture
def jobs(store, data_dir, tmp_path):
    tracking.configure(store.uri, store.experiment)
    jobs = TrainJobs(store.uri, data_dir, "", tmp_path / "logs")
    try:
        yield jobs
    finally:
        jobs.close()


def _stage_runs(store, stage: str, status: str | None = None) -> list:
    return [r for r in mlflow.search_runs(experiment_names=[store.experiment], output_format="list",
                                          filter_string=f"tags.`{tracking.STAGE}` = '{stage}'")
            if status is None or r.info.status == status]


def _running_with_heartbeat(store, stage: str, known: set):
    new = [r for r in _stage_runs(store, stage, "RUNNING") if r.info.run_id not in known
           and tracking.HEARTBEAT in r.data.tags]
    return new[0] if new else None


def _next_stage(data_dir):
    """Any stage: here prepare, which is quick."""
    from psydef.stages.config import PrepareConfig
    from psydef.stages.prepare import run_prepare

    return run_prepare(PrepareConfig(data_dir=data_dir, seed=3))


def _tune_job(jobs, store, name):
    members = ",".join(store.tune_members)
    return jobs.start("tune", "--train-runs", members, "--n-trials", "100000000", "--sampler", "random",
                      "--inner-trials", "2", experiment=store.experiment, name=name)


@pytest.mark.parametrize("moment", ["at once", "while searching"])
def test_a_killed_tune_is_marked_failed_by_the_next_stage(store, jobs, data_dir, moment):
    known = {r.info.run_id for r in _stage_runs(store, tracking.TUNE)}
    proc = _tune_job(jobs, store, f"tune-{moment}")
    run = jobs.poll_until(lambda: _running_with_heartbeat(store, tracking.TUNE, known), what="a RUNNING tune run",
                          alive=proc)
    if moment == "while searching":
        jobs.poll_until(lambda: "random search" in jobs.log(proc), what="the search's progress bar", alive=proc)
    jobs.kill(proc)
    assert mlflow.get_run(run.info.run_id).info.status == "RUNNING"  # nobody has looked yet
    _next_stage(data_dir)
    after = mlflow.get_run(run.info.run_id)
    assert after.info.status == "FAILED"
    assert f"pid {proc.pid} on {socket.gethostname()}) is gone" in after.data.tags[tracking.END_REASON]


@pytest.mark.parametrize("moment", ["at once", "once the model is being logged"])
def test_a_killed_register_is_marked_failed_and_creates_no_version(store, jobs, data_dir, moment):
    known = {r.info.run_id for r in _stage_runs(store, tracking.REGISTER)}
    before = _versions()
    proc = jobs.start("register", "--tune-run", store.tune.good, experiment=store.experiment,
                      name=f"register-{moment}")
    run = jobs.poll_until(lambda: _running_with_heartbeat(store, tracking.REGISTER, known),
                          what="a RUNNING register run", alive=proc, interval=0.05)
    if moment != "at once":
        jobs.poll_until(lambda: mlflow.search_logged_models(
            output_format="list", filter_string=f"source_run_id = '{run.info.run_id}'"),
            what="a logged model", alive=proc, interval=0.05)
    jobs.kill(proc)
    _next_stage(data_dir)
    assert mlflow.get_run(run.info.run_id).info.status == "FAILED"
    models = mlflow.search_logged_models(output_format="list", filter_string=f"source_run_id = '{run.info.run_id}'")
    assert LoggedModelStatus.PENDING not in [m.status for m in models]
    assert _versions() == before


# SIGKILL in the moment after the version is created: MlflowClient.create_model_version returns, then the process dies
KILLED_AFTER_CREATING_THE_VERSION = """
import os, signal, sys
from mlflow import MlflowClient
create = MlflowClient.create_model_version
def create_then_die(*args, **kwargs):
    create(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
MlflowClient.create_model_version = create_then_die
from psydef.cli import cli
cli(["register", *sys.argv[1:]])
"""


def test_a_register_killed_once_its_version_exists_leaves_that_version_complete(store, jobs, data_dir):
    """The version's tags and description are written by the call that creates it: whenever a register
    dies, the version it leaves (if any) says what it is and carries its gate metric."""
    before = _versions()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_AFTER_CREATING_THE_VERSION, "--tune-run", store.tune.good],
                            env={**jobs.env, "MLFLOW_EXPERIMENT_NAME": store.experiment}, cwd=jobs.logs,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == -signal.SIGKILL, output[-3000:]
    [number] = sorted(set(_versions()) - set(before))
    version = MlflowClient().get_model_version(NAME, str(number))
    assert version.status == "READY" and version.description.startswith("Ensemble of 2 member(s)")
    assert version.tags[tracking.V_TUNE_RUN_ID] == store.tune.good and tracking.GATE_METRIC in tracking.version_metrics(version)
    _next_stage(data_dir)
    assert mlflow.get_run(version.run_id).info.status == "FAILED"
    MlflowClient().delete_model_version(NAME, str(number))


def test_sigterm_ends_the_run_failed(store, jobs):
    known = {r.info.run_id for r in _stage_runs(store, tracking.TUNE)}
    proc = _tune_job(jobs, store, "tune-sigterm")
    run = jobs.poll_until(lambda: _running_with_heartbeat(store, tracking.TUNE, known), what="a RUNNING tune run",
                          alive=proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, jobs.log(proc)[-3000:]
    after = mlflow.get_run(run.info.run_id)
    assert after.info.status == "FAILED" and tracking.END_REASON not in after.data.tags  # it ended its own run


def test_a_silent_run_of_another_machine_is_marked_failed_with_its_nested_runs(store, jobs, data_dir):
    client = MlflowClient()
    experiment = client.get_experiment_by_name(store.experiment).experiment_id

    def run(beat_age: float, parent: str | None = None, heartbeat: bool = True, start_age: float = 0) -> str:
        tags = {tracking.STAGE: tracking.TUNE}
        if heartbeat:
            tags |= {tracking.HEARTBEAT: str(int(time.time() - beat_age)), tracking.HEARTBEAT_PID: "4242",
                     tracking.HEARTBEAT_HOST: "another-machine"}
        if parent:
            tags[tracking.PARENT_RUN_ID] = parent
        return client.create_run(experiment, tags=tags, start_time=int(1000 * (time.time() - start_age))).info.run_id

    stale = tracking.STALE_AFTER_S + 60
    silent = run(stale, start_age=stale + 60)
    nested = run(0, parent=silent, heartbeat=False, start_age=stale + 30)  # started by the silent process
    later = run(0, parent=silent, heartbeat=False)  # e.g. a fold job started under it since: not its
    alive = run(1)  # beat a second ago
    legacy = run(0, heartbeat=False)  # no heartbeat at all (e.g. a parent of fold jobs): not ours to judge
    _next_stage(data_dir)
    status = {r: client.get_run(r).info.status for r in (silent, nested, later, alive, legacy)}
    assert status == {silent: "FAILED", nested: "FAILED", later: "RUNNING", alive: "RUNNING", legacy: "RUNNING"}
    assert "no heartbeat from pid 4242 on another-machine" in client.get_run(silent).data.tags[tracking.END_REASON]
    for run_id in (later, alive, legacy):
        client.set_terminated(run_id, "FINISHED")


# ---- 7. first contact: the fold banners estimate the training time left under main ------------
def test_fold_banners_estimate_the_training_left(monkeypatch, caplog):
    from psydef import progress

    caplog.set_level(logging.INFO, logger="psydef")

    clock = iter([100.0, 160.0, 220.0])  # folds start a minute apart
    monkeypatch.setattr("time.monotonic", lambda: next(clock))
    progress.plan_main(trainings=2, n_splits=5, members=["minilm"], n_trials=2000, inner_trials=500)
    for fold in range(3):
        progress.fold_banner(42, fold, 5)
    lines = caplog.messages
    assert lines[0].startswith("== main: train 2 training(s) (member(s) minilm, each seed on its own folds) x 5 folds, "
                               "tune (2,000 trials")
    assert lines[1:] == ["== train seed 42: fold 1/5",
                         "== train seed 42: fold 2/5 (about 9 min of training left: 1.0 min per fold so far)",
                         "== train seed 42: fold 3/5 (about 8 min of training left: 1.0 min per fold so far)"]


# ---- 8. a bad PSYDEF_MAX_* is the setting's fault, not the client's nor the model's ------------
def _bad_limit_error(variable: str, value: str, default: int) -> str:
    return (f"{variable}={value!r} in this process's environment is not a limit: set it to a whole number >= 1, "
            f"or unset it for the default {default:,}")


def test_a_model_server_with_a_bad_input_limit_does_not_start(store, tmp_path):
    """It exits with the variable named instead of answering /ping and then HTTP 400 to every request."""
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run([str(bin_dir / "mlflow"), "models", "serve", "-m", tracking.PRODUCTION_URI, "--env-manager",
                           "local", "-p", str(free_port()), "-h", "127.0.0.1"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300,
                          env=clean_env() | {"MLFLOW_TRACKING_URI": store.uri, "PSYDEF_MAX_REQUEST_ROWS": "ten",
                                             "PATH": f"{bin_dir}:{clean_env()['PATH']}"})
    assert proc.returncode != 0
    assert _bad_limit_error("PSYDEF_MAX_REQUEST_ROWS", "ten", 10_000) in proc.stdout + proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("command", ["register", "promote", "predict"])
def test_a_bad_input_limit_is_named_before_any_run(store, data_dir, tmp_path, monkeypatch, command):
    monkeypatch.setenv("PSYDEF_MAX_DIALOGUE_TURNS", "0")
    args = {"register": ["--tune-run", store.tune.good], "promote": [],
            "predict": ["--data-dir", str(data_dir), "--out-dir", str(tmp_path / "out")]}[command]
    runs_before = len(_stage_runs(store, command))
    error = _error_line(_cli(store, command, *args))
    assert error == "Error: " + _bad_limit_error("PSYDEF_MAX_DIALOGUE_TURNS", "0", 200)
    assert len(_stage_runs(store, command)) == runs_before


# ---- 9. corrupt artifacts: one line naming the run or model, the file and the field -------------
def _tune_run_with_ensemble_file(store, text: str | None) -> str:
    """A finished tune run with its metrics and ``text`` as its ensemble.json (none when None)."""
    client = MlflowClient()
    run = client.create_run(client.get_experiment_by_name(store.experiment).experiment_id,
                            tags={tracking.STAGE: tracking.TUNE})
    for metric in (tracking.ESTIMATED_F1, tracking.CALIBRATED_F1):
        client.log_metric(run.info.run_id, metric, 0.5)
    if text is not None:
        client.log_text(run.info.run_id, text, tracking.ENSEMBLE_JSON)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.mark.parametrize("content, message", [
    ("[]", "is not a valid ensemble: expected a JSON object with fields members, delta, tau7; got a list"),
    ("members", "is not valid JSON (Expecting value: line 1 column 1 (char 0); cut short?)"),
    ("weightless", "is not a valid ensemble: members[1] must be an object with a string 'run_id' and a number "
                   "'weight'; got {'run_id': "),
    ("cut", "is not valid JSON (Unterminated string"),
    ("no delta", "is not a valid ensemble: missing field(s) delta"),
    (None, "has no ensemble.json: it did not finish"),
], ids=["a list", "not JSON", "a member without weight", "cut short", "no delta", "missing"])
def test_register_names_what_is_wrong_with_a_tune_ensemble_file(store, content, message):
    import json

    spec = mlflow.artifacts.load_dict(tracking.artifact_uri(store.tune.good, tracking.ENSEMBLE_JSON))
    text = {"[]": "[]", "members": "members", "cut": json.dumps(spec)[:40], None: None,
            "weightless": json.dumps({**spec, "members": [spec["members"][0],
                                                          {"run_id": spec["members"][1]["run_id"]}]}),
            "no delta": json.dumps({k: v for k, v in spec.items() if k != "delta"})}[content]
    tune_run = _tune_run_with_ensemble_file(store, text)
    before = _versions()
    error = _error_line(_cli(store, "register", "--tune-run", tune_run))
    assert error.startswith(f"Error: tune run {tune_run}"), error
    assert message in error, error
    assert error.endswith("run tune again and register its " + ("new run" if content else "run"))
    assert _versions() == before


@pytest.fixture
def fold_adapter(store, tmp_path) -> Path:
    """A copy of a fold adapter of the registry store (a tiny minilm)."""
    fold = tracking.fold_runs(store.members[0])[0]
    return Path(shutil.copytree(_local(fold.info.artifact_uri) / tracking.ADAPTER_DIR, tmp_path / "adapter"))


def _drop_a_column(adapter: Path) -> None:
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(adapter / WEIGHTS_FILE))
    key = next(k for k in weights if k.endswith(".coef"))
    save_file({**weights, key: weights[key][:, :-1].copy()}, str(adapter / WEIGHTS_FILE))


def _shorten_idf(adapter: Path) -> None:
    import json

    vocab = json.loads((adapter / VOCAB_FILE).read_text())
    vocab["word"]["idf"] = vocab["word"]["idf"][:-1]
    (adapter / VOCAB_FILE).write_text(json.dumps(vocab))


@pytest.mark.parametrize("corrupt, file, message", [
    (lambda adapter: (adapter / VOCAB_FILE).write_text("{}"), VOCAB_FILE,
     r"holds vectorizers \[\], this adapter's config needs \['word', 'context', 'history'\]"),
    (_shorten_idf, VOCAB_FILE, r"vectorizer 'word' needs a 'vocabulary' \(term -> column 0..n-1\) and an 'idf' of n"),
    (_drop_a_column, WEIGHTS_FILE, r"stack.coef has shape \(\d+, (\d+)\) and stack.intercept \(\d+,\), but \d+ "
                                   r"classes and \d+ features \(tfidf.json and the config\) need"),
], ids=["tfidf.json of {}", "an idf shorter than its vocabulary", "a coefficient column missing"])
def test_a_corrupt_minilm_adapter_names_its_file_and_field(fold_adapter, corrupt, file, message):
    from psydef.backbones import load_adapter

    corrupt(fold_adapter)
    expected = re.escape(str(fold_adapter / file)) + ": " + message + ".*; train that fold again"
    with pytest.raises(ValueError, match=expected):
        load_adapter(fold_adapter)


def test_predict_names_the_model_and_file_of_a_corrupt_tfidf_json(store, data_dir, tmp_path):
    """The champion's model folder with one fold adapter's tfidf.json replaced by ``{}``."""
    client = MlflowClient()
    champion = client.get_model_version_by_alias(NAME, tracking.PRODUCTION)
    broken = tmp_path / "broken-model"
    shutil.copytree(_local(client.get_model_version_download_uri(NAME, champion.version)), broken)
    vocab = sorted(broken.rglob(VOCAB_FILE))[-1]
    vocab.write_text("{}")
    error = _error_line(_cli(store, "predict", "--model-uri", str(broken), "--data-dir", str(data_dir),
                             "--out-dir", str(tmp_path / "out")))
    assert error.startswith(f"Error: {broken} failed to load: ValueError: "), error
    assert f"{vocab.parent.name}/{VOCAB_FILE}: holds vectorizers []" in error, error
    assert not (tmp_path / "out" / tracking.PREDICTION_JSON).exists()
