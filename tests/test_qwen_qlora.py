"""The QLoRA backbone on CPU, through the same code as on GPU (4-bit NF4 load, LoRA, training loop,
adapter save/load), with a tiny random Qwen3 and the real Qwen3 tokenizer."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open

from psydef.backbones import backbone_class, load_adapter, load_adapters
from psydef.backbones.qwen_qlora import LORA_TARGETS, LengthGroupedBatches, QwenQLoRABackbone
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


def test_length_grouped_batches_cover_every_row_once_and_pad_less():
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 1000, size=500)
    batches = LengthGroupedBatches(lengths, 4, torch.Generator().manual_seed(0))
    epochs = [list(batches), list(batches)]
    for epoch in epochs:
        assert len(epoch) == len(batches) == 125
        assert sorted(i for batch in epoch for i in batch) == list(range(500))
        assert int(np.argmax(lengths)) in epoch[0]
    assert epochs[0] != epochs[1]

    def padded_fraction(epoch):
        return 1 - lengths.sum() / sum(len(b) * lengths[b].max() for b in epoch)

    shuffled = np.array_split(rng.permutation(500), 125)
    assert padded_fraction(epochs[0]) < padded_fraction(shuffled) / 5


def test_eval_every_and_the_padded_fraction(tiny_qwen3_dir, make_dialogue_rows, capsys):
    rows = make_dialogue_rows(6)
    reports = []
    backbone = tiny_backbone(tiny_qwen3_dir, epochs=3, eval_every=2).fit(
        rows, seed=0, valid=rows, on_epoch=lambda *report: reports.append(report))
    assert [(epoch, logits is not None) for epoch, _, logits in reports] == [(1, False), (2, True), (3, True)]
    assert [s["epoch"] for s in backbone.epoch_stats] == [1, 2, 3]
    for stats in backbone.epoch_stats:
        assert 0 <= stats["padded_fraction"] < 1 and stats["examples"] == 6 and stats["tokens"] > 6 * 500
    assert capsys.readouterr().out.count("of the tokens fed were padding") == 3
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
