"""The whole chain on the LLM backbone: ``main`` with ``--backbone qwen3-8b-qlora`` on a tiny random
Qwen3 saved with the real Qwen3 tokenizer (4-bit NF4 on CPU, the same code as on a GPU), 2 seeds x 5
folds, through prepare, train, tune, register, promote and predict, then one request to
``mlflow models serve``. Every process that holds the ensemble loads the base model once.

Cost: each prompt is ~600 tokens (the DMRS guide alone is ~560), so the data is a 48-record subset
(12 dialogues, every level) of the synthetic ``data_dir`` and each fold trains one epoch."""
import json
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

from psydef import tracking
from tests.fixtures.server import post_json, served_model

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_torch_thread", "reuse_loaded_tokenizers")

N_DIALOGUES = 12  # 48 records: 5 of each level at least, as 5 stratified folds need
SEEDS = (1, 2)
# The paper's settings (4-bit NF4, LoRA r=128 on every projection, the score head) except one epoch,
# a learning rate for one epoch, no gradient accumulation and no per-epoch validation.
HYPER = {"max_length": 640, "epochs": 1, "learning_rate": 2e-3, "batch_size": 8, "grad_accum": 1,
         "eval_batch_size": 8, "eval_every": 0}


@pytest.fixture
def small_data_dir(data_dir, tmp_path) -> Path:
    """The first ``N_DIALOGUES`` dialogues of the synthetic train.json (labels cycle through all 9
    levels) and the whole test.json."""
    records = json.loads((data_dir / "train.json").read_text())
    dialogues = list(dict.fromkeys(r["dialogue_id"] for r in records))[:N_DIALOGUES]
    folder = tmp_path / "small"
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps([r for r in records if r["dialogue_id"] in dialogues]))
    (folder / "test.json").write_text((data_dir / "test.json").read_text())
    return folder


def _loads_during(monkeypatch, module, name: str, calls: list, counts: dict) -> None:
    """Record how many base-model loads ``module.name`` makes, in ``counts[name]``."""
    function = getattr(module, name)

    def counted(*args, **kwargs):
        before = len(calls)
        try:
            return function(*args, **kwargs)
        finally:
            counts[name] = len(calls) - before

    monkeypatch.setattr(module, name, counted)


def test_main_on_the_llm_backbone_then_serve(small_data_dir, tiny_qwen3_dir, tracking_uri, tmp_path, monkeypatch,
                                            count_base_loads):
    from psydef.cli import cli
    from psydef.stages import pipeline

    counts = {}
    for stage in ("run_register", "run_promote", "run_predict"):
        _loads_during(monkeypatch, pipeline, stage, count_base_loads, counts)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [
        "main", "--data-dir", str(small_data_dir), "--seeds", ",".join(map(str, SEEDS)), "--members",
        "qwen3-8b-qlora:" + ",".join(f"{k}={json.dumps(v)}" for k, v in {"model": str(tiny_qwen3_dir), **HYPER}.items()),
        "--n-trials", "30", "--inner-trials", "10", "--sampler", "random", "--out-dir", str(out)])
    assert result.exit_code == 0, f"{result.output[-5000:]}\n{result.exception!r}"

    # 2 seeds x 5 folds trained (one base load each); every later process step loaded the base once
    n_folds = 5
    print(f"base-model loads: {len(count_base_loads)} in all; by stage {counts}")
    assert len(count_base_loads) == len(SEEDS) * n_folds + sum(counts.values())
    assert counts["run_register"] <= 1 and counts["run_promote"] == 1 and counts["run_predict"] == 1, counts
    version = mlflow.MlflowClient().get_model_version_by_alias(tracking.MODEL_NAME, tracking.PRODUCTION)
    assert version.tags[tracking.V_BACKBONE] == "qwen3-8b-qlora"
    members = [mlflow.get_run(run_id) for run_id in version.tags[tracking.V_TRAIN_RUN_IDS].split(",")]
    assert sorted(int(m.data.tags[tracking.SEED]) for m in members) == list(SEEDS)
    assert len({m.data.tags[tracking.PREPARE_RUN_ID] for m in members}) == len(SEEDS)  # each seed on its own folds

    test_ids = [r["id"] for r in json.loads((small_data_dir / "test.json").read_text())]
    predicted = json.loads((out / tracking.PREDICTION_JSON).read_text())
    assert [p["id"] for p in predicted] == test_ids and all(0 <= p["label"] <= 8 for p in predicted)

    answer = _serve_one_request(tracking_uri, tmp_path, small_data_dir / "test.json")
    assert [p["id"] for p in answer] == test_ids[:3]
    assert [p["label"] for p in answer] == [p["label"] for p in predicted[:3]]
    for p in answer:
        assert abs(sum(p[f"prob_{c}"] for c in range(9)) - 1) < 1e-6


def _serve_one_request(tracking_uri: str, workdir: Path, test_json: Path) -> list[dict]:
    """``mlflow models serve`` the production model and post the first 3 test records once."""
    with served_model(tracking.PRODUCTION_URI, tracking_uri, workdir,
                      env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}) as url:
        records = json.loads(test_json.read_text())[:3]
        rows = {"columns": ["id", "dialogue", "current_text"],
                "data": [[r["id"], r["dialogue"], r["current_text"]] for r in records]}
        status, answer = post_json(url, {"dataframe_split": rows})
        assert status == 200, answer
        return answer["predictions"]
