"""Segmentation and classification metrics.

Segmentation (:class:`SegmentationMetrics`, :func:`per_image_scores`)

- Inputs are binary masks (bool or {0, 1}); thresholding is the caller's job: :func:`binarize` keeps pixels with
  ``sigmoid(logit) > threshold`` (default 0.5), i.e. ``logit > log(threshold / (1 - threshold))``.
- Lesion images are selected by label (benign or malignant, i.e. ``label != NORMAL``), not by their mask.
- ``dice``: per-image Dice ``2TP / (2TP + FP + FN)`` averaged over lesion images -- the headline number, as
  BUSI papers report it.
- ``iou``: per-image lesion IoU ``TP / (TP + FP + FN)`` averaged over lesion images.
- ``miou``: mean of lesion IoU and background IoU ``TN / (TN + FP + FN)``, both per image and averaged over
  lesion images. The background IoU of an image with no background in either prediction or GT is 1.
- A lesion image with an empty GT mask (bad data) has no defined Dice/IoU: it is left out of ``dice``, ``iou``
  and ``miou`` and counted in ``n_lesion_images_empty_gt``; its pixels still count in the micro scores.
  ``n_lesion_images`` counts the lesion images that were averaged (non-empty GT).
- ``dice_micro``, ``iou_micro``: dataset-level, from TP/FP/FN summed over all images (normal ones included).
- ``pixel_acc``: ``(TP + TN) / pixels`` over all images.
- ``normal_empty_rate``: fraction of normal images whose predicted mask is empty, i.e. 1 - the image-level
  false-positive rate on normal images.
- ``n_lesion_images``, ``n_lesion_images_empty_gt``, ``n_normal_images``: counts, as floats.
- Undefined values are NaN: ``dice``/``iou``/``miou`` without lesion images, ``normal_empty_rate`` without
  normal images, ``dice_micro``/``iou_micro`` without a positive pixel in prediction or GT; and in
  :func:`per_image_scores`, Dice/IoU of an image whose prediction and GT are both empty.
- All states are sums (``dist_reduce_fx="sum"``), so DDP synchronisation gives the same result as a single
  process (counts exactly; the per-image score sums up to float32 summation order).

Classification (:func:`classification_metrics`, :func:`confusion_matrix`)

- ``update(preds, target)`` with preds = softmax probabilities (B, C), i.e. ``class_logits.softmax(-1)``, and
  target = labels (B,). Pass probabilities, not logits: torchmetrics applies softmax to a batch only if some
  value lies outside [0, 1], so a batch of logits that happen to lie in [0, 1] would be read as probabilities.
- ``acc``: overall accuracy (``average="micro"``). ``precision``, ``recall``, ``f1``: macro over classes;
  macro recall is the balanced accuracy. A class absent from both predictions and targets is left out of the
  macro mean (torchmetrics behaviour). ``auroc``: one-vs-rest ROC AUC, macro over classes, exact (all scores kept);
  NaN when a class has no image in the targets (torchmetrics would average in a 0 for it), as in
  :mod:`busi_mtl.bootstrap`.
- Confusion matrix: raw counts, rows = true class, columns = predicted class, in ``CLASSES`` order.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.utilities import dim_zero_cat

from busi_mtl.data import CLASSES, NORMAL


def binarize(mask_logits: Tensor, threshold: float = 0.5) -> Tensor:
    """Bool mask of pixels with ``sigmoid(logit) > threshold``, compared in logit space (no sigmoid needed)."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    return mask_logits > math.log(threshold / (1 - threshold))


def _check_binary(x: Tensor, name: str) -> None:
    if x.dtype != torch.bool and ((x != 0) & (x != 1)).any():
        raise ValueError(
            f"{name} must be a binary mask (bool or 0/1); threshold logits with binarize() first"
        )


def _per_image_stats(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-image (TP, FP, FN, TN) pixel counts, each of shape (B,), for masks (B,1,H,W) or (B,H,W)."""
    if preds.shape != target.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
    if not (preds.ndim == 3 or (preds.ndim == 4 and preds.shape[1] == 1)):
        raise ValueError(f"masks must be (B,1,H,W) or (B,H,W), got {tuple(preds.shape)}")
    _check_binary(preds, "preds")
    _check_binary(target, "target")
    p = preds.reshape(preds.shape[0], -1).bool()
    t = target.reshape(target.shape[0], -1).bool()
    tp = (p & t).sum(1)
    fp = (p & ~t).sum(1)
    fn = (~p & t).sum(1)
    return tp, fp, fn, p.shape[1] - tp - fp - fn


def per_image_scores(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image (Dice, IoU), each (B,) float; NaN where prediction and GT are both empty (undefined)."""
    tp, fp, fn, _ = _per_image_stats(preds, target)
    tp, err = tp.float(), (fp + fn).float()
    # 0/0 -> NaN is exactly the "both empty" case.
    return 2 * tp / (2 * tp + err), tp / (tp + err)


class SegmentationMetrics(Metric):
    """Dataset-level segmentation metrics with BUSI conventions (see the module docstring).

    ``update(preds, target, labels)``: binary predicted masks and GT masks, (B,1,H,W) or (B,H,W), and the
    image labels (B,). ``compute()`` returns a dict of scalar tensors.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    dice_sum: Tensor
    iou_sum: Tensor
    bg_iou_sum: Tensor
    n_lesion: Tensor
    n_lesion_empty_gt: Tensor
    n_normal: Tensor
    n_normal_pred_empty: Tensor
    tp: Tensor
    fp: Tensor
    fn: Tensor
    tn: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Sum-only states: DDP sync and merge_state are plain additions.
        for name in ("dice_sum", "iou_sum", "bg_iou_sum"):
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")
        for name in (
            "n_lesion",
            "n_lesion_empty_gt",
            "n_normal",
            "n_normal_pred_empty",
            "tp",
            "fp",
            "fn",
            "tn",
        ):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, labels: Tensor) -> None:
        """Accumulate one batch."""
        tp, fp, fn, tn = _per_image_stats(preds, target)
        labels = labels.reshape(-1)
        if labels.numel() != tp.numel():
            raise ValueError(f"got {labels.numel()} labels for {tp.numel()} masks")
        lesion = labels != NORMAL
        scored = lesion & (tp + fn > 0)
        # Denominators are > 0 wherever `scored` (GT non-empty); clamp only keeps masked-out entries finite.
        self.dice_sum += (scored * (2 * tp / (2 * tp + fp + fn).clamp_min(1))).sum()
        self.iou_sum += (scored * (tp / (tp + fp + fn).clamp_min(1))).sum()
        bg_den = tn + fp + fn
        bg_iou = torch.where(bg_den > 0, tn / bg_den.clamp_min(1), 1.0)
        self.bg_iou_sum += (scored * bg_iou).sum()
        self.n_lesion += scored.sum()
        self.n_lesion_empty_gt += (lesion & ~scored).sum()
        self.n_normal += (~lesion).sum()
        self.n_normal_pred_empty += (~lesion & (tp + fp == 0)).sum()
        self.tp += tp.sum()
        self.fp += fp.sum()
        self.fn += fn.sum()
        self.tn += tn.sum()

    def compute(self) -> dict[str, Tensor]:
        """Metric dict; 0/0 divisions deliberately give NaN for undefined values."""
        n_lesion = self.n_lesion.float()
        tp, fp, fn, tn = (s.float() for s in (self.tp, self.fp, self.fn, self.tn))
        return {
            "dice": self.dice_sum / n_lesion,
            "iou": self.iou_sum / n_lesion,
            "miou": (self.iou_sum + self.bg_iou_sum) / (2 * n_lesion),
            "dice_micro": 2 * tp / (2 * tp + fp + fn),
            "iou_micro": tp / (tp + fp + fn),
            "pixel_acc": (tp + tn) / (tp + fp + fn + tn),
            "normal_empty_rate": self.n_normal_pred_empty.float() / self.n_normal.float(),
            "n_lesion_images": n_lesion,
            "n_lesion_images_empty_gt": self.n_lesion_empty_gt.float(),
            "n_normal_images": self.n_normal.float(),
        }


class MacroAUROC(MulticlassAUROC):
    """Macro one-vs-rest AUROC that is NaN, not a silent 0 averaged in, when a class is absent from the
    targets (a BUSI-like external set without normal/, a sanity-check batch of one class)."""

    def compute(self) -> Tensor:
        target = dim_zero_cat(self.target)
        counts = torch.bincount(target.long(), minlength=self.num_classes)
        if (counts == 0).any():
            return torch.tensor(float("nan"), device=target.device)
        return super().compute()


def classification_metrics(num_classes: int = 3) -> MetricCollection:
    """Scalar classification metrics ``acc``, ``precision``, ``recall``, ``f1``, ``auroc``; feed softmax probs."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
            "precision": MulticlassPrecision(num_classes=num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes=num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes=num_classes, average="macro"),
            "auroc": MacroAUROC(num_classes=num_classes, average="macro"),
        }
    )


def confusion_matrix(num_classes: int = 3) -> MulticlassConfusionMatrix:
    """Raw-count confusion matrix (rows = true, columns = predicted), kept apart so scalars log with log_dict."""
    return MulticlassConfusionMatrix(num_classes=num_classes, normalize=None)


def confusion_keys(stage: str, classes: Sequence[str] = CLASSES) -> list[list[str]]:
    """Logged scalar names of the confusion-matrix cells, e.g. ``test/confusion/malignant_as_benign``.

    Logging the cells as scalars puts them in ``trainer.callback_metrics``, which Lightning syncs across
    DDP ranks and returns from spawned processes, and in TensorBoard as curves.
    """
    return [[f"{stage}/confusion/{t}_as_{p}" for p in classes] for t in classes]


def collect_stage(logged: Mapping[str, Tensor | float], stage: str) -> dict[str, Any]:
    """One stage's logged values as plain floats (prefix stripped), with its confusion matrix rebuilt."""
    prefix = f"{stage}/"
    values: dict[str, Any] = {
        k[len(prefix) :]: float(v)
        for k, v in logged.items()
        if k.startswith(prefix) and not k.startswith(f"{prefix}confusion/")
    }
    keys = confusion_keys(stage)
    if all(k in logged for row in keys for k in row):
        values["confusion_matrix"] = [[round(float(logged[k])) for k in row] for row in keys]
    return values
