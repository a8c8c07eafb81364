import numpy as np
import pytest
import torch

from psydef.core.losses import class_weighted_loss, inverse_sqrt_class_weights


def test_inverse_sqrt_weights_average_one_over_present_classes():
    labels = [7] * 16 + [0] * 4 + [3] * 1  # classes 1, 2, 4, 5, 6, 8 absent
    weights = inverse_sqrt_class_weights(labels)
    assert weights.dtype == np.float32 and weights.shape == (9,)
    present = [0, 3, 7]
    raw = np.array([1 / 2, 1 / 1, 1 / 4])  # 1 / sqrt(4), 1 / sqrt(1), 1 / sqrt(16)
    np.testing.assert_allclose(weights[present], raw / raw.mean(), rtol=1e-6)
    assert weights[present].mean() == pytest.approx(1.0)
    np.testing.assert_array_equal(np.delete(weights, present), 1.0)  # absent classes: weight 1


def test_balanced_labels_give_unit_weights():
    np.testing.assert_allclose(inverse_sqrt_class_weights(np.repeat(np.arange(9), 5)), 1.0, rtol=1e-6)


def test_labels_out_of_range_are_rejected():
    with pytest.raises(ValueError):
        inverse_sqrt_class_weights([0, 9])


def test_class_weighted_loss_is_torch_cross_entropy_with_those_weights():
    labels = [7, 7, 7, 7, 1, 2]
    loss_fn = class_weighted_loss(labels, label_smoothing=0.05)
    assert isinstance(loss_fn, torch.nn.CrossEntropyLoss)
    assert loss_fn.label_smoothing == 0.05
    np.testing.assert_allclose(loss_fn.weight.numpy(), inverse_sqrt_class_weights(labels))


def test_missing_a_rare_class_costs_more_than_missing_the_majority():
    loss_fn = class_weighted_loss([7, 7, 7, 7, 1, 2])
    targets = torch.tensor([1, 7])
    rare_missed = torch.zeros(2, 9)
    rare_missed[0, 7] = rare_missed[1, 7] = 4.0
    majority_missed = torch.zeros(2, 9)
    majority_missed[0, 1] = majority_missed[1, 1] = 4.0
    assert loss_fn(rare_missed, targets) > loss_fn(majority_missed, targets)
