"""Backbones by name. Heavy imports (transformers, peft, bitsandbytes) happen only when one is used."""
from __future__ import annotations

import importlib

from psydef.backbones.base import Backbone, load_adapter

# name -> "module:Class"; the modules import torch/transformers lazily through this table.
BACKBONES = {
    "minilm": "psydef.backbones.minilm:MiniLMBackbone",
    "qwen3-8b-qlora": "psydef.backbones.qwen_qlora:QwenQLoRABackbone",
}
AUTO = "auto"
CPU_DEFAULT = "minilm"  # balanced logistic regression on TF-IDF + frozen MiniLM views (bench/select.py chose it)
GPU_DEFAULT = "qwen3-8b-qlora"


def resolve_backbone_name(name: str) -> str:
    """``auto`` is the QLoRA LLM when CUDA is available, else the CPU default."""
    if name == AUTO:
        import torch

        return GPU_DEFAULT if torch.cuda.is_available() else CPU_DEFAULT
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}: choose one of {', '.join([AUTO, *BACKBONES])}")
    return name


def backbone_class(name: str) -> type[Backbone]:
    module, cls = BACKBONES[resolve_backbone_name(name)].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["AUTO", "BACKBONES", "CPU_DEFAULT", "GPU_DEFAULT", "Backbone", "backbone_class", "load_adapter", "resolve_backbone_name"]
