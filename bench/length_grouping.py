"""Padded fraction of the QLoRA backbone's training batches: shuffled batches, psydef's former
hand-written length grouping, and transformers' ``LengthGroupedSampler`` (what the backbone uses), on
the real prompts (train.json plus its augmented variants, the real Qwen3 tokenizer, the backbone's
prompt and ``max_length``); the shuffled and transformers batches through the backbone's own training
loader and collator, the former grouping padded as the collator pads (to a multiple of 8).

    python bench/length_grouping.py --data ../shared/data/psydefconv/train.json [--batch-sizes 2 8] [--epochs 5]

Prints one line per batch size and batching: the mean padded fraction over ``--epochs`` epochs (pad
tokens / all tokens fed) and its range.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_profile import tokenizer_dir  # noqa: E402
from psydef.backbones.qwen_qlora import PAD_TO_MULTIPLE_OF, QwenQLoRABackbone  # noqa: E402
from psydef.core.augment import augment_minority  # noqa: E402
from psydef.core.data import read_split  # noqa: E402

GROUP_WINDOW_BATCHES = 50  # the former sampler's window, as transformers' mega-batch of 50 batches


def handwritten_batches(lengths: np.ndarray, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """psydef's former sampler: a permutation cut into windows of 50 batches, each sorted by length
    and cut into batches; the batches shuffled, the one holding the longest row first."""
    order = torch.randperm(len(lengths), generator=generator).numpy()
    window = GROUP_WINDOW_BATCHES * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    longest = next(b for b, batch in enumerate(batches) if int(np.argmax(lengths)) in batch)
    batches.insert(0, batches.pop(longest))
    return batches


def padded_fraction(lengths: np.ndarray, batches: list[list[int]]) -> float:
    """Pad tokens / all tokens fed, each batch padded as the collator pads."""
    fed = sum(len(b) * math.ceil(lengths[b].max() / PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF for b in batches)
    return 1 - lengths.sum() / fed


def loader_padded_fraction(backbone: QwenQLoRABackbone, examples: list[dict], generator: torch.Generator) -> float:
    """One epoch of the backbone's own training loader: pad tokens / all tokens it feeds."""
    masks = [batch["attention_mask"] for batch in backbone._train_loader(examples, generator)]
    return 1 - sum(int(mask.sum()) for mask in masks) / sum(mask.numel() for mask in masks)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="train.json")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--epochs", type=int, default=5, help="epochs (permutations) per batching")
    args = parser.parse_args(argv)

    table = read_split(args.data, labelled=True)
    rows = pd.concat([table, augment_minority(table)], ignore_index=True)
    backbone = QwenQLoRABackbone()
    backbone._load_tokenizer(tokenizer_dir())
    examples = [dict(features, labels=0) for features in backbone._encode(rows)]
    lengths = np.array([len(e["input_ids"]) for e in examples])
    print(f"{len(lengths)} prompts of {lengths.min()}..{lengths.max()} tokens (max_length {backbone.max_length})")
    for batch_size in args.batch_sizes:
        generator = torch.Generator().manual_seed(0)
        batchings = {"hand-written grouping (former)": lambda: padded_fraction(
            lengths, handwritten_batches(lengths, batch_size, generator))}
        for grouped, name in [(False, "shuffled"), (True, "transformers LengthGroupedSampler")]:
            loader_backbone = QwenQLoRABackbone(batch_size=batch_size, group_by_length=grouped)
            loader_backbone.tokenizer = backbone.tokenizer
            batchings[f"{name} (the backbone's loader)"] = (
                lambda b=loader_backbone: loader_padded_fraction(b, examples, generator))
        for name, epoch in batchings.items():
            fractions = [epoch() for _ in range(args.epochs)]
            print(f"batch {batch_size}, {name}: {np.mean(fractions):.2%} of the tokens fed are padding "
                  f"({min(fractions):.2%}..{max(fractions):.2%} over {args.epochs} epochs)")


if __name__ == "__main__":
    main()
