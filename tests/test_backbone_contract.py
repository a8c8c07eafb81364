"""The contract every registered backbone (``psydef.backbones.BACKBONES``) keeps: it fits on rows of
the data table, gives finite float32 logits of shape (rows, 9), saves an adapter folder without
pickles that loads back to the same logits, fits deterministically for one seed, and refuses a bad
hyper-parameter when it is built, naming the field. A new backbone gets a row in ``SETUPS``."""
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from psydef.backbones import BACKBONES, backbone_class, load_adapter
from tests.fixtures.records import dialogue_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread", "reuse_loaded_tokenizers")


@dataclass(frozen=True)
class Setup:
    """How the contract runs a backbone on the fixture rows: small hyper-parameters, the fixture whose
    folder is the base model (``model=``), the round trip's tolerance, and (field, value) pairs it must
    refuse when built."""
    rows: int
    hyper: dict
    bad: tuple = ()
    model_fixture: str | None = None
    atol: float = 0.0
    requires: tuple = ()


SETUPS = {
    "minilm": Setup(rows=36, hyper={"max_length": 32, "char_ngrams": False}, bad=(("class_weight", "often"), ("C", -1.0))),
    # a 2-layer random Qwen3 with the real tokenizer (tests/fixtures/qwen.py); the DMRS guide and
    # instruction take about 560 tokens, hence max_length 640; the 4-bit base is rebuilt on load
    "qwen3-8b-qlora": Setup(rows=8, hyper={"max_length": 640, "epochs": 1, "learning_rate": 2e-3, "grad_accum": 1,
                                           "eval_batch_size": 4},
                            bad=(("eval_every", -1),), model_fixture="tiny_qwen3_dir", atol=1e-5,
                            requires=("bitsandbytes",)),
}
BAD = [pytest.param(name, key, value, id=f"{name}-{key}") for name, setup in SETUPS.items() for key, value in setup.bad]


def _setup(name: str, request) -> tuple[Setup, dict]:
    """The backbone's setup and its hyper-parameters, the base model's folder filled in."""
    setup = SETUPS[name]
    for module in setup.requires:
        pytest.importorskip(module)
    hyper = dict(setup.hyper)
    if setup.model_fixture:
        hyper["model"] = str(request.getfixturevalue(setup.model_fixture))
    return setup, hyper


def _fit(name: str, hyper: dict, rows):
    return backbone_class(name)(**hyper).fit(rows, seed=0)


def test_every_registered_backbone_has_a_setup():
    assert sorted(SETUPS) == sorted(BACKBONES)


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def trained(request):
    name = request.param
    setup, hyper = _setup(name, request)
    rows = dialogue_rows(setup.rows)
    model = _fit(name, hyper, rows)
    return SimpleNamespace(name=name, setup=setup, hyper=hyper, rows=rows, model=model,
                           logits=model.predict_logits(rows))


def test_logits_are_finite_float32_one_row_per_row_nine_levels(trained):
    assert trained.logits.shape == (len(trained.rows), 9)
    assert trained.logits.dtype == np.float32 and np.isfinite(trained.logits).all()


def _not_a_pickle(path: Path) -> None:
    """``path`` parses as safetensors or JSON, or is UTF-8 text (a tokenizer's merges, peft's model
    card): a pickle (protocol 2 and up starts with byte 0x80) or a torch.save zip never decodes."""
    assert path.suffix not in (".pkl", ".pickle", ".pt", ".pth", ".bin", ".joblib"), path.name
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as weights:
            assert list(weights.keys()), path
    elif path.suffix == ".json":
        json.loads(path.read_text())
    else:
        path.read_bytes().decode("utf-8")


def test_the_adapter_folder_holds_no_pickle_and_loads_back_to_the_same_logits(trained, tmp_path):
    folder = trained.model.save(tmp_path / "adapter")
    files = [path for path in sorted(folder.rglob("*")) if path.is_file()]
    assert folder / "backbone.json" in files
    for path in files:
        _not_a_pickle(path)
    loaded = load_adapter(folder)
    assert type(loaded) is type(trained.model) and loaded.config() == trained.model.config()
    np.testing.assert_allclose(loaded.predict_logits(trained.rows), trained.logits, rtol=0, atol=trained.setup.atol)


def test_two_fits_with_one_seed_give_equal_logits(trained):
    again = _fit(trained.name, trained.hyper, trained.rows)
    np.testing.assert_array_equal(again.predict_logits(trained.rows), trained.logits)


@pytest.mark.parametrize("name, setting, value", BAD)
def test_a_bad_hyper_parameter_is_refused_at_construction_naming_the_field(name, setting, value, request):
    _, hyper = _setup(name, request)
    with pytest.raises(ValueError, match=rf"\b{setting}\b"):
        backbone_class(name)(**{**hyper, setting: value})
