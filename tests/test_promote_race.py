"""Concurrent `psydef promote` processes against one loopback `mlflow server` end as some one-after-the-
other order of them would, and each reports success only if that order promotes (or keeps) its version.

The store is the registered tiny ensemble of tests/fixtures/stores.py; more versions of the same model carry other
gate scores. The server (tests/fixtures/server.py) serves that SQLite store; the model artifacts are local
files, read by the promote processes directly."""
import itertools
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from psydef import tracking
from psydef.stages.config import PromoteConfig
from psydef.stages.promote import beats
from tests.fixtures.server import REPO, clean_env, mlflow_server, tail

NAME = tracking.MODEL_NAME
# version -> gate score; v1 is the champion (0.4). One after the other, 4 after 2 passes, 2 after 4 is refused, and so
# is 5 (equal to 1).
SCORES = {2: 0.45, 3: 0.35, 4: 0.5, 5: 0.4, 6: 0.45}  # five promotes at once
ROUNDS = 3
PROMOTE_TIMEOUT = 600


@pytest.fixture(scope="module")
def server(registry_store, champion, tmp_path_factory):
    """The registry store with versions 2..6 (SCORES), served by a loopback tracking server."""
    client = MlflowClient()
    assert str(champion.version) == "1" and tracking.version_metrics(champion)[tracking.GATE_METRIC] == 0.4
    # the champion's files as versions of the older kind, whose gate score is a tag (the logged model's is 0.4)
    files = client.get_logged_model(champion.source.removeprefix("models:/")).artifact_location
    for number, score in SCORES.items():
        version = client.create_model_version(NAME, files, champion.run_id,
                                              tags={**champion.tags, tracking.GATE_METRIC: repr(score)})
        assert str(version.version) == str(number)
    workdir = tmp_path_factory.mktemp("race-server")
    with mlflow_server(registry_store.uri, workdir) as (uri, _, log):
        yield uri, log


def serial_outcomes(order, champion=1, scores={1: 0.4, **SCORES}):
    """What promoting ``order`` one after the other does: ({version: promoted?}, production, previous)."""
    production, previous, promoted = champion, None, {}
    for version in order:
        if version == production:
            promoted[version] = True
        elif beats(scores[version], scores[production], PromoteConfig().min_gain):
            production, previous, promoted[version] = version, production, True
        else:
            promoted[version] = False
    return promoted, production, previous


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_concurrent_promotes_end_in_a_serial_order(server, tmp_path, round_):
    uri, server_log = server
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.set_registered_model_alias(NAME, tracking.PRODUCTION, "1")
    if tracking.PREVIOUS in client.get_registered_model(NAME).aliases:
        client.delete_registered_model_alias(NAME, tracking.PREVIOUS)
    env = clean_env() | {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "registry-test",
                         "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = {}
    for version in SCORES:
        log = (tmp_path / f"promote-{version}.log").open("w")
        procs[version] = subprocess.Popen([sys.executable, "-m", "entrypoints", "promote", "--version", str(version)],
                                          cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
    outcomes, logs = {}, {}
    for version, proc in procs.items():
        proc.wait(timeout=PROMOTE_TIMEOUT)
        logs[version] = (tmp_path / f"promote-{version}.log").read_text()
        refused = "not promoted (pass --force" in logs[version]
        assert proc.returncode == (1 if refused else 0), f"v{version} exited {proc.returncode}:\n{logs[version][-3000:]}"
        outcomes[version] = not refused
    aliases = client.get_registered_model(NAME).aliases
    state = (outcomes, int(aliases[tracking.PRODUCTION]),
             int(aliases[tracking.PREVIOUS]) if tracking.PREVIOUS in aliases else None)
    orders = [order for order in itertools.permutations(SCORES) if serial_outcomes(order) == state]
    assert orders, (f"no one-after-the-other order of promotes {list(SCORES)} gives {state}\n"
                    + "\n".join(f"--- v{v}:\n{log[-1500:]}" for v, log in logs.items())
                    + f"\n--- server:\n{tail(server_log)}")
    # the lease is gone once every promote has ended
    assert not client.search_registered_models(f"name = '{tracking.lease_name(NAME)}'")
