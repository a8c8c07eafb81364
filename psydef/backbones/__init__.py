"""Backbones by name. Heavy imports (transformers, peft, bitsandbytes) happen only when one is used."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from psydef.backbones.base import Backbone

# name -> "module:Class"; the modules import torch/transformers lazily through this table.
BACKBONES = {
    "minilm": "psydef.backbones.minilm:MiniLMBackbone",
    "qwen3-8b-qlora": "psydef.backbones.qwen_qlora:QwenQLoRABackbone",
}
AUTO = "auto"
CHOICES = (AUTO, *BACKBONES)  # what --backbone accepts


def resolve_backbone_name(name: str) -> str:
    """``auto`` is the QLoRA LLM when CUDA is available, else the CPU default ``minilm``."""
    if name == AUTO:
        import torch

        return "qwen3-8b-qlora" if torch.cuda.is_available() else "minilm"
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}: choose one of {', '.join([AUTO, *BACKBONES])}")
    return name


def backbone_class(name: str) -> type[Backbone]:
    module, cls = BACKBONES[resolve_backbone_name(name)].split(":")
    return getattr(importlib.import_module(module), cls)


def __getattr__(name: str):
    """``Backbone`` and ``load_adapter`` from base.py when first used: the table above is read by
    ``psydef train --help``, which should not load numpy and pandas for it."""
    if name in ("Backbone", "load_adapter"):
        return getattr(importlib.import_module("psydef.backbones.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AUTO", "BACKBONES", "CHOICES", "Backbone", "backbone_class", "load_adapter", "resolve_backbone_name"]
