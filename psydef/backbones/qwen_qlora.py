"""The paper's system: Qwen3-8B with a 9-way classification head, fine-tuned with QLoRA.

The base model is loaded in 4-bit NF4 (double quantisation, bf16 compute on CUDA), LoRA adapters
(r=128, alpha=256, dropout 0.1) sit on every attention and MLP projection and the ``score`` head is
trained in full. The prompt (``psydef.core.prompt``) is fitted into 1,024 tokens by dropping the oldest
context turns, so the target utterance is never cut. Training: class-weighted cross-entropy with
label smoothing, AdamW, cosine schedule with warm-up, batch 2 x 8 accumulation, gradient clipping,
gradient checkpointing; the last epoch is kept. On CPU (tests) the same code runs in float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from psydef.backbones.base import Backbone, EpochCallback
from psydef.core.labels import N_LEVELS
from psydef.core.losses import class_weighted_loss
from psydef.core.prompt import build_prompt

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAD_TO_MULTIPLE_OF = 8


@dataclass(eq=False)
class QwenQLoRABackbone(Backbone):
    """QLoRA sequence classifier. The fields are the hyper-parameters returned by ``config()``;
    ``model`` is a Hugging Face id or a local folder holding the weights and the tokenizer."""

    model: str = "Qwen/Qwen3-8B"
    max_length: int = 1024
    max_turns: int = 30
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.1
    learning_rate: float = 1.2e-4
    epochs: int = 10
    batch_size: int = 2
    grad_accum: int = 8
    warmup_ratio: float = 0.08
    max_grad_norm: float = 0.3
    label_smoothing: float = 0.05
    load_in_4bit: bool = True
    gradient_checkpointing: bool = True
    eval_batch_size: int = 8

    name = "qwen3-8b-qlora"

    def __post_init__(self):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net = None  # the PeftModel, once fitted or loaded
        self.tokenizer = None

    def config(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # ----------------------------------------------------------------------------------- model
    def _load_tokenizer(self, source: str | Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(source)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _load_base(self):
        """The base classifier, in 4-bit NF4 with every other parameter (embeddings, norms, score
        head) in float32 as ``prepare_model_for_kbit_training`` leaves them; the same for training
        and for loading an adapter. The score head stays a plain Linear: transformers never
        quantises the last module. ``load_in_4bit=False`` loads everything in float32 (debugging)."""
        from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

        quantization = None
        if self.load_in_4bit:
            quantization = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        net = AutoModelForSequenceClassification.from_pretrained(
            self.model, num_labels=N_LEVELS, quantization_config=quantization, dtype=torch.float32,
            device_map={"": self.device})
        # The classifier reads the hidden state of the last non-pad token, so it must know the pad id.
        net.config.pad_token_id = self.tokenizer.pad_token_id
        if self.load_in_4bit:
            from bitsandbytes.nn import Linear4bit
            from peft import prepare_model_for_kbit_training

            net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=False)
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
        return get_peft_model(net, lora)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

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
        with self._autocast():
            out = self.net(input_ids=batch["input_ids"].to(self.device),
                           attention_mask=batch["attention_mask"].to(self.device), use_cache=False)
        return out.logits.float()

    # ------------------------------------------------------------------------------- training
    def fit(self, train: pd.DataFrame, *, seed: int, valid: pd.DataFrame | None = None,
            on_epoch: EpochCallback | None = None) -> "QwenQLoRABackbone":
        from transformers import get_cosine_schedule_with_warmup, set_seed

        set_seed(seed)  # the score head, the LoRA weights, dropout and the batch order
        self._load_tokenizer(self.model)
        self.net = self._build_trainable()
        labels = train["label"].astype(int).to_numpy()
        examples = [dict(features, labels=int(label)) for features, label in zip(self._encode(train), labels)]
        loader = torch.utils.data.DataLoader(
            examples, batch_size=self.batch_size, shuffle=True, collate_fn=self._collator(),
            generator=torch.Generator().manual_seed(seed))
        loss_fn = class_weighted_loss(labels, self.label_smoothing).to(self.device)
        params = [p for p in self.net.parameters() if p.requires_grad]
        # weight_decay=0: the Hugging Face Trainer default the reference system trained with.
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=0.0)
        steps_per_epoch = math.ceil(len(loader) / self.grad_accum)
        total_steps = self.epochs * steps_per_epoch
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, math.ceil(self.warmup_ratio * total_steps), total_steps)

        for epoch in range(1, self.epochs + 1):
            self.net.train()
            losses = []
            for step, batch in enumerate(tqdm(loader, desc=f"epoch {epoch}/{self.epochs}")):
                window_start = step - step % self.grad_accum
                window = min(self.grad_accum, len(loader) - window_start)  # the last one may be short
                loss = loss_fn(self._logits(batch), batch["labels"].to(self.device))
                (loss / window).backward()
                losses.append(loss.item())
                if step + 1 == window_start + window:
                    torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if on_epoch is not None:
                on_epoch(epoch, float(np.mean(losses)), None if valid is None else self.predict_logits(valid))
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
        """The LoRA adapter and the trained score head (peft ``modules_to_save``), and the tokenizer."""
        self.net.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def _load_weights(self, path: Path) -> None:
        from peft import PeftModel

        self._load_tokenizer(path)
        self.net = PeftModel.from_pretrained(self._load_base(), path)
        self.net.eval()
