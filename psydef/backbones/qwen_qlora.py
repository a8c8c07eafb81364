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

The adapter records the base model's revision (:func:`base_revision`: the Hub commit, or a local
folder's content digest); loading it loads that Hub commit, or refuses a local folder whose weights
changed. With a :class:`~psydef.backbones.base.Checkpoint`, ``fit`` saves its training state every
``checkpoint_every`` epochs and resumes from a saved one.

Several fold adapters of one base (an ensemble) load onto ONE base model as named peft adapters, each
with its own ``score`` head, switched per prediction (:meth:`QwenQLoRABackbone.load_many`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from psydef.backbones.base import Backbone, Checkpoint, EpochCallback
from psydef.core.labels import N_LEVELS
from psydef.core.losses import class_weighted_loss
from psydef.core.prompt import build_prompt
from psydef.settings import check_fields, setting

logger = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAD_TO_MULTIPLE_OF = 8
# No float16: its autocast would need loss scaling, which the training loop does not do.
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
COMPUTE_DTYPES = ("auto", *DTYPES)
ATTENTION = ("auto", "sdpa", "flash_attention_2", "eager")
# No tokenizer holds the DMRS guide and instruction (about 2,700 characters, 380 words) in fewer tokens;
# whether a given max_length fits them is known once the tokenizer is loaded (build_prompt).
MIN_PROMPT_TOKENS = 256
TRAINED_ADAPTER = "default"  # peft's name for the adapter get_peft_model creates
BASE_REVISION_FILE = "base_model.json"  # in the adapter folder: the base model and its resolved revision
# The training state fit saves (checkpoint_every) and resumes from, each file stamped with its epoch
CHECKPOINT_WEIGHTS, CHECKPOINT_STATE, CHECKPOINT_META = "trainable.safetensors", "training_state.pt", "checkpoint.json"
# What a checkpoint's fit must share with the fit resuming it: every hyper-parameter but these
NOT_TRAINING = ("eval_batch_size", "eval_every", "checkpoint_every")
# A local folder's revision reads these parts of each weight file (see folder_revision)
SAMPLE_EDGE_BYTES, SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 1 << 20, 16, 1 << 16


def folder_revision(folder: Path) -> str:
    """A local model folder's revision: sha256 over its config.json and, for each weight file
    (``*.safetensors``, ``*.bin`` and their ``*.index.json``), its name, size, first and last MiB and
    16 blocks of 64 KiB spread over it. That identifies the weights without reading all of them
    (16 GB for Qwen3-8B, at every load): another checkpoint of the same architecture (a fine-tune,
    other random weights) changes every tensor, so it changes these samples, and the safetensors
    header (names, dtypes, shapes, offsets) lies in the first MiB."""
    digest = hashlib.sha256()
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and (
        p.name == "config.json" or p.name.endswith((".safetensors", ".bin", ".index.json"))))
    for name in names:
        path = folder / name
        size = path.stat().st_size
        digest.update(f"{name}\0{size}\0".encode())
        with path.open("rb") as handle:
            if size <= 2 * SAMPLE_EDGE_BYTES + SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES:
                digest.update(handle.read())
                continue
            inner = size - 2 * SAMPLE_EDGE_BYTES
            spread = [SAMPLE_EDGE_BYTES + i * inner // SAMPLE_BLOCKS for i in range(SAMPLE_BLOCKS)]
            for offset, length in [(0, SAMPLE_EDGE_BYTES), *[(o, SAMPLE_BLOCK_BYTES) for o in spread],
                                   (size - SAMPLE_EDGE_BYTES, SAMPLE_EDGE_BYTES)]:
                handle.seek(offset)
                digest.update(handle.read(length))
    return "sha256:" + digest.hexdigest()[:16]


def base_revision(model: str, revision: str | None = None) -> str:
    """The revision a load of ``model`` gets: a local folder's :func:`folder_revision`, or the Hub
    commit that ``revision`` (a branch, tag or commit; None: the default branch) points to, asked of
    the Hub or, offline, read from the local Hub cache."""
    if Path(model).is_dir():
        return folder_revision(Path(model))
    from huggingface_hub import resolve_revision

    try:
        return resolve_revision(model, revision=revision).resolved
    except Exception as err:  # huggingface_hub's errors: not found, offline and not cached, ...
        raise ValueError(f"base model {model}: revision {revision or 'main'} cannot be resolved: "
                         f"{str(err).splitlines()[0]}") from err


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
    revision: str | None = setting(None, "The Hub revision (branch, tag or commit) of model to train on; none: the "
                                         "default branch. For a local folder: the sha256:... revision its weights "
                                         "must have.")
    checkpoint_every: int = setting(1, "Save the training state every this many epochs (not after the last), when "
                                       "fit is given a checkpoint folder; 0: never.", ge=0)

    name = "qwen3-8b-qlora"

    def __post_init__(self):
        check_fields(self, lambda field_name: f"{self.name} {field_name}")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net = None  # the PeftModel, once fitted or loaded (shared by the adapters of load_many)
        self.adapter_name = TRAINED_ADAPTER  # this backbone's adapter in self.net
        self.tokenizer = None
        self.base_revision: str | None = None  # the base model's revision (base_revision), once loaded
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
        """What the base model depends on, but its revision: adapters with the same key and the same
        recorded revision can share one base."""
        return self.model, self.load_in_4bit, self.dtype, self.attention

    def _resolve_base(self, wanted: str | None, whose: str) -> None:
        """Set ``base_revision`` to the revision of the base a load gets: the Hub commit that ``wanted``
        (a revision; None: the default branch) points to, or the local folder's, which must equal
        ``wanted`` when given (``whose`` says where ``wanted`` comes from, for the error)."""
        found = base_revision(self.model, wanted)
        if Path(self.model).is_dir() and wanted is not None and found != wanted:
            raise ValueError(f"base model {self.model}: its weights are revision {found}, but {whose} revision "
                             f"{wanted}: point model at those weights (or retrain)")
        self.base_revision = found

    def _hub_revision(self) -> str | None:
        """What ``from_pretrained`` is given: the resolved commit for a Hub model, None for a folder."""
        return None if Path(self.model).is_dir() else self.base_revision

    # ----------------------------------------------------------------------------------- model
    def _load_tokenizer(self, source: str | Path, revision: str | None = None) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _load_base(self):
        """The frozen base classifier, in 4-bit NF4 with every other parameter (embeddings, norms,
        the untrained score head) in the compute dtype; the same for training and for loading
        adapters. The score head stays a plain Linear: transformers never quantises the last module.
        ``load_in_4bit=False`` loads everything in the compute dtype (debugging). The revision is
        ``base_revision``, resolved before."""
        from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

        quantization = None
        if self.load_in_4bit:
            quantization = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=self.dtype)
        net = AutoModelForSequenceClassification.from_pretrained(
            self.model, revision=self._hub_revision(), num_labels=N_LEVELS, quantization_config=quantization,
            dtype=self.dtype, device_map={"": self.device}, attn_implementation=self.attention)
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
    def _train_loader(self, examples: list[dict], generator: torch.Generator):
        """Length-grouped batches (transformers' ``LengthGroupedSampler``, as the Trainer's
        ``group_by_length``: a shuffled mega-batch of 50 batches sorted by length, the longest batch
        first), or shuffled ones."""
        from transformers.trainer_pt_utils import LengthGroupedSampler

        if self.group_by_length:
            sampler = LengthGroupedSampler(self.batch_size, lengths=[len(e["input_ids"]) for e in examples],
                                           generator=generator)
            batching = {"batch_size": self.batch_size, "sampler": sampler}
        else:
            batching = {"batch_size": self.batch_size, "shuffle": True, "generator": generator}
        return torch.utils.data.DataLoader(examples, collate_fn=self._collator(), **batching)

    def fit(self, train: pd.DataFrame, *, seed: int, valid: pd.DataFrame | None = None,
            on_epoch: EpochCallback | None = None, checkpoint: Checkpoint | None = None) -> "QwenQLoRABackbone":
        """Train a fresh adapter, or continue the fit whose state ``checkpoint`` holds. Per epoch,
        ``epoch_stats`` gets ``epoch``, ``loss``, ``seconds``, ``examples``, ``tokens`` (non-pad),
        ``padded_fraction`` (pad tokens / all tokens fed) and the fraction is printed. At the end the
        trainable weights go to the storage (compute) dtype: the logits predicted after ``fit`` are
        those of the saved adapter."""
        from transformers import get_cosine_schedule_with_warmup, set_seed

        set_seed(seed)  # the score head, the LoRA weights, dropout and the batch order
        self._resolve_base(self.revision, "revision= pins")
        self._load_tokenizer(self.model, self._hub_revision())
        self.net = self._build_trainable()
        self.adapter_name = TRAINED_ADAPTER
        labels = train["label"].astype(int).to_numpy()
        examples = [dict(features, labels=int(label)) for features, label in zip(self._encode(train), labels)]
        generator = torch.Generator().manual_seed(seed)
        loader = self._train_loader(examples, generator)
        loss_fn = class_weighted_loss(labels, self.label_smoothing).to(self.device)
        params = [p for p in self.net.parameters() if p.requires_grad]
        # weight_decay=0: the Hugging Face Trainer default the reference system trained with.
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=0.0)
        steps_per_epoch = math.ceil(len(loader) / self.grad_accum)
        total_steps = self.epochs * steps_per_epoch
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, math.ceil(self.warmup_ratio * total_steps), total_steps)
        identity = {"seed": seed, "base revision": self.base_revision, "training rows": _examples_digest(examples),
                    **{k: v for k, v in self.config().items() if k not in NOT_TRAINING}}
        state = _TrainingState(self.net, optimizer, scheduler, generator, identity)

        self.epoch_stats = []
        if checkpoint is not None and state.saved_in(checkpoint.folder):
            self.epoch_stats = state.restore(checkpoint.folder, checkpoint.origin)
            logger.info(f"resuming at epoch {len(self.epoch_stats) + 1}/{self.epochs} from the checkpoint "
                        f"{checkpoint.origin or checkpoint.folder}")
        for epoch in range(len(self.epoch_stats) + 1, self.epochs + 1):
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
            logger.info(f"epoch {epoch}/{self.epochs}: {stats['padded_fraction']:.1%} of the tokens fed were padding "
                        f"({'length-grouped' if self.group_by_length else 'shuffled'} batches of {self.batch_size})")
            if on_epoch is not None:
                evaluate = (valid is not None and self.eval_every > 0
                            and (epoch % self.eval_every == 0 or epoch == self.epochs))
                on_epoch(epoch, stats["loss"], self.predict_logits(valid) if evaluate else None)
            # after on_epoch: a resumed fit's reports continue those of the epochs its checkpoint holds
            if (checkpoint is not None and self.checkpoint_every > 0 and epoch < self.epochs
                    and epoch % self.checkpoint_every == 0):
                state.save(checkpoint.folder, self.epoch_stats)
                checkpoint.on_save(epoch)
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
        the tokenizer, and the base model's revision (``BASE_REVISION_FILE``)."""
        if self.adapter_name != TRAINED_ADAPTER:
            raise RuntimeError("only a fitted backbone is saved; an adapter loaded from a folder is that folder")
        self.net.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        (path / BASE_REVISION_FILE).write_text(json.dumps({"model": self.model, "revision": self.base_revision}))

    def _load_weights(self, path: Path) -> None:
        self._attach_to_one_base([self], [path])

    @classmethod
    def load_many(cls, folders: Sequence[Path], configs: Sequence[dict]) -> list["QwenQLoRABackbone"]:
        """Adapters that agree on the base (model, its recorded revision, 4-bit, compute dtype,
        attention) are attached by name to ONE base model; each keeps its own LoRA weights and score
        head, and its own hyper-parameters for encoding (max_length, max_turns, eval_batch_size)."""
        backbones = [cls(**config) for config in configs]
        groups: dict[tuple, list[int]] = {}
        for i, backbone in enumerate(backbones):
            groups.setdefault((*backbone._base_key(), _recorded_revision(Path(folders[i]))), []).append(i)
        for index in groups.values():
            cls._attach_to_one_base([backbones[i] for i in index], [Path(folders[i]) for i in index])
        return backbones

    @staticmethod
    def _attach_to_one_base(backbones: Sequence["QwenQLoRABackbone"], folders: Sequence[Path]) -> None:
        """Load the base of ``backbones[0]`` once, at the revision the folders recorded (all the same),
        and every folder's adapter onto it as ``adapter_<i>``, in the compute dtype. The tokenizer comes
        from the first folder: every fold adapter of a base saved the tokenizer of that same base."""
        from peft import PeftModel

        first = backbones[0]
        recorded = _recorded_revision(folders[0])
        first._resolve_base(recorded or first.revision,
                            f"adapter {folders[0]} was trained on" if recorded else "revision= pins")
        first._load_tokenizer(folders[0])
        try:
            net = first._load_base()
        except OSError as err:  # transformers: the revision is neither cached nor downloadable
            raise ValueError(f"adapter {folders[0]}: its base model {first.model} at revision {first.base_revision} "
                             f"cannot be loaded: {str(err).splitlines()[0]}") from err
        for i, (backbone, folder) in enumerate(zip(backbones, folders, strict=True)):
            name = f"adapter_{i}"
            # autocast_adapter_dtype=False: keep the stored dtype; _cast_adapter then sets the compute dtype.
            if i == 0:
                net = PeftModel.from_pretrained(net, folder, adapter_name=name, autocast_adapter_dtype=False)
            else:
                net.load_adapter(folder, adapter_name=name, autocast_adapter_dtype=False)
            _cast_adapter(net, name, first.dtype)
            backbone.net, backbone.tokenizer, backbone.adapter_name = net, first.tokenizer, name
            backbone.base_revision = first.base_revision
        net.eval()


def _recorded_revision(folder: Path) -> str | None:
    """The base model revision an adapter folder recorded; None for adapters saved before psydef
    recorded it (loaded unchecked)."""
    record = folder / BASE_REVISION_FILE
    return json.loads(record.read_text())["revision"] if record.is_file() else None


def _examples_digest(examples: list[dict]) -> str:
    """sha256 of the training examples (token ids and labels, in order)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(np.asarray(example["input_ids"], dtype=np.int64).tobytes() + b"%d;" % example["labels"])
    return digest.hexdigest()


class _TrainingState:
    """What ``fit`` needs to continue after an epoch: the trainable weights (float32), the optimizer
    and scheduler, every random generator (torch, CUDA, numpy, Python, the batch order), the epochs'
    stats, and ``identity`` (seed, base revision, digest of the training rows, every hyper-parameter
    but ``NOT_TRAINING``), which a resumed fit must share. Each file holds the epoch it was saved at,
    so a folder mixing two saves (a copy cut short) is refused."""

    def __init__(self, net, optimizer, scheduler, generator: torch.Generator, identity: dict):
        self.net, self.optimizer, self.scheduler, self.generator = net, optimizer, scheduler, generator
        self.identity = identity

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.net.named_parameters() if p.requires_grad}

    def save(self, folder: Path, epoch_stats: list[dict]) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        epoch = str(len(epoch_stats))
        save_file({name: p.detach().contiguous() for name, p in self._trainable().items()},
                  str(folder / CHECKPOINT_WEIGHTS), metadata={"epoch": epoch})
        numpy_state = np.random.get_state()
        torch.save({"epoch": epoch, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "torch": torch.get_rng_state(), "generator": self.generator.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
                    "python": random.getstate()}, folder / CHECKPOINT_STATE)
        (folder / CHECKPOINT_META).write_text(json.dumps(
            {"epoch": epoch, "identity": self.identity, "epoch_stats": epoch_stats}, indent=1))

    @staticmethod
    def saved_in(folder: Path) -> bool:
        return (folder / CHECKPOINT_META).is_file()

    def restore(self, folder: Path, origin: str = "") -> list[dict]:
        """Load the state saved in ``folder``; returns the stats of the epochs it covers. ``origin``
        names where the folder came from, for the errors."""
        from safetensors import safe_open

        where = f"checkpoint {origin or folder}"
        meta = json.loads((folder / CHECKPOINT_META).read_text())
        saved = meta["identity"]
        differ = sorted(key for key in {*saved, *self.identity} if saved.get(key) != self.identity.get(key))
        if differ:
            raise ValueError(f"{where} was saved by a fit that differs in {', '.join(differ)}: it cannot be "
                             "resumed; train the fold again without resume")
        # on CPU: the random states must be; the optimizer moves its state to its parameters' device
        state = torch.load(folder / CHECKPOINT_STATE, map_location="cpu", weights_only=True)
        with safe_open(str(folder / CHECKPOINT_WEIGHTS), "pt") as weights:
            epochs = {meta["epoch"], state["epoch"], weights.metadata()["epoch"]}
            trainable = self._trainable()
            if len(epochs) > 1 or set(weights.keys()) != set(trainable):
                raise ValueError(f"{where} is incomplete (its files are of epochs {', '.join(sorted(epochs))}): "
                                 "train the fold again without resume")
            with torch.no_grad():
                for name, param in trainable.items():
                    param.copy_(weights.get_tensor(name))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch"])
        self.generator.set_state(state["generator"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        kind, keys, *rest = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
        random.setstate(state["python"])
        return meta["epoch_stats"]


def _cast_adapter(net, adapter_name: str, dtype: torch.dtype) -> None:
    """Cast one peft adapter's weights (its LoRA matrices and its copy of the score head) to ``dtype``."""
    for name, param in net.named_parameters():
        if f".{adapter_name}." in name:
            param.data = param.data.to(dtype)
