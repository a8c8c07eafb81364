"""Class-weighted cross-entropy for the very imbalanced defense levels."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from psydef.core.labels import N_LEVELS


def inverse_sqrt_class_weights(labels: Iterable[int], n_classes: int = N_LEVELS) -> np.ndarray:
    """float32 weights ``w_c`` proportional to ``1 / sqrt(n_c)`` (``n_c``: count of class ``c`` in
    ``labels``), scaled so that they average to 1 over the classes present in ``labels``.

    The square root softens plain inverse-frequency weighting, which over-trusts a handful of rare
    examples. A class absent from ``labels`` gets weight 1 (an average class): it is never a target,
    so its weight only scales how much label smoothing pulls its probability up, and 1 keeps that
    pull ordinary instead of removing it (0) or making it huge (``1 / sqrt(0)``)."""
    labels = np.asarray(list(labels), dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in 0..{n_classes - 1}")
    counts = np.bincount(labels, minlength=n_classes)
    present = counts > 0
    weights = np.ones(n_classes)
    weights[present] = 1.0 / np.sqrt(counts[present])
    weights[present] /= weights[present].mean()
    return weights.astype(np.float32)


def class_weighted_loss(labels: Iterable[int], label_smoothing: float = 0.05) -> torch.nn.CrossEntropyLoss:
    """Cross-entropy over the 9 levels with inverse-sqrt class weights computed from the training
    ``labels`` and label smoothing. Move it to the logits' device with ``.to(device)``."""
    weight = torch.from_numpy(inverse_sqrt_class_weights(labels))
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
