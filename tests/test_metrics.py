"""Segmentation/classification metrics against hand-computed values."""

import math

import pytest
import torch

from busi_mtl.data import BENIGN, MALIGNANT, NORMAL
from busi_mtl.metrics import (
    SegmentationMetrics,
    binarize,
    classification_metrics,
    confusion_matrix,
    per_image_scores,
)


def _mask(*pixels: tuple[int, int]) -> torch.Tensor:
    """4x4 mask with a channel dim, (1,4,4), with ones at the given (row, col) pixels."""
    m = torch.zeros(1, 4, 4)
    for r, c in pixels:
        m[0, r, c] = 1
    return m


# Four 4x4 images (16 pixels each):
# A benign:    GT {(0,0),(0,1),(1,0),(1,1)}, pred {(0,0),(0,1),(1,0),(3,3)} -> TP 3, FP 1, FN 1, TN 11
#              Dice 6/8, IoU 3/5, background IoU 11/13
# B malignant: GT {(2,2),(2,3),(3,2),(3,3)}, pred {(2,2),(2,3),(0,0),(0,1)} -> TP 2, FP 2, FN 2, TN 10
#              Dice 4/8, IoU 2/6, background IoU 10/14
# C normal:    GT empty, pred {(1,1)}                                       -> TP 0, FP 1, FN 0, TN 15
# D normal:    GT empty, pred empty                                         -> TN 16
TARGET = torch.stack(
    [
        _mask((0, 0), (0, 1), (1, 0), (1, 1)),
        _mask((2, 2), (2, 3), (3, 2), (3, 3)),
        _mask(),
        _mask(),
    ]
)
PREDS = torch.stack(
    [
        _mask((0, 0), (0, 1), (1, 0), (3, 3)),
        _mask((2, 2), (2, 3), (0, 0), (0, 1)),
        _mask((1, 1)),
        _mask(),
    ]
)
LABELS = torch.tensor([BENIGN, MALIGNANT, NORMAL, NORMAL])


def _compute(preds: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    metric = SegmentationMetrics()
    metric.update(preds, target, labels)
    return metric.compute()


def test_segmentation_hand_values() -> None:
    out = _compute(PREDS, TARGET, LABELS)
    expected = {
        "dice": (6 / 8 + 4 / 8) / 2,
        "iou": (3 / 5 + 2 / 6) / 2,
        "miou": ((3 / 5 + 11 / 13) / 2 + (2 / 6 + 10 / 14) / 2) / 2,
        # Summed over all four images: TP 5, FP 4, FN 3, TN 52 (64 pixels).
        "dice_micro": 10 / 17,
        "iou_micro": 5 / 12,
        "pixel_acc": 57 / 64,
        "normal_empty_rate": 1 / 2,  # D empty, C has a false-positive pixel
        "n_lesion_images": 2.0,
        "n_lesion_images_empty_gt": 0.0,
        "n_normal_images": 2.0,
    }
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, abs=1e-6), key


def test_channel_dim_and_bool_inputs_are_accepted() -> None:
    a = _compute(PREDS.squeeze(1).bool(), TARGET.squeeze(1), LABELS)  # (B,H,W)
    b = _compute(PREDS, TARGET.bool(), LABELS)  # (B,1,H,W)
    for key in a:
        torch.testing.assert_close(a[key], b[key], equal_nan=True)


def test_only_normal_images() -> None:
    out = _compute(PREDS[2:], TARGET[2:], LABELS[2:])
    for key in ("dice", "iou", "miou"):
        assert math.isnan(out[key].item()), key
    assert out["normal_empty_rate"].item() == pytest.approx(0.5)
    assert out["n_lesion_images"].item() == 0
    # Only C's false-positive pixel: Dice_micro 0 / (0 + 1 + 0) = 0, pixel acc 31/32.
    assert out["dice_micro"].item() == 0.0
    assert out["pixel_acc"].item() == pytest.approx(31 / 32)


def test_only_lesion_images_gives_nan_normal_rate() -> None:
    out = _compute(PREDS[:2], TARGET[:2], LABELS[:2])
    assert math.isnan(out["normal_empty_rate"].item())
    assert out["dice"].item() == pytest.approx(0.625)


def test_lesion_image_with_empty_gt_is_skipped_and_counted() -> None:
    # Image C relabelled benign: its GT is empty, so it joins neither the Dice mean nor the normal count.
    labels = torch.tensor([BENIGN, MALIGNANT, BENIGN, NORMAL])
    out = _compute(PREDS, TARGET, labels)
    assert out["dice"].item() == pytest.approx(0.625)
    assert out["n_lesion_images"].item() == 2
    assert out["n_lesion_images_empty_gt"].item() == 1
    assert out["n_normal_images"].item() == 1
    assert out["normal_empty_rate"].item() == 1.0
    assert out["dice_micro"].item() == pytest.approx(10 / 17)  # pixels still counted


def test_background_iou_without_background_is_one() -> None:
    full = torch.ones(1, 4, 4)
    out = _compute(full, full, torch.tensor([BENIGN]))
    assert out["miou"].item() == 1.0


def test_non_binary_or_mismatched_inputs_raise() -> None:
    metric = SegmentationMetrics()
    with pytest.raises(ValueError, match="binarize"):
        metric.update(PREDS * 0.7, TARGET, LABELS)
    with pytest.raises(ValueError, match="shape"):
        metric.update(PREDS.unsqueeze(1), TARGET, LABELS)
    with pytest.raises(ValueError, match="labels"):
        metric.update(PREDS, TARGET, LABELS[:3])


def _random_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    target = (torch.rand(n, 1, 8, 8, generator=g) > 0.6) & (labels != NORMAL).view(n, 1, 1, 1)
    preds = torch.rand(n, 1, 8, 8, generator=g) > 0.5
    preds[::3] = False  # some empty predictions so normal_empty_rate is not trivially 0
    return preds, target.float(), labels


def test_accumulation_equals_single_update() -> None:
    preds, target, labels = _random_batch(12, seed=0)
    chunked = SegmentationMetrics()
    for idx in torch.split(torch.arange(12), [5, 4, 3]):
        chunked.update(preds[idx], target[idx], labels[idx])
    whole = _compute(preds, target, labels)
    out = chunked.compute()
    assert 0 < out["normal_empty_rate"].item() < 1
    for key in whole:
        torch.testing.assert_close(out[key], whole[key], equal_nan=True)


def test_merged_halves_equal_whole() -> None:
    """What DDP does: every state is a sum, so adding the states of two ranks reproduces the full result."""
    preds, target, labels = _random_batch(10, seed=1)
    rank0, rank1 = SegmentationMetrics(), SegmentationMetrics()
    rank0.update(preds[:6], target[:6], labels[:6])
    rank1.update(preds[6:], target[6:], labels[6:])
    rank0.merge_state(rank1)
    whole = _compute(preds, target, labels)
    merged = rank0.compute()
    for key in whole:
        torch.testing.assert_close(merged[key], whole[key], equal_nan=True)


def test_per_image_scores_nan_convention() -> None:
    # Images: A, B, D (both empty -> NaN), and GT non-empty with empty prediction (-> 0).
    preds = torch.stack([PREDS[0], PREDS[1], PREDS[3], _mask()])
    target = torch.stack([TARGET[0], TARGET[1], TARGET[3], TARGET[0]])
    dice, iou = per_image_scores(preds, target)
    torch.testing.assert_close(dice, torch.tensor([0.75, 0.5, math.nan, 0.0]), equal_nan=True)
    torch.testing.assert_close(iou, torch.tensor([0.6, 1 / 3, math.nan, 0.0]), equal_nan=True)


def test_binarize_thresholds_sigmoid_probability() -> None:
    logits = torch.tensor([-1.0, 0.0, 0.1, 1.0, 2.0])
    assert binarize(logits).tolist() == [False, False, True, True, True]
    # logit(0.8) = ln 4 ~ 1.386
    assert binarize(logits, threshold=0.8).tolist() == [False, False, False, False, True]
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 4
    for t in (0.1, 0.3, 0.7):
        assert torch.equal(binarize(x, t), torch.sigmoid(x) > t)
    with pytest.raises(ValueError, match="threshold"):
        binarize(logits, threshold=1.0)


# Seven samples. Targets 0,0,1,1,2,2,1; argmax predictions 0,1,1,1,2,0,1.
PROBS = torch.tensor(
    [
        [0.6, 0.3, 0.1],
        [0.3, 0.5, 0.2],
        [0.2, 0.7, 0.1],
        [0.1, 0.8, 0.1],
        [0.1, 0.2, 0.7],
        [0.5, 0.1, 0.4],
        [0.1, 0.6, 0.3],
    ]
)
CLASS_TARGET = torch.tensor([0, 0, 1, 1, 2, 2, 1])


def test_classification_hand_values() -> None:
    metrics = classification_metrics(num_classes=3)
    metrics.update(PROBS, CLASS_TARGET)
    out = metrics.compute()
    # Per class (TP, FP, FN): 0 -> (1, 1, 1), 1 -> (3, 1, 0), 2 -> (1, 0, 1)
    # precision 1/2, 3/4, 1; recall 1/2, 1, 1/2 (macro 2/3, unlike accuracy 5/7); F1 2TP/(2TP+FP+FN) 1/2, 6/7, 2/3.
    # AUROC one-vs-rest: class 0 positives {.6, .3} vs negatives {.2, .1, .1, .5, .1}: 9 of 10 pairs ordered
    # -> 9/10; classes 1 and 2 are perfectly separated -> 1.
    expected = {
        "acc": 5 / 7,
        "precision": (1 / 2 + 3 / 4 + 1) / 3,
        "recall": (1 / 2 + 1 + 1 / 2) / 3,
        "f1": (1 / 2 + 6 / 7 + 2 / 3) / 3,
        "auroc": (9 / 10 + 1 + 1) / 3,
    }
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, abs=1e-6), key


def test_auroc_is_nan_when_a_class_is_absent_from_the_targets() -> None:
    """torchmetrics scores an absent class 0 and averages it in (2/3 here for a perfect ranking)."""
    metrics = classification_metrics(num_classes=3)
    metrics.update(PROBS[2:], CLASS_TARGET[2:])  # benign and malignant only: no normal image
    out = metrics.compute()
    assert torch.isnan(out["auroc"])
    assert out["acc"].item() == pytest.approx(4 / 5)  # the other metrics are unaffected


def test_confusion_matrix_rows_are_true_classes() -> None:
    cm = confusion_matrix(num_classes=3)
    cm.update(PROBS, CLASS_TARGET)
    assert cm.compute().tolist() == [[1, 1, 0], [0, 3, 0], [1, 0, 1]]
