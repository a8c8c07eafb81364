"""The MLflow UI shows the work: a small chain (prepare, two train runs that differ in one
hyper-parameter, tune, register, promote) in a temporary store, served by a real ``mlflow server`` on
a free loopback port, rendered by headless Chromium (``--dump-dom`` after a ``--virtual-time-budget``).

Asserted on the rendered pages: the experiment's runs table lists the train runs and their dataset,
a train run's page shows its description, the compare page shows the params that differ, the model
version page shows the version's description and the ``production`` alias, a fold run's page and its
System metrics tab show its system metrics, and the version's logged model page lists the tune metrics. Screenshots of each page
are saved in the test's temporary folder, or in $PSYDEF_UI_SCREENSHOTS (the path is printed). Skips when Chromium is absent
(Debian: ``apt-get install chromium``)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import pytest

from psydef import tracking
from tests.fixtures.jobs import JOB_HYPER
from tests.fixtures.server import mlflow_server

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
# Virtual time stands still while requests are pending: the budget only has to cover the UI's own timers.
VIRTUAL_TIME_MS = 20000
PAGE_TIMEOUT = 180  # seconds of wall time for one page, on a loaded machine
CONTEXT_TURNS = {1: 2, 2: 3}  # seed -> context_turns: the one hyper-parameter (besides the seed) the train runs differ in


class _Text(HTMLParser):
    """The text nodes of a page, in document order, without scripts and styles."""

    def __init__(self):
        super().__init__()
        self.nodes: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style") and self._skip > 0

    def handle_data(self, data):
        if not self._skip and data.strip():
            self.nodes.append(data.strip())


def render(url: str, screenshot: Path, profile: Path) -> list[str]:
    """The text nodes of ``url`` once Chromium has rendered it; a screenshot is saved on the way."""
    args = [CHROMIUM, "--headless", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            f"--user-data-dir={profile}", "--window-size=1600,1300", f"--virtual-time-budget={VIRTUAL_TIME_MS}",
            f"--screenshot={screenshot}", "--dump-dom", url]
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # Chromium's sandbox refuses root
    done = subprocess.run(args, capture_output=True, text=True, timeout=PAGE_TIMEOUT)
    assert done.returncode == 0 and "<html" in done.stdout, f"chromium failed on {url}:\n{done.stderr[-3000:]}"
    parser = _Text()
    parser.feed(done.stdout)
    return parser.nodes


def _after(nodes: list[str], label: str, n: int) -> list[str]:
    """The ``n`` text nodes that follow the last node equal to ``label`` (a table row's cells)."""
    where = max((i for i, node in enumerate(nodes) if node == label), default=None)
    assert where is not None, f"no {label!r} on the page: {nodes[:200]}"
    return nodes[where + 1:where + 1 + n]


@pytest.fixture
def small_chain(data_dir, tracking_uri):
    """The stages one by one (no pipeline parent, so the train runs are top-level rows)."""
    from psydef.stages.config import PrepareConfig, PromoteConfig, RegisterConfig, TrainConfig, TuneConfig
    from psydef.stages.prepare import run_prepare
    from psydef.stages.promote import run_promote
    from psydef.stages.register import run_register
    from psydef.stages.train import run_train
    from psydef.stages.tune import run_tune

    experiment_id = tracking.configure(tracking_uri)
    prepared = run_prepare(PrepareConfig(data_dir=data_dir, seed=1))
    train_runs = [run_train(TrainConfig(data_dir=data_dir, seed=seed, prepare_run_id=prepared.run_id, backbone="minilm",
                                        hyper={**JOB_HYPER, "context_turns": turns}), experiment_id=experiment_id)
                  for seed, turns in CONTEXT_TURNS.items()]
    tune_run = run_tune(TuneConfig(train_runs=tuple(train_runs), n_trials=30, sampler="random", inner_trials=10),
                        experiment_id=experiment_id)
    version = run_register(RegisterConfig(tune_run=tune_run))
    run_promote(PromoteConfig(version=int(version.version)))
    return tracking_uri, train_runs, version.version


def test_the_ui_shows_runs_their_differences_and_the_production_version(small_chain, tmp_path, capsys):
    store_uri, train_runs, version = small_chain
    client = tracking.client()
    experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    assert experiment.tags[tracking.EXPERIMENT_KIND] == tracking.CUSTOM_MODEL_DEVELOPMENT
    description = client.get_model_version(tracking.MODEL_NAME, version).description
    stage_runs = [run for run in client.search_runs([experiment.experiment_id])
                  if run.data.tags[tracking.STAGE] != tracking.FOLD_RUN]
    assert sorted(run.data.tags[tracking.STAGE] for run in stage_runs) == sorted(
        [tracking.PREPARE, tracking.TRAIN, tracking.TRAIN, tracking.TUNE, tracking.REGISTER, tracking.PROMOTE])
    assert all(run.data.tags.get(tracking.NOTE) for run in stage_runs)  # every stage run has a description
    notes = {run_id: client.get_run(run_id).data.tags[tracking.NOTE] for run_id in train_runs}
    # pytest keeps only its last few temporary folders: PSYDEF_UI_SCREENSHOTS names a folder that stays
    shots = Path(os.environ.get("PSYDEF_UI_SCREENSHOTS") or tmp_path / "screenshots")
    profile, workdir = tmp_path / "chromium-profile", tmp_path / "server"
    shots.mkdir(parents=True, exist_ok=True)
    workdir.mkdir()

    with mlflow_server(store_uri, workdir) as (uri, _, _):
        # MLflow 3.17's UI picks the GenAI or the model-training view from `workflowType` (the link, else
        # the browser's last choice), not from the experiment's kind tag: the link psydef prints names it.
        runs_page = render(tracking.ui_runs_url(uri, experiment.experiment_id), shots / "1-runs.png", profile)
        assert "Runs" in runs_page
        names = {client.get_run(run_id).info.run_name for run_id in train_runs}  # train seed=S <member spec>
        assert names == {f"train seed={seed} minilm:char_ngrams=false,context_turns={turns},max_length=32"
                         for seed, turns in CONTEXT_TURNS.items()}
        assert names <= set(runs_page), runs_page[:200]
        digest = client.get_run(train_runs[0]).data.tags[tracking.DATA_DIGEST]
        datasets = [node for node in runs_page if node.startswith("psydefconv-train")]  # the Dataset column
        assert len(datasets) == 3 and all(digest[:8] in node for node in datasets), datasets  # prepare + 2 trains

        run_page = render(f"{uri}/#/experiments/{experiment.experiment_id}/runs/{train_runs[0]}"
                          "?workflowType=machine_learning",
                          shots / "2-train-run.png", profile)
        assert notes[train_runs[0]] in run_page

        compare = render(f"{uri}/#/compare-runs?" + urllib.parse.urlencode(
            {"runs": json.dumps(train_runs), "experiments": json.dumps([experiment.experiment_id])}),
            shots / "3-compare.png", profile)
        assert _after(compare, "context_turns", 2) == [str(CONTEXT_TURNS[1]), str(CONTEXT_TURNS[2])]
        assert _after(compare, "seed", 2) == ["1", "2"]
        assert _after(compare, "class_weight", 2) == ["balanced", "balanced"]  # defaults are logged too

        version_page = render(f"{uri}/#/models/{tracking.MODEL_NAME}/versions/{version}", shots / "4-version.png",
                              profile)
        assert description in version_page
        assert any(tracking.PRODUCTION in node for node in version_page)

        # a fold run's system metrics: in its overview's metrics table, and as charts in its System metrics tab
        fold_run = client.get_run(tracking.fold_runs(train_runs[0])[0].info.run_id)
        system = {key: value for key, value in fold_run.data.metrics.items() if key.startswith("system/")}
        assert {tracking.SYSTEM_CPU, tracking.SYSTEM_MEMORY} <= set(system)
        fold_url = f"{uri}/#/experiments/{experiment.experiment_id}/runs/{fold_run.info.run_id}"
        fold_page = render(f"{fold_url}?workflowType=machine_learning", shots / "5-fold-run.png", profile)
        assert f"System metrics ({len(system)})" in fold_page
        for key in (tracking.SYSTEM_CPU, tracking.SYSTEM_MEMORY):
            assert float(_after(fold_page, key, 1)[0]) == system[key]
        charts = render(f"{fold_url}/system-metrics?workflowType=machine_learning", shots / "6-fold-system-metrics.png",
                        profile)
        assert _after(charts, "System metrics", 1) == [f"({len(system)})"]  # one chart each

        # the registered version's logged model (the version page's "Source Model") lists the tune metrics
        metrics = tracking.version_metrics(client.get_model_version(tracking.MODEL_NAME, version))
        assert set(metrics) == set(tracking.MODEL_METRICS)
        model_id = client.get_model_version(tracking.MODEL_NAME, version).source.removeprefix("models:/")
        model_page = render(f"{uri}/#/experiments/{experiment.experiment_id}/models/{model_id}",
                            shots / "7-logged-model.png", profile)
        assert f"Metrics ({len(metrics)})" in model_page
        for key, value in metrics.items():  # metric, then its dataset, source run and value
            _, source, shown = _after(model_page, key, 3)
            assert source == f"register {tracking.MODEL_NAME}" and float(shown) == value, (key, source, shown)
    with capsys.disabled():
        print(f"\nMLflow UI screenshots: {shots}")
