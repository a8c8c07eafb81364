"""The CPU default backbone (class-weighted logistic regression on TF-IDF + frozen MiniLM views) and its
embedding cache, on small generated rows."""
import json
from pathlib import Path

import numpy as np
import pytest

from psydef.backbones import backbone_class, load_adapter, minilm, resolve_backbone_name
from psydef.backbones.encoder import FrozenEncoder
from psydef.backbones.minilm import MiniLMBackbone

SMALL = {"max_length": 32}  # short encoder inputs: the fixtures are short


@pytest.fixture(autouse=True)
def embedding_cache(tmp_path, monkeypatch):
    """Every test gets its own empty on-disk embedding cache and a fresh in-process encoder state."""
    monkeypatch.setenv("PSYDEF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(FrozenEncoder, "_shared", {})
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def rows():
    from tests.fixtures.records import dialogue_rows

    return dialogue_rows(54)


@pytest.mark.parametrize("hyper", [SMALL, {**SMALL, "combine": "vote", "previous_max_length": 32, "context_max_length": 32},
                                   {"max_length": 0, "char_ngrams": False, "history_tfidf": False, "length_weight": 0}])
def test_round_trip_reproduces_logits_and_stores_no_pickle(rows, tmp_path, hyper):
    model = MiniLMBackbone(**hyper).fit(rows, seed=0)
    logits = model.predict_logits(rows)
    assert logits.shape == (len(rows), 9) and logits.dtype == np.float32 and np.isfinite(logits).all()
    assert (logits.argmax(1) == rows["label"].to_numpy()).mean() > 0.9  # the toy task is learnable
    adapter = model.save(tmp_path / "adapter")
    assert sorted(p.name for p in adapter.iterdir()) == ["backbone.json", "linear.safetensors", "tfidf.json"]
    for name in ("backbone.json", "tfidf.json"):
        json.loads((adapter / name).read_text())  # plain JSON
    from safetensors.numpy import load_file

    assert all(isinstance(v, np.ndarray) for v in load_file(str(adapter / "linear.safetensors")).values())
    assert not any(p.read_bytes()[:1] == b"\x80" for p in adapter.iterdir())  # no pickle stream
    loaded = load_adapter(adapter)
    assert isinstance(loaded, MiniLMBackbone) and loaded.config() == model.config()
    assert np.array_equal(loaded.predict_logits(rows), logits)


def test_same_seed_same_logits_and_augmented_rows_can_be_left_out(rows):
    first = MiniLMBackbone(**SMALL).fit(rows, seed=3).predict_logits(rows)
    FrozenEncoder._shared = {}  # read the embeddings back from the disk cache
    assert np.array_equal(MiniLMBackbone(**SMALL).fit(rows, seed=3).predict_logits(rows), first)
    # without bagging the fit ignores the seed
    assert np.array_equal(MiniLMBackbone(**SMALL).fit(rows, seed=4).predict_logits(rows), first)
    marked = rows.assign(is_augmented=np.arange(len(rows)) >= 45)
    without = MiniLMBackbone(**SMALL).fit(marked, seed=3).predict_logits(rows)  # the default leaves them out
    assert np.array_equal(without, MiniLMBackbone(**SMALL).fit(rows.iloc[:45], seed=3).predict_logits(rows))
    assert np.array_equal(MiniLMBackbone(**SMALL, use_augmented=True).fit(marked, seed=3).predict_logits(rows), first)


@pytest.mark.parametrize("bagging", [{"row_subsample": 0.7}, {"feature_subsample": 0.5},
                                     {"n_bags": 3, "row_subsample": 0.8, "combine": "vote"}])
def test_bagging_draws_by_the_seed(rows, tmp_path, bagging):
    logits = {seed: MiniLMBackbone(**SMALL, **bagging).fit(rows, seed=seed).predict_logits(rows) for seed in (3, 4)}
    assert not np.allclose(logits[3], logits[4])  # another seed, another model
    again = MiniLMBackbone(**SMALL, **bagging).fit(rows, seed=3)
    assert np.array_equal(again.predict_logits(rows), logits[3])  # one seed, one model
    assert (logits[3].argmax(1) == rows["label"].to_numpy()).mean() > 0.8  # still learns the toy task
    assert np.array_equal(load_adapter(again.save(tmp_path / "adapter")).predict_logits(rows), logits[3])


def test_bagged_voters_see_their_share_of_each_level_and_of_the_columns():
    model = MiniLMBackbone(n_bags=2, row_subsample=0.5, feature_subsample=0.25)
    y = np.repeat([0, 1, 7], [10, 3, 1])
    rows, columns = model._draw(y, 40, seed=1, bag=0)
    assert np.bincount(y[rows], minlength=8)[[0, 1, 7]].tolist() == [5, 2, 1]  # at least one row per level
    assert len(columns) == 10 and len(set(columns)) == 10
    assert not np.array_equal(columns, model._draw(y, 40, seed=1, bag=1)[1])
    unbagged = MiniLMBackbone()._draw(y, 40, seed=1, bag=0)
    assert np.array_equal(unbagged[0], np.arange(14)) and np.array_equal(unbagged[1], np.arange(40))


def test_views_read_only_the_turns_before_the_target():
    dialogue = [{"speaker": "seeker", "text": "I lost my job."}, {"speaker": "supporter", "text": "I am sorry."},
                {"speaker": "seeker", "text": "It is fine."}, {"speaker": "supporter", "text": "Is it?"},
                {"speaker": "seeker", "text": "Whatever."}]
    assert minilm.seeker_history(dialogue) == "I lost my job.\nIt is fine."
    assert minilm.seeker_history(dialogue[:1]) == ""
    assert minilm.previous_turn(dialogue) == "Is it?"
    assert minilm.tagged_context(dialogue, 2) == "seeker_it seeker_is seeker_fine supporter_is supporter_it"


def test_length_columns_count_turns_so_far_and_target_words():
    import pandas as pd

    dialogue = [{"speaker": "seeker", "text": "Hi"}, {"speaker": "supporter", "text": "Hello, how are you?"},
                {"speaker": "seeker", "text": "I am fine, really."}]
    rows = pd.DataFrame({"dialogue": [dialogue, dialogue[:1]], "current_text": ["I am fine, really.", "Hi"]})
    assert np.allclose(minilm.length_columns(rows), [[np.log(4) / 4, np.log(5) / 5], [np.log(2) / 4, np.log(2) / 5]])
    model = MiniLMBackbone(max_length=0, length_weight=2.0)
    model.vectorizers = {"word": minilm.TfidfVectorizer().fit(rows["current_text"])}
    target = model._views(rows)["stack"].toarray()
    assert np.allclose(target[:, -2:], 2.0 * minilm.length_columns(rows))  # scaled by length_weight, beside the words
    model.length_weight = 0
    assert model._views(rows)["stack"].shape[1] == len(model.vectorizers["word"].vocabulary_)  # 0: no columns


def test_a_level_missing_from_training_is_never_predicted(rows):
    train = rows[rows["label"] != 4]
    logits = MiniLMBackbone(**SMALL).fit(train, seed=0).predict_logits(rows)
    assert np.isfinite(logits).all() and not (logits.argmax(1) == 4).any()


def test_fit_reports_one_epoch_with_validation_logits(rows):
    seen = []
    MiniLMBackbone(**SMALL).fit(rows.iloc[:45], seed=0, valid=rows.iloc[45:],
                                on_epoch=lambda epoch, loss, logits: seen.append((epoch, loss, logits.shape)))
    assert len(seen) == 1 and seen[0][0] == 1 and seen[0][1] > 0 and seen[0][2] == (9, 9)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="combine"):
        MiniLMBackbone(combine="average")
    with pytest.raises(ValueError, match="class_weight"):
        MiniLMBackbone(class_weight="sqrt")
    with pytest.raises(ValueError, match="encoder"):
        MiniLMBackbone(encoder="bert")
    for bad in ({"n_bags": 0}, {"row_subsample": 0}, {"feature_subsample": 1.5}):
        with pytest.raises(ValueError, match=f"minilm {next(iter(bad))}: must be"):
            MiniLMBackbone(**bad)
    from psydef.settings import check_hyper

    assert check_hyper("minilm", {"n_bags": 2, "row_subsample": 0.8, "encoder": "mpnet"}) == {
        "n_bags": 2, "row_subsample": 0.8, "encoder": "mpnet"}
    for bad, where in (({"n_bags": 0}, "n_bags"), ({"row_subsample": 0.0}, "row_subsample"),
                       ({"feature_subsample": 2.0}, "feature_subsample"), ({"encoder": "bert"}, "encoder")):
        with pytest.raises(ValueError, match=where):
            check_hyper("minilm", bad)


def test_cpu_auto_resolves_to_the_linear_default(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backbone_name("auto") == "minilm" and backbone_class("auto") is MiniLMBackbone


def test_batches_bound_rows_and_padded_tokens(monkeypatch):
    monkeypatch.setenv("PSYDEF_CACHE_DIR", "off")  # both encoders encode
    encoder = FrozenEncoder(batch_size=4, batch_tokens=40, dtype="float32")
    lengths = [3, 50, 5, 5, 9, 12, 3, 30, 8]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = encoder._batches(order, lengths)
    assert [i for b in batches for i in b] == order  # every text once, in order
    assert all(len(b) <= 4 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 40) for b in batches)
    texts = ["Whatever.", "I am fine, really, I just need to keep busy and not think about it at all.", "ok",
             "It is what it is."] * 3
    one_batch = FrozenEncoder(batch_size=64, batch_tokens=10_000, dtype="float32")
    float32 = encoder.embed(texts, 32)
    assert np.allclose(float32, one_batch.embed(texts, 32), atol=1e-5)
    assert encoder._model is not None and one_batch._model is not None
    bfloat16 = FrozenEncoder(dtype="bfloat16")  # the dtype where the CPU has bfloat16 matmuls
    assert bfloat16.key != encoder.key  # cached apart
    assert (np.sum(bfloat16.embed(texts, 32) * float32, axis=1) > 0.999).all()  # cosine: both are unit vectors


def test_embedding_cache_is_shared_across_processes(embedding_cache, monkeypatch):
    texts = ["I am fine, really.", "Whatever.", "I am fine, really."]
    first = FrozenEncoder().embed(texts, 32)
    assert first.shape == (3, 384) and np.array_equal(first[0], first[2])
    shards = list(embedding_cache.rglob("*.safetensors"))
    assert len(shards) == 1 and "max_length_32" in str(shards[0])
    fresh = FrozenEncoder()  # another process: reads the shard, never loads the model
    assert np.array_equal(fresh.embed(texts[::-1], 32), first[::-1]) and fresh._model is None
    assert np.allclose(FrozenEncoder().embed(texts[:1], 16), first[:1], atol=0.2)  # another key: encoded
    assert fresh._model is None and len(list(embedding_cache.rglob("*.safetensors"))) == 2
    monkeypatch.setenv("PSYDEF_CACHE_DIR", "off")
    off = FrozenEncoder()
    assert np.allclose(off.embed(texts, 32), first, atol=1e-5) and off._model is not None


def test_byte_identical_fold_adapters_are_logged_once_and_predict_once(tracking_uri, tmp_path, monkeypatch):
    import mlflow

    from psydef.calibration.rule import EnsembleSpec, fold_mean_probs
    from psydef.ensemble import log_ensemble_model
    from tests.fixtures.records import ensemble_rows

    rows = ensemble_rows(54)
    model, other = MiniLMBackbone(**SMALL).fit(rows, seed=0), MiniLMBackbone(**SMALL, C=2.0).fit(rows, seed=0)
    # members r1 and r2 are two seeds of the CPU default (the same adapters); r3 has them the other way round
    dirs = [[a.save(tmp_path / f"{member}_fold_{k}") for k, a in enumerate(pair)]
            for member, pair in (("r1", (model, other)), ("r2", (model, other)), ("r3", (other, model)))]
    spec = EnsembleSpec.plain(["r1", "r2", "r3"])
    with mlflow.start_run():
        info = log_ensemble_model(spec, dirs)
    stored = Path(mlflow.artifacts.download_artifacts(info.model_uri)) / "artifacts"
    assert sorted(p.name for p in stored.iterdir()) == ["r1_fold_0", "r1_fold_1"]  # r1's folders, once

    ensemble = mlflow.pyfunc.load_model(info.model_uri)
    (a0, a1), (b0, b1), (c0, c1) = ensemble.unwrap_python_model().members
    assert a0 is b0 is c1 and a1 is b1 is c0 and a0 is not a1
    calls = []
    predict_logits = MiniLMBackbone.predict_logits
    monkeypatch.setattr(MiniLMBackbone, "predict_logits", lambda self, r: calls.append(self) or predict_logits(self, r))
    out = ensemble.predict(rows[["id", "dialogue", "current_text"]])
    assert len(calls) == 2  # once per distinct adapter
    fold_logits = [model.predict_logits(rows), other.predict_logits(rows)]
    probs = [fold_mean_probs(fold_logits), fold_mean_probs(fold_logits), fold_mean_probs(fold_logits[::-1])]
    np.testing.assert_array_equal(out["label"].to_numpy(), spec.decode_probs(probs))


def test_mpnet_weights_are_joined_from_the_extra_parts_once(tmp_path, monkeypatch):
    import io
    import zipfile
    from importlib.metadata import PackageNotFoundError

    from psydef.backbones import encoder

    blob = io.BytesIO()
    with zipfile.ZipFile(blob, "w") as archive:
        archive.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        archive.writestr("all-mpnet-base-v2/model.safetensors", b"x" * 1000)
    data = blob.getvalue()
    parts = {}
    for i, name in enumerate(encoder.MPNET_PARTS):  # the zip cut into five parts, as the wheels ship it
        path = tmp_path / "wheels" / f"part{i}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data[i * len(data) // 5:(i + 1) * len(data) // 5])
        parts[name] = path

    class Installed:
        def __init__(self, name):
            self.name = name

        def locate_file(self, relative):
            assert relative.startswith(f"{self.name[:-4]}_{self.name[-3:]}/input/all-mpnet-base-v2.zip.")
            return parts[self.name]

    monkeypatch.setattr(encoder, "distribution", Installed)
    monkeypatch.setattr(encoder, "version", lambda name: "0.0.1")
    folder = encoder.mpnet_folder(tmp_path / "models")
    assert folder == tmp_path / "models" / "all-mpnet-base-v2-0.0.1"
    assert (folder / "model.safetensors").read_bytes() == b"x" * 1000
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [folder.name]  # no temporary left
    monkeypatch.setattr(encoder, "distribution", None)  # unpacked: the parts are not read again
    assert encoder.mpnet_folder(tmp_path / "models") == folder

    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(encoder, "version", missing)
    with pytest.raises(RuntimeError, match=r"pip install 'psydef\[mpnet\]'"):
        FrozenEncoder("mpnet")
