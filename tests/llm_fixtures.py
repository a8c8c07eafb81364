"""Fixtures of the LLM backbone tests (tests/test_qwen_qlora.py, tests/test_llm_chain.py): one torch
thread and each tokenizer loaded once (autouse in a module that imports them), and a count of base-model loads."""
import hashlib
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's matmuls gain nothing from threads, and on a busy 2-core machine OpenMP
    oversubscription makes them ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def reuse_loaded_tokenizers():
    """Loading the real Qwen3 tokenizer takes 2-5 s; every fit and every adapter folder would load it
    again. Each distinct tokenizer (by its files) is still loaded once through the backbone's code."""
    from transformers import AutoTokenizer

    load, loaded = AutoTokenizer.from_pretrained, {}

    def load_once(source, *args, **kwargs):
        files = sorted(Path(source).glob("tokenizer*.json"))
        key = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest() if files else str(source)
        if key not in loaded:
            loaded[key] = load(source, *args, **kwargs)
        return loaded[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AutoTokenizer, "from_pretrained", load_once)
        yield


@pytest.fixture
def count_base_loads(monkeypatch) -> list:
    """The sources of every base-model load (AutoModelForSequenceClassification.from_pretrained) so far."""
    from transformers import AutoModelForSequenceClassification

    calls = []
    load = AutoModelForSequenceClassification.from_pretrained

    def counted(*args, **kwargs):
        calls.append(str(args[0] if args else kwargs.get("pretrained_model_name_or_path")))
        return load(*args, **kwargs)

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", counted)
    return calls
