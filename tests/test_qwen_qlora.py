"""The QLoRA backbone on CPU, through the same code as on GPU (4-bit NF4 load, LoRA, training loop,
adapter save/load), with a tiny random Qwen3 and the real Qwen3 tokenizer."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from psydef.backbones import backbone_class, load_adapter
from psydef.backbones.qwen_qlora import LORA_TARGETS, QwenQLoRABackbone
from psydef.core.losses import class_weighted_loss

bnb = pytest.importorskip("bitsandbytes")

MAX_LENGTH = 640  # the DMRS guide and instruction alone take about 560 tokens
N_ROWS, EPOCHS = 16, 2


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
    """Loading the real Qwen3 tokenizer takes about 2 s; every fit would load it again from the
    same folder. Each folder is still loaded once through the backbone's own code."""
    from transformers import AutoTokenizer

    load, loaded = AutoTokenizer.from_pretrained, {}

    def load_once(source, *args, **kwargs):
        if str(source) not in loaded:
            loaded[str(source)] = load(source, *args, **kwargs)
        return loaded[str(source)]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AutoTokenizer, "from_pretrained", load_once)
        yield


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
                          attn_implementation="auto", group_by_length=True, eval_every=1)


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
