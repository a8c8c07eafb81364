"""The QLoRA backbone on CPU, through the same code as on GPU (4-bit NF4 load, LoRA, training loop,
adapter save/load), with a tiny random Qwen3 and the real Qwen3 tokenizer."""
import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open

from psydef.backbones import backbone_class, load_adapter, load_adapters
from psydef.backbones.base import Checkpoint
from psydef.backbones.qwen_qlora import (BASE_REVISION_FILE, CHECKPOINT_META, LORA_TARGETS, QwenQLoRABackbone,
                                         folder_revision)
from psydef.calibration.rule import EnsembleSpec, fold_mean_probs
from psydef.core.losses import class_weighted_loss

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_torch_thread", "reuse_loaded_tokenizers")

MAX_LENGTH = 640  # the DMRS guide and instruction alone take about 560 tokens
N_ROWS, EPOCHS = 16, 2


def tiny_backbone(model_dir, **overrides) -> QwenQLoRABackbone:
    """The paper's hyper-parameters except what a 16-row, 2-epoch CPU run needs."""
    settings = dict(model=str(model_dir), max_length=MAX_LENGTH, epochs=EPOCHS, learning_rate=2e-3,
                    grad_accum=2, eval_batch_size=4)
    return QwenQLoRABackbone(**{**settings, **overrides})


@pytest.fixture(scope="module")
def trained(tiny_qwen3_dir, make_dialogue_rows):
    rows = make_dialogue_rows(N_ROWS)
    epochs = []
    backbone = tiny_backbone(tiny_qwen3_dir).fit(rows, seed=0, valid=rows,
                                                 on_epoch=lambda *report: epochs.append(report))
    return backbone, rows, epochs


def test_registered_with_the_paper_defaults():
    assert backbone_class("qwen3-8b-qlora") is QwenQLoRABackbone
    config = QwenQLoRABackbone().config()
    assert config == json.loads(json.dumps(config))
    assert QwenQLoRABackbone(**config).config() == config
    assert config == dict(model="Qwen/Qwen3-8B", max_length=1024, max_turns=30, lora_r=128, lora_alpha=256,
                          lora_dropout=0.1, learning_rate=1.2e-4, epochs=10, batch_size=2, grad_accum=8,
                          warmup_ratio=0.08, max_grad_norm=0.3, label_smoothing=0.05, load_in_4bit=True,
                          gradient_checkpointing=True, eval_batch_size=8, compute_dtype="auto",
                          attn_implementation="auto", group_by_length=True, eval_every=1, revision=None,
                          checkpoint_every=1)


def test_predict_before_fit_fails(make_dialogue_rows):
    with pytest.raises(RuntimeError, match="fit or load"):
        QwenQLoRABackbone().predict_logits(make_dialogue_rows(2))


def test_4bit_nf4_base_with_lora_on_every_projection_and_a_trained_score_head(trained):
    backbone, _, _ = trained
    net = backbone.net
    assert net.config.pad_token_id == backbone.tokenizer.pad_token_id
    assert net.base_model.model.is_activation_checkpointing
    lora_layers = {name.rsplit(".", 1)[-1]: module for name, module in net.named_modules()
                   if hasattr(module, "lora_A") and hasattr(module, "base_layer")}
    assert set(lora_layers) == set(LORA_TARGETS)
    for layer in lora_layers.values():
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
        quant_state = layer.base_layer.weight.quant_state
        assert quant_state.quant_type == "nf4" and quant_state.nested  # nested: double quantisation
        assert layer.base_layer.support_avx512bf16_for_cpu is False
        assert layer.lora_A["default"].out_features == 128
        assert layer.scaling["default"] == 256 / 128
        assert layer.lora_dropout["default"].p == 0.1
    score = net.base_model.model.score.modules_to_save["default"]
    assert type(score) is torch.nn.Linear and score.out_features == 9
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or ".score.modules_to_save." in name for name in trainable)
    assert any(".score." in name for name in trainable)


def test_fit_trains_and_reports_every_epoch(trained):
    backbone, _, epochs = trained
    assert [epoch for epoch, _, _ in epochs] == list(range(1, EPOCHS + 1))
    for _, train_loss, valid_logits in epochs:
        assert math.isfinite(train_loss)
        assert valid_logits.shape == (N_ROWS, 9) and valid_logits.dtype == np.float32
    # LoRA B starts at zero; the score head starts as peft's copy of the original head.
    net = backbone.net
    assert all(module.lora_B["default"].weight.abs().sum() > 0
               for module in net.modules() if hasattr(module, "lora_B"))
    score = net.base_model.model.score
    assert not torch.equal(score.modules_to_save["default"].weight, score.original_module.weight)


def test_predict_logits_match_the_last_epoch_and_keep_row_order(trained):
    backbone, rows, epochs = trained
    logits = backbone.predict_logits(rows)
    assert logits.shape == (N_ROWS, 9) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, epochs[-1][2], atol=1e-6)
    reversed_logits = backbone.predict_logits(rows.iloc[::-1])
    np.testing.assert_allclose(reversed_logits[::-1], logits, atol=1e-5)


def test_saved_adapter_reloads_to_the_same_logits(trained, tmp_path):
    backbone, rows, _ = trained
    path = backbone.save(tmp_path / "adapter")
    adapter_config = json.loads((path / "adapter_config.json").read_text())
    assert adapter_config["r"] == 128 and "score" in adapter_config["modules_to_save"]
    assert (path / "tokenizer.json").is_file()
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    assert any("lora_A" in key for key in keys) and any("score" in key for key in keys)
    assert not any("embed_tokens" in key for key in keys)  # the adapter, not the base model

    loaded = load_adapter(path)
    assert isinstance(loaded, QwenQLoRABackbone) and loaded.config() == backbone.config()
    np.testing.assert_allclose(loaded.predict_logits(rows), backbone.predict_logits(rows), atol=1e-5)


def test_learns_a_two_level_toy_task(tiny_qwen3_dir, make_dialogue_rows):
    rows = make_dialogue_rows(18)
    rows = rows[rows["label"].isin([1, 7])].reset_index(drop=True)  # 4 rows, 2 levels
    labels = torch.tensor(rows["label"].to_numpy())
    loss_fn = class_weighted_loss(labels.tolist(), label_smoothing=0.0)
    losses, accuracies = [], []

    def on_epoch(epoch, train_loss, logits):
        losses.append(loss_fn(torch.from_numpy(logits), labels).item())
        accuracies.append((logits.argmax(1) == labels.numpy()).mean())

    # Shuffled batches: with 4 rows, length grouping would pair the same rows in every epoch.
    tiny_backbone(tiny_qwen3_dir, epochs=6, learning_rate=1e-2, grad_accum=1, group_by_length=False).fit(
        rows, seed=0, valid=rows, on_epoch=on_epoch)
    assert accuracies[-1] == 1.0
    assert losses[-1] < losses[0] / 2


def test_fit_is_deterministic_given_the_seed(tiny_qwen3_dir, make_dialogue_rows):
    rows = make_dialogue_rows(4)
    first, second, other_seed = (tiny_backbone(tiny_qwen3_dir, epochs=1).fit(rows, seed=seed).predict_logits(rows)
                                 for seed in (0, 0, 1))
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, other_seed)


def test_full_precision_without_checkpointing(tiny_qwen3_dir, make_dialogue_rows):
    rows = make_dialogue_rows(4)
    backbone = tiny_backbone(tiny_qwen3_dir, load_in_4bit=False, gradient_checkpointing=False, epochs=1)
    backbone.fit(rows, seed=0)
    base_layers = [module.base_layer for module in backbone.net.modules() if hasattr(module, "lora_A")]
    assert base_layers and all(type(layer) is torch.nn.Linear for layer in base_layers)
    assert not backbone.net.base_model.model.is_activation_checkpointing
    assert np.isfinite(backbone.predict_logits(rows)).all()


def test_bfloat16_compute_trains_in_float32_and_stores_the_adapter_in_bfloat16(tiny_qwen3_dir, make_dialogue_rows,
                                                                              tmp_path):
    """The CUDA default (compute_dtype auto = bfloat16), run on CPU: frozen non-quantised weights in
    bf16, trainable weights in float32 while training, stored in bf16; under bf16 autocast every matmul
    rounds its weights to bf16 anyway, so storing them in bf16 does not change the logits."""
    rows = make_dialogue_rows(6)
    backbone = tiny_backbone(tiny_qwen3_dir, compute_dtype="bfloat16", epochs=1)
    trainable_dtypes, epochs = set(), []

    def on_epoch(*report):
        trainable_dtypes.update(p.dtype for p in backbone.net.parameters() if p.requires_grad)
        epochs.append(report)

    backbone.fit(rows, seed=0, valid=rows, on_epoch=on_epoch)
    assert trainable_dtypes == {torch.float32}
    net = backbone.net.base_model.model
    assert net.model.embed_tokens.weight.dtype == torch.bfloat16 and net.model.norm.weight.dtype == torch.bfloat16
    assert {p.dtype for name, p in backbone.net.named_parameters() if ".default." in name} == {torch.bfloat16}
    logits = backbone.predict_logits(rows)
    np.testing.assert_allclose(logits, epochs[-1][2], atol=1e-5)  # float32 weights -> stored bf16 weights

    path = backbone.save(tmp_path / "adapter")
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.bfloat16}
    loaded = load_adapter(path)
    assert {p.dtype for name, p in loaded.net.named_parameters() if f".{loaded.adapter_name}." in name} == {torch.bfloat16}
    np.testing.assert_allclose(loaded.predict_logits(rows), logits, atol=1e-5)
    # a bf16 adapter loaded for float32 compute is upcast (exactly), so CPU users can read GPU adapters
    as_float32 = QwenQLoRABackbone.load_many([path], [{**backbone.config(), "compute_dtype": "float32"}])[0]
    assert {p.dtype for name, p in as_float32.net.named_parameters() if ".adapter_0." in name} == {torch.float32}
    np.testing.assert_allclose(as_float32.predict_logits(rows), logits, atol=0.05)


def _random_fold_adapters(model_dir, root: Path, n: int) -> list[Path]:
    """``n`` adapter folders written by the backbone's own save, each with its own random LoRA weights and
    score head (what is tested is loading them, so no training is needed)."""
    backbone = tiny_backbone(model_dir)
    backbone._load_tokenizer(model_dir)
    backbone.net = backbone._build_trainable()
    folders = []
    for i in range(n):
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for param in backbone.net.parameters():
                if param.requires_grad:
                    param.normal_(0.0, 0.05)
        folders.append(backbone.save(root / f"member_{i // 5}_fold_{i % 5}"))
    return folders


def test_an_ensemble_of_2_members_x_5_folds_loads_the_base_once(tiny_qwen3_dir, make_dialogue_rows, tmp_path,
                                                               count_base_loads):
    """The pyfunc's load_context attaches all 10 fold adapters to one base model by name; each fold
    predicts the logits of its adapter loaded alone, and the served blend is the blend of those."""
    from psydef.ensemble import EnsembleModel

    folders = _random_fold_adapters(tiny_qwen3_dir, tmp_path, 10)
    rows = make_dialogue_rows(5, labelled=False)
    count_base_loads.clear()
    alone = [load_adapter(folder).predict_logits(rows) for folder in folders]
    assert len(count_base_loads) == 10
    count_base_loads.clear()

    keys = [[f"member_{m}_fold_{k}" for k in range(5)] for m in range(2)]
    spec = EnsembleSpec(members=[{"run_id": "a", "weight": 0.3}, {"run_id": "b", "weight": 0.7}],
                        delta=[0.3, -0.2, 0.1, 0.0, 0.25, -0.1, 0.05, 0.0, -0.3], tau7=0.12)
    model = EnsembleModel()
    model.load_context(SimpleNamespace(model_config={"ensemble": spec.to_dict(), "adapters": keys},
                                       artifacts={folder.name: str(folder) for folder in folders}))
    assert count_base_loads == [str(tiny_qwen3_dir)]
    adapters = [adapter for member in model.members for adapter in member]
    assert len({id(adapter.net) for adapter in adapters}) == 1
    assert len(adapters[0].net.peft_config) == 10
    # in an order that switches the adapter at every call, and back
    for i in [*range(10), 3, 0, 9]:
        np.testing.assert_allclose(adapters[i].predict_logits(rows), alone[i], atol=1e-5)
    assert not np.allclose(alone[0], alone[1])

    served = model.predict(None, rows)
    probs = [fold_mean_probs(alone[5 * m:5 * m + 5]) for m in range(2)]
    np.testing.assert_allclose(served[[f"prob_{c}" for c in range(9)]].to_numpy(), spec.blend_probs(probs), atol=1e-5)
    np.testing.assert_array_equal(served["label"], spec.decode_probs(probs))
    # the rule tune calibrated, fed log(probs) (softmax(log p) = p): the same labels
    np.testing.assert_array_equal(served["label"], spec.decode_logits([np.log(p) for p in probs]))


def test_adapters_that_differ_in_their_base_get_one_base_each(tiny_qwen3_dir, tmp_path, count_base_loads):
    folders = _random_fold_adapters(tiny_qwen3_dir, tmp_path, 2)
    count_base_loads.clear()
    config = tiny_backbone(tiny_qwen3_dir).config()
    (folders[1] / "backbone.json").write_text(json.dumps(
        {"backbone": "qwen3-8b-qlora", "config": {**config, "load_in_4bit": False}}))
    first, second = load_adapters(folders)
    assert len(count_base_loads) == 2 and first.net is not second.net
    assert isinstance(first.net.base_model.model.model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
    assert type(second.net.base_model.model.model.layers[0].mlp.up_proj.base_layer) is torch.nn.Linear


def test_length_grouped_batches_cover_every_row_once_and_pad_less(qwen_tokenizer):
    """transformers' LengthGroupedSampler through the backbone's training loader: every row once per
    epoch, the longest batch first, a new order each epoch, and far less padding than shuffled batches."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 1000, size=500)
    # the label carries the row index through the collator
    examples = [{"input_ids": [1] * n, "attention_mask": [1] * n, "labels": i} for i, n in enumerate(lengths)]

    def epochs(group_by_length: bool) -> list[list[dict]]:
        backbone = QwenQLoRABackbone(batch_size=4, group_by_length=group_by_length)
        backbone.tokenizer = qwen_tokenizer
        loader = backbone._train_loader(examples, torch.Generator().manual_seed(0))
        return [list(loader) for _ in range(2)]

    def padded_fraction(epoch):
        return 1 - sum(int(b["attention_mask"].sum()) for b in epoch) / sum(b["attention_mask"].numel() for b in epoch)

    grouped, shuffled = epochs(True), epochs(False)
    for epoch in grouped:
        assert len(epoch) == 125
        assert sorted(i for batch in epoch for i in batch["labels"].tolist()) == list(range(500))
        assert int(np.argmax(lengths)) in epoch[0]["labels"].tolist()
    assert [b["labels"].tolist() for b in grouped[0]] != [b["labels"].tolist() for b in grouped[1]]
    assert padded_fraction(grouped[0]) < padded_fraction(shuffled[0]) / 5


def test_eval_every_and_the_padded_fraction(tiny_qwen3_dir, make_dialogue_rows, caplog):
    caplog.set_level(logging.INFO, logger="psydef")
    rows = make_dialogue_rows(6)
    reports = []
    backbone = tiny_backbone(tiny_qwen3_dir, epochs=3, eval_every=2).fit(
        rows, seed=0, valid=rows, on_epoch=lambda *report: reports.append(report))
    assert [(epoch, logits is not None) for epoch, _, logits in reports] == [(1, False), (2, True), (3, True)]
    assert [s["epoch"] for s in backbone.epoch_stats] == [1, 2, 3]
    for stats in backbone.epoch_stats:
        assert 0 <= stats["padded_fraction"] < 1 and stats["examples"] == 6 and stats["tokens"] > 6 * 500
    assert caplog.text.count("of the tokens fed were padding") == 3
    never = []
    tiny_backbone(tiny_qwen3_dir, epochs=1, eval_every=0).fit(rows, seed=0, valid=rows,
                                                            on_epoch=lambda *report: never.append(report))
    assert never[0][2] is None
    with pytest.raises(ValueError, match="eval_every"):
        tiny_backbone(tiny_qwen3_dir, eval_every=-1)


def test_the_gpu_profile_runs_on_a_tiny_config(data_dir, tmp_path, capsys):
    """bench/gpu_profile.py --tiny: the same code as the 8B GPU profile, on a 2-layer Qwen3 on CPU."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_profile.py"
    spec = importlib.util.spec_from_file_location("gpu_profile", script)
    gpu_profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_profile)
    config = json.loads((script.parent / "qwen3_8b_config.json").read_text())
    assert {k: config[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                                   "num_key_value_heads", "head_dim", "vocab_size")} == dict(
        num_hidden_layers=36, hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936)

    out = tmp_path / "profile.md"
    rows = gpu_profile.main(["--tiny", "--data", str(data_dir / "train.json"), "--model-dir", str(tmp_path / "model"),
                             "--steps", "2", "--decode-rows", "6", "--out", str(out),
                             "--hyper", f"max_length={MAX_LENGTH}", "batch_size=2", "grad_accum=1"])
    values = {name: value for name, value, _ in rows}
    assert float(values["training: non-pad tokens/s"].replace(",", "")) > 0
    assert float(values["ensemble decode: utterances/s"]) > 0
    assert values["adapter size on disk"].endswith("MiB") and values["training: peak GPU memory"] == "n/a (CPU)"
    assert out.read_text().count("\n| ") == len(rows) + 1 and "ensemble decode" in capsys.readouterr().out


# ------------------------------------------------------------------------- base model revision
def _copy_model(model_dir: Path, dst: Path, *, reseed: int | None = None) -> Path:
    """A copy of the tiny Qwen3 folder; ``reseed``: the same architecture with other random weights."""
    import shutil

    from transformers import Qwen3ForCausalLM

    shutil.copytree(model_dir, dst)
    if reseed is not None:
        torch.manual_seed(reseed)
        Qwen3ForCausalLM(Qwen3ForCausalLM.config_class.from_pretrained(model_dir)).save_pretrained(dst)
    return dst


def test_a_local_base_changed_under_its_adapter_is_refused(tiny_qwen3_dir, make_dialogue_rows, tmp_path):
    rows = make_dialogue_rows(4)
    base = _copy_model(tiny_qwen3_dir, tmp_path / "base")
    assert folder_revision(base) == folder_revision(tiny_qwen3_dir)
    backbone = tiny_backbone(base, epochs=1).fit(rows, seed=0)
    adapter = backbone.save(tmp_path / "adapter")
    trained_on = json.loads((adapter / BASE_REVISION_FILE).read_text())
    assert trained_on == {"model": str(base), "revision": folder_revision(base)}
    assert trained_on["revision"].startswith("sha256:")
    assert load_adapter(adapter).base_revision == trained_on["revision"]

    other = _copy_model(tiny_qwen3_dir, tmp_path / "other", reseed=1)
    now = folder_revision(other)
    assert now != trained_on["revision"]
    (base / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ValueError) as refused:
        load_adapter(adapter)
    message = str(refused.value)
    assert "\n" not in message and str(base) in message and now in message and trained_on["revision"] in message
    # a pin that the folder does not match is refused before training
    with pytest.raises(ValueError, match=f"revision {now}.*revision= pins revision sha256:0"):
        tiny_backbone(base, epochs=1, revision="sha256:0").fit(rows, seed=0)


@pytest.fixture
def hub_cache(tiny_qwen3_dir, tmp_path, monkeypatch):
    """An offline Hugging Face Hub cache holding ``psydef-test/tiny-qwen3`` at two commits (other
    random weights), ``main`` at the first; returns (repo id, commits, repo folder)."""
    import huggingface_hub.constants

    root = tmp_path / "hub"
    repo = root / "models--psydef-test--tiny-qwen3"
    commits = ["a" * 40, "b" * 40]
    _copy_model(tiny_qwen3_dir, repo / "snapshots" / commits[0])
    _copy_model(tiny_qwen3_dir, repo / "snapshots" / commits[1], reseed=1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commits[0])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return "psydef-test/tiny-qwen3", commits, repo


def test_a_hub_adapter_loads_the_commit_it_was_trained_on(hub_cache, make_dialogue_rows, tmp_path, count_base_loads):
    import shutil

    model, commits, repo = hub_cache
    rows = make_dialogue_rows(4)
    backbone = tiny_backbone(model, epochs=1).fit(rows, seed=0)
    assert backbone.base_revision == commits[0]
    adapter = backbone.save(tmp_path / "adapter")
    assert json.loads((adapter / BASE_REVISION_FILE).read_text()) == {"model": model, "revision": commits[0]}
    logits = backbone.predict_logits(rows)

    (repo / "refs" / "main").write_text(commits[1])  # the Hub's main moved
    loaded = load_adapter(adapter)
    assert loaded.base_revision == commits[0]
    np.testing.assert_allclose(loaded.predict_logits(rows), logits, atol=1e-5)
    # a pin trains on exactly that commit; main now trains on the other
    assert tiny_backbone(model, epochs=1, revision=commits[0]).fit(rows, seed=0).base_revision == commits[0]
    assert tiny_backbone(model, epochs=1).fit(rows, seed=0).base_revision == commits[1]
    assert count_base_loads == [model] * 4

    shutil.rmtree(repo / "snapshots" / commits[0])  # the trained-on commit is gone (and the Hub offline)
    with pytest.raises(ValueError, match=f"adapter {adapter}: its base model {model} at revision {commits[0]} "
                                         "cannot be loaded"):
        load_adapter(adapter)


# ------------------------------------------------------------------------ checkpoint and resume
class Killed(Exception):
    """Stands for the process being killed after an epoch."""


def _fit_killed_after(model_dir, rows, folder: Path, epoch: int, **hyper) -> list[int]:
    """Fit with a checkpoint in ``folder``, killed once epoch ``epoch`` is over (reported, and saved
    when it is saved); the saved epochs."""
    saved = []

    def on_save(done):
        saved.append(done)
        if done == epoch:
            raise Killed

    def on_epoch(done, *_):
        if done == epoch and not hyper.get("checkpoint_every", 1):
            raise Killed

    with pytest.raises(Killed):
        tiny_backbone(model_dir, **hyper).fit(rows, seed=0, valid=rows, on_epoch=on_epoch,
                                              checkpoint=Checkpoint(folder, on_save=on_save))
    return saved


def test_a_killed_fit_resumes_from_its_checkpoint_to_the_uninterrupted_result(tiny_qwen3_dir, make_dialogue_rows,
                                                                             tmp_path):
    """Killed after epoch 2 of 3 (mid-schedule, with LoRA dropout), a new fit from the checkpoint
    trains epoch 3 only and ends with the uninterrupted fit's weights, bit for bit."""
    rows = make_dialogue_rows(6)
    hyper = dict(epochs=3, grad_accum=2)
    reports = []
    straight = tiny_backbone(tiny_qwen3_dir, **hyper).fit(rows, seed=0, valid=rows,
                                                          on_epoch=lambda *report: reports.append(report))
    assert straight.lora_dropout > 0

    folder = tmp_path / "checkpoint"
    assert _fit_killed_after(tiny_qwen3_dir, rows, folder, 2, **hyper) == [1, 2]
    resumed_reports, saved = [], []
    resumed = tiny_backbone(tiny_qwen3_dir, **hyper).fit(
        rows, seed=0, valid=rows, on_epoch=lambda *report: resumed_reports.append(report),
        checkpoint=Checkpoint(folder, on_save=saved.append))
    assert [epoch for epoch, *_ in resumed_reports] == [3] and saved == []  # none after the last epoch
    assert resumed_reports[0][1] == reports[2][1]
    np.testing.assert_array_equal(resumed_reports[0][2], reports[2][2])
    np.testing.assert_array_equal(resumed.predict_logits(rows), straight.predict_logits(rows))
    assert [s["loss"] for s in resumed.epoch_stats] == [s["loss"] for s in straight.epoch_stats]
    assert [s["epoch"] for s in resumed.epoch_stats] == [1, 2, 3]


def test_a_checkpoint_of_another_fit_or_cut_short_is_refused(tiny_qwen3_dir, make_dialogue_rows, tmp_path):
    rows = make_dialogue_rows(4)
    folder = tmp_path / "checkpoint"
    assert _fit_killed_after(tiny_qwen3_dir, rows, folder, 1, epochs=2, checkpoint_every=1) == [1]
    with pytest.raises(ValueError, match=r"checkpoint .* differs in learning_rate: it cannot be resumed"):
        tiny_backbone(tiny_qwen3_dir, epochs=2, learning_rate=1e-3).fit(rows, seed=0, checkpoint=Checkpoint(folder))
    with pytest.raises(ValueError, match="differs in seed, training rows"):
        tiny_backbone(tiny_qwen3_dir, epochs=2).fit(make_dialogue_rows(5), seed=1, checkpoint=Checkpoint(folder))
    meta = json.loads((folder / CHECKPOINT_META).read_text())
    (folder / CHECKPOINT_META).write_text(json.dumps({**meta, "epoch": "2"}))  # a copy that mixes two epochs
    with pytest.raises(ValueError, match="incomplete .*epochs 1, 2"):
        tiny_backbone(tiny_qwen3_dir, epochs=2).fit(rows, seed=0, checkpoint=Checkpoint(folder, origin="of run x"))
    # checkpoint_every=0: nothing saved
    assert _fit_killed_after(tiny_qwen3_dir, rows, tmp_path / "none", 1, epochs=2, checkpoint_every=0) == []
    assert not (tmp_path / "none").exists()


def test_train_resume_continues_a_killed_fold_from_its_fold_runs_checkpoint(tiny_qwen3_dir, tmp_path, experiment_id,
                                                                           monkeypatch):
    """``train -P resume=true`` on a parent whose fold 0 was killed after epoch 1 of 2: the new fold run
    downloads the killed run's ``checkpoint/``, trains epoch 2 only and logs the OOF logits of an
    uninterrupted fold 0 bit for bit; once the fold is complete its checkpoints are deleted."""
    import mlflow

    from psydef import tracking
    from psydef.stages.config import PrepareConfig, TrainConfig
    from psydef.stages.prepare import run_prepare
    from psydef.stages.train import run_train
    from tests.fixtures.records import official_records

    data = tmp_path / "small"
    data.mkdir()
    (data / "train.json").write_text(json.dumps(official_records(6, 3)))
    prepared = run_prepare(PrepareConfig(data_dir=data, seed=5, n_splits=2))
    client = mlflow.MlflowClient()

    def train_fold_0(parent: str, **settings) -> None:
        run_train(TrainConfig(data_dir=data, seed=3, prepare_run_id=prepared.run_id, backbone="qwen3-8b-qlora",
                              model=str(tiny_qwen3_dir), fold=0, parent_run_id=parent, **settings,
                              hyper={"max_length": MAX_LENGTH, "epochs": 2, "learning_rate": 2e-3, "batch_size": 4,
                                     "grad_accum": 1, "eval_batch_size": 8, "eval_every": 0}),
                  experiment_id=experiment_id)

    def fold_0(parent: str):
        return tracking.fold_runs(parent)[0]

    straight, interrupted = (client.create_run(experiment_id).info.run_id for _ in range(2))
    train_fold_0(straight)
    log_checkpoint = tracking.log_checkpoint

    def killed_after_logging(folder, epoch):
        log_checkpoint(folder, epoch)
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(tracking, "log_checkpoint", killed_after_logging)
        with pytest.raises(Killed):
            train_fold_0(interrupted)
    killed = tracking.checkpointed_fold_run(interrupted, 0)
    assert killed.data.tags[tracking.CHECKPOINT_EPOCH] == "1" and killed.info.status == "FAILED"
    assert {a.path for a in client.list_artifacts(killed.info.run_id, tracking.CHECKPOINT_DIR)}

    train_fold_0(interrupted, resume=True)
    resumed = fold_0(interrupted)
    assert resumed.data.tags[tracking.RESUMED_FROM] == killed.info.run_id
    losses = [(m.step, m.value) for m in client.get_metric_history(resumed.info.run_id, "train_loss")]
    assert losses == [(m.step, m.value) for m in client.get_metric_history(fold_0(straight).info.run_id, "train_loss")]
    assert [step for step, _ in losses] == [1, 2]  # epoch 1 copied from the killed run, epoch 2 trained
    np.testing.assert_array_equal(tracking.load_npy(resumed.info.run_id, tracking.OOF_LOGITS),
                                  tracking.load_npy(fold_0(straight).info.run_id, tracking.OOF_LOGITS))
    for run_id in (killed.info.run_id, resumed.info.run_id, fold_0(straight).info.run_id):
        assert client.list_artifacts(run_id, tracking.CHECKPOINT_DIR) == []
        assert tracking.CHECKPOINT_EPOCH not in client.get_run(run_id).data.tags
