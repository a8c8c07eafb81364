"""The paper's system: Qwen3-8B with a 9-way classification head, fine-tuned with QLoRA.

The base model is loaded in 4-bit NF4 (double quantisation) with its other weights (embeddings, norms)
in the compute dtype: bfloat16 on CUDA, float32 on CPU (``compute_dtype``). LoRA adapters (r=128,
alpha=256, dropout 0.1) sit on every attention and MLP projection and the ``score`` head is trained in
full; both train in float32 and are stored (and predicted with) in the compute dtype. The prompt
(``psydef.core.prompt``) is fitted into 1,024 tokens by dropping the oldest context turns, so the target
utterance is never cut. Training: class-weighted cross-entropy with label smoothing, AdamW, cosine
schedule with warm-up, batch 2 x 8 accumulation over length-grouped batches, gradient clipping,
gradient checkpointing, SDPA attention (FlashAttention 2 when ``flash_attn`` is installed on CUDA);
the last epoch is kept. On CPU (tests) the same code runs in float32.

Several fold adapters of one base (an ensemble) load onto ONE base model as named peft adapters, each
with its own ``score`` head, switched per prediction (:meth:`QwenQLoRABackbone.load_many`).
"""
from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from psydef.backbones.base import Backbone, EpochCallback
from psydef.core.labels import N_LEVELS
from psydef.core.losses import class_weighted_loss
from psydef.core.prompt import build_prompt
from psydef.settings import check_fields, setting

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAD_TO_MULTIPLE_OF = 8
# Length grouping (as Hugging Face's ``group_by_length``): a shuffled window of this many batches is
# sorted by length and cut into batches, so a batch holds prompts of similar token length.
GROUP_WINDOW_BATCHES = 50
# No float16: its autocast would need loss scaling, which the training loop does not do.
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
COMPUTE_DTYPES = ("auto", *DTYPES)
ATTENTION = ("auto", "sdpa", "flash_attention_2", "eager")
# No tokenizer holds the DMRS guide and instruction (about 2,700 characters, 380 words) in fewer tokens;
# whether a given max_length fits them is known once the tokenizer is loaded (build_prompt).
MIN_PROMPT_TOKENS = 256
TRAINED_ADAPTER = "default"  # peft's name for the adapter get_peft_model creates


class LengthGroupedBatches:
    """A batch sampler: each epoch, a random permutation cut into windows of
    ``GROUP_WINDOW_BATCHES * batch_size`` rows, each window sorted by length (longest first) and cut
    into batches; the batches are then shuffled, except that the one holding the longest row comes
    first (running out of memory shows at once)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, generator: torch.Generator):
        self.lengths, self.batch_size, self.generator = np.asarray(lengths), batch_size, generator

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).numpy()
        window = GROUP_WINDOW_BATCHES * self.batch_size
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        shuffled = torch.randperm(len(batches), generator=self.generator).tolist()
        batches = [batches[i] for i in shuffled]
        longest = next(b for b, batch in enumerate(batches) if int(np.argmax(self.lengths)) in batch)
        batches.insert(0, batches.pop(longest))
        return iter(batches)


@dataclass(eq=False)
class QwenQLoRABackbone(Backbone):
    """QLoRA sequence classifier. The fields are the hyper-parameters returned by ``config()``;
    ``model`` is a Hugging Face id or a local folder holding the weights and the tokenizer."""

    model: str = setting("Qwen/Qwen3-8B", "Hugging Face id or local folder of the base model and its tokenizer.")
    max_length: int = setting(1024, "Prompt tokens; the oldest context turns are dropped to fit (the DMRS guide and "
                                    "instruction alone take about 560 Qwen3 tokens).", ge=MIN_PROMPT_TOKENS)
    max_turns: int = setting(30, "Most turns before the target shown as context.", ge=0)
    lora_r: int = setting(128, "LoRA rank.", ge=1)
    lora_alpha: int = setting(256, "LoRA scaling numerator (the update is scaled by alpha / r).", ge=1)
    lora_dropout: float = setting(0.1, "Dropout on the LoRA inputs.", ge=0, lt=1)
    learning_rate: float = setting(1.2e-4, "AdamW peak learning rate.", gt=0)
    epochs: int = setting(10, "Training epochs (the last one is kept).", ge=1)
    batch_size: int = setting(2, "Training rows per forward pass.", ge=1)
    grad_accum: int = setting(8, "Forward passes per optimiser step.", ge=1)
    warmup_ratio: float = setting(0.08, "Fraction of the optimiser steps spent warming up.", ge=0, le=1)
    max_grad_norm: float = setting(0.3, "Gradient clipping norm.", gt=0)
    label_smoothing: float = setting(0.05, "Label smoothing of the class-weighted cross-entropy.", ge=0, lt=1)
    load_in_4bit: bool = setting(True, "Load the base in 4-bit NF4 (QLoRA); false: in the compute dtype.")
    gradient_checkpointing: bool = setting(True, "Recompute activations in the backward pass (less memory).")
    eval_batch_size: int = setting(8, "Rows per forward pass when predicting.", ge=1)
    compute_dtype: str = setting("auto", "auto: bfloat16 on CUDA, float32 on CPU. The 4-bit compute dtype, the dtype "
                                         "of the other frozen weights (embeddings, norms), of autocast, and of the "
                                         "stored LoRA weights and score head.",
                                 choices="psydef.backbones.qwen_qlora:COMPUTE_DTYPES")
    attn_implementation: str = setting("auto", "auto: FlashAttention 2 on CUDA when the flash_attn package is "
                                               "installed, else PyTorch SDPA.",
                                       choices="psydef.backbones.qwen_qlora:ATTENTION")
    group_by_length: bool = setting(True, "Batch training prompts of similar token length together.")
    eval_every: int = setting(1, "Validation logits for on_epoch every this many epochs and at the last; 0: never.",
                              ge=0)

    name = "qwen3-8b-qlora"

    def __post_init__(self):
        check_fields(self, lambda field_name: f"{self.name} {field_name}")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net = None  # the PeftModel, once fitted or loaded (shared by the adapters of load_many)
        self.adapter_name = TRAINED_ADAPTER  # this backbone's adapter in self.net
        self.tokenizer = None
        self.epoch_stats: list[dict] = []  # filled by fit: one dict per epoch (see fit)

    def config(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def dtype(self) -> torch.dtype:
        """The resolved compute dtype."""
        if self.compute_dtype == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        return DTYPES[self.compute_dtype]

    @property
    def attention(self) -> str:
        """The resolved attention implementation."""
        if self.attn_implementation != "auto":
            return self.attn_implementation
        flash = (self.device.type == "cuda" and self.dtype != torch.float32
                 and importlib.util.find_spec("flash_attn") is not None)
        return "flash_attention_2" if flash else "sdpa"

    def _base_key(self) -> tuple:
        """What the base model depends on: adapters with the same key can share one base."""
        return self.model, self.load_in_4bit, self.dtype, self.attention

    # ----------------------------------------------------------------------------------- model
    def _load_tokenizer(self, source: str | Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(source)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _load_base(self):
        """The frozen base classifier, in 4-bit NF4 with every other parameter (embeddings, norms,
        the untrained score head) in the compute dtype; the same for training and for loading
        adapters. The score head stays a plain Linear: transformers never quantises the last module.
        ``load_in_4bit=False`` loads everything in the compute dtype (debugging)."""
        from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

        quantization = None
        if self.load_in_4bit:
            quantization = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=self.dtype)
        net = AutoModelForSequenceClassification.from_pretrained(
            self.model, num_labels=N_LEVELS, quantization_config=quantization, dtype=self.dtype,
            device_map={"": self.device}, attn_implementation=self.attention)
        # The classifier reads the hidden state of the last non-pad token, so it must know the pad id.
        net.config.pad_token_id = self.tokenizer.pad_token_id
        # Frozen as peft's prepare_model_for_kbit_training does, without its cast of every
        # non-quantised weight to float32 (2.5 GB of embeddings for Qwen3-8B): bf16 frozen weights
        # are what the Hugging Face QLoRA recipes train with; the trainable ones are float32.
        net.requires_grad_(False)
        if self.load_in_4bit:
            from bitsandbytes.nn import Linear4bit

            # bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a Linear4bit's weight in place on
            # its first eval-mode forward (e.g. validation); later training gradients through it are
            # silently wrong. Turning the repacking off is harmless elsewhere (GPU, other CPUs).
            for module in net.modules():
                if isinstance(module, Linear4bit):
                    module.support_avx512bf16_for_cpu = False
        return net

    def _build_trainable(self):
        from peft import LoraConfig, TaskType, get_peft_model

        net = self._load_base()
        if self.gradient_checkpointing:
            # Non-reentrant checkpointing also gets gradients to the LoRA weights of frozen layers.
            net.activation_checkpointing_enable({"use_reentrant": False})
        lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=self.lora_r, lora_alpha=self.lora_alpha,
                          lora_dropout=self.lora_dropout, target_modules=LORA_TARGETS,
                          modules_to_save=["score"])
        net = get_peft_model(net, lora)  # LoRA weights in float32 (peft's autocast_adapter_dtype)
        _cast_adapter(net, TRAINED_ADAPTER, torch.float32)  # and the score head's trainable copy
        return net

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    # ------------------------------------------------------------------------------------ data
    def _encode(self, rows: pd.DataFrame) -> list[dict]:
        prompts = [build_prompt(dialogue, max_turns=self.max_turns, tokenizer=self.tokenizer,
                                max_length=self.max_length) for dialogue in rows["dialogue"]]
        # build_prompt already fits max_length; truncation is only a guard.
        encoded = self.tokenizer(prompts, truncation=True, max_length=self.max_length)
        return [{"input_ids": ids, "attention_mask": mask}
                for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]

    def _collator(self):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer, pad_to_multiple_of=PAD_TO_MULTIPLE_OF)

    def _logits(self, batch) -> torch.Tensor:
        if self.net.active_adapter != self.adapter_name:  # another fold's adapter on the shared base
            self.net.set_adapter(self.adapter_name, inference_mode=True)
        with self._autocast():
            out = self.net(input_ids=batch["input_ids"].to(self.device),
                           attention_mask=batch["attention_mask"].to(self.device), use_cache=False)
        return out.logits.float()

    # ------------------------------------------------------------------------------- training
    def fit(self, train: pd.DataFrame, *, seed: int, valid: pd.DataFrame | None = None,
            on_epoch: EpochCallback | None = None) -> "QwenQLoRABackbone":
        """Train a fresh adapter. Per epoch, ``epoch_stats`` gets ``epoch``, ``loss``, ``seconds``,
        ``examples``, ``tokens`` (non-pad), ``padded_fraction`` (pad tokens / all tokens fed) and the
        fraction is printed. At the end the trainable weights go to the storage (compute) dtype:
        the logits predicted after ``fit`` are those of the saved adapter."""
        from transformers import get_cosine_schedule_with_warmup, set_seed

        set_seed(seed)  # the score head, the LoRA weights, dropout and the batch order
        self._load_tokenizer(self.model)
        self.net = self._build_trainable()
        self.adapter_name = TRAINED_ADAPTER
        labels = train["label"].astype(int).to_numpy()
        examples = [dict(features, labels=int(label)) for features, label in zip(self._encode(train), labels)]
        generator = torch.Generator().manual_seed(seed)
        if self.group_by_length:
            batching = {"batch_sampler": LengthGroupedBatches([len(e["input_ids"]) for e in examples],
                                                              self.batch_size, generator)}
        else:
            batching = {"batch_size": self.batch_size, "shuffle": True, "generator": generator}
        loader = torch.utils.data.DataLoader(examples, collate_fn=self._collator(), **batching)
        loss_fn = class_weighted_loss(labels, self.label_smoothing).to(self.device)
        params = [p for p in self.net.parameters() if p.requires_grad]
        # weight_decay=0: the Hugging Face Trainer default the reference system trained with.
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=0.0)
        steps_per_epoch = math.ceil(len(loader) / self.grad_accum)
        total_steps = self.epochs * steps_per_epoch
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, math.ceil(self.warmup_ratio * total_steps), total_steps)

        self.epoch_stats = []
        for epoch in range(1, self.epochs + 1):
            self.net.train()
            losses, tokens, fed = [], 0, 0
            started = time.perf_counter()
            for step, batch in enumerate(tqdm(loader, desc=f"epoch {epoch}/{self.epochs}")):
                window_start = step - step % self.grad_accum
                window = min(self.grad_accum, len(loader) - window_start)  # the last one may be short
                loss = loss_fn(self._logits(batch), batch["labels"].to(self.device))
                (loss / window).backward()
                losses.append(loss.item())
                tokens += int(batch["attention_mask"].sum())
                fed += batch["attention_mask"].numel()
                if step + 1 == window_start + window:
                    torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            stats = {"epoch": epoch, "loss": float(np.mean(losses)), "seconds": time.perf_counter() - started,
                     "examples": len(examples), "tokens": tokens, "padded_fraction": 1 - tokens / fed}
            self.epoch_stats.append(stats)
            tqdm.write(f"epoch {epoch}/{self.epochs}: {stats['padded_fraction']:.1%} of the tokens fed were padding "
                       f"({'length-grouped' if self.group_by_length else 'shuffled'} batches of {self.batch_size})")
            if on_epoch is not None:
                evaluate = (valid is not None and self.eval_every > 0
                            and (epoch % self.eval_every == 0 or epoch == self.epochs))
                on_epoch(epoch, stats["loss"], self.predict_logits(valid) if evaluate else None)
        _cast_adapter(self.net, TRAINED_ADAPTER, self.dtype)
        return self

    # ------------------------------------------------------------------------------ inference
    def predict_logits(self, rows: pd.DataFrame) -> np.ndarray:
        if self.net is None:
            raise RuntimeError("fit or load the backbone before predicting")
        encoded = self._encode(rows)
        collate = self._collator()
        # Longest first: batches of similar length pad little, and running out of memory shows at once.
        order = np.argsort([-len(e["input_ids"]) for e in encoded], kind="stable")
        logits = np.empty((len(encoded), N_LEVELS), dtype=np.float32)
        self.net.eval()
        with torch.no_grad():
            for start in tqdm(range(0, len(order), self.eval_batch_size), desc="predict"):
                index = order[start:start + self.eval_batch_size]
                logits[index] = self._logits(collate([encoded[i] for i in index])).cpu().numpy()
        return logits

    # --------------------------------------------------------------------------------- storage
    def _save_weights(self, path: Path) -> None:
        """The LoRA adapter and the trained score head (peft ``modules_to_save``) in the compute dtype,
        and the tokenizer."""
        if self.adapter_name != TRAINED_ADAPTER:
            raise RuntimeError("only a fitted backbone is saved; an adapter loaded from a folder is that folder")
        self.net.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def _load_weights(self, path: Path) -> None:
        self._attach_to_one_base([self], [path])

    @classmethod
    def load_many(cls, folders: Sequence[Path], configs: Sequence[dict]) -> list["QwenQLoRABackbone"]:
        """Adapters that agree on the base (model, 4-bit, compute dtype, attention) are attached by
        name to ONE base model; each keeps its own LoRA weights and score head, and its own
        hyper-parameters for encoding (max_length, max_turns, eval_batch_size)."""
        backbones = [cls(**config) for config in configs]
        groups: dict[tuple, list[int]] = {}
        for i, backbone in enumerate(backbones):
            groups.setdefault(backbone._base_key(), []).append(i)
        for index in groups.values():
            cls._attach_to_one_base([backbones[i] for i in index], [Path(folders[i]) for i in index])
        return backbones

    @staticmethod
    def _attach_to_one_base(backbones: Sequence["QwenQLoRABackbone"], folders: Sequence[Path]) -> None:
        """Load the base of ``backbones[0]`` once and every folder's adapter onto it as ``adapter_<i>``,
        in the compute dtype. The tokenizer comes from the first folder: every fold adapter of a base
        saved the tokenizer of that same base."""
        from peft import PeftModel

        first = backbones[0]
        first._load_tokenizer(folders[0])
        net = first._load_base()
        for i, (backbone, folder) in enumerate(zip(backbones, folders, strict=True)):
            name = f"adapter_{i}"
            # autocast_adapter_dtype=False: keep the stored dtype; _cast_adapter then sets the compute dtype.
            if i == 0:
                net = PeftModel.from_pretrained(net, folder, adapter_name=name, autocast_adapter_dtype=False)
            else:
                net.load_adapter(folder, adapter_name=name, autocast_adapter_dtype=False)
            _cast_adapter(net, name, first.dtype)
            backbone.net, backbone.tokenizer, backbone.adapter_name = net, first.tokenizer, name
        net.eval()


def _cast_adapter(net, adapter_name: str, dtype: torch.dtype) -> None:
    """Cast one peft adapter's weights (its LoRA matrices and its copy of the score head) to ``dtype``."""
    for name, param in net.named_parameters():
        if f".{adapter_name}." in name:
            param.data = param.data.to(dtype)
