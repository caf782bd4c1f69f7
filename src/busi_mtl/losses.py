"""Multi-task objective: lesion segmentation + normal/benign/malignant classification.

``weighting="fixed"`` (default)::

    total = alpha * seg + beta * cls
    seg   = dice_weight * Dice + bce_weight * BCE        (seg_loss="dice_bce", default)
    seg   = dice_weight * Dice + focal_weight * Focal    (seg_loss="dice_focal")
    cls   = cross-entropy(class_logits, label)           (class weights, label smoothing)

Dice is smp's soft Dice loss ``1 - 2*sum(p*t) / (sum(p) + sum(t))`` with ``p = sigmoid(logits)``, pooled over
all pixels of the whole batch (``dice_reduction="batch"``, default). smp makes it exactly 0 when no image in the
batch has a lesion pixel, so on a batch of only normal images the pixel-wise BCE/focal term is the only
segmentation signal pushing predictions towards an empty mask: keep its weight > 0.
``dice_reduction="image"`` takes the same soft Dice loss per image and averages it over the images with a lesion
(0 when there is none), the per-image lesion Dice the results report: pooled over the batch, a large lesion
outweighs a small one, per image each lesion counts once. Normal images are left to the pixel-wise term.
``dice_reduction="image_all"`` averages over every image ``1 - (2*sum(p*t) + 1) / (sum(p) + sum(t) + 1)``: the
smoothing of 1 is negligible beside a lesion's pixel count, and a normal image's term is ``sum(p) / (sum(p) + 1)``,
a soft count of its false-positive pixels that saturates, which is what the normal-empty rate scores.
``tversky_beta`` (``image`` only) turns that per-image Dice into the Tversky index
``sum(p*t) / (sum(p*t) + (1 - b)*sum(p*(1-t)) + b*sum((1-p)*t))``: at 0.5 (default) it is the Dice, above 0.5
a missed lesion pixel costs more than a false one, pushing towards finding the lesion at all, the usual failure.
``normal_dice_weight`` (``image_all`` only) weighs each normal image's term against a lesion image's 1 in that
mean: 0 leaves normal images to the pixel-wise term as ``image`` does, 1 (default) counts them as lesion images.
Focal is smp's binary focal loss ``mean((1 - p_t)**gamma * BCE)`` without an alpha balance term.

``weighting="uncertainty"`` is the homoscedastic uncertainty weighting of Kendall, Gal & Cipolla (CVPR 2018)
with learnable log-variances ``s_seg``, ``s_cls`` (``nn.Parameter``, initialised to 0)::

    total = alpha * (exp(-s_seg) * seg + s_seg) + beta * (exp(-s_cls) * cls + s_cls)

This is the form without the 1/2 factors (twice Kendall's regression form); alpha/beta stay as fixed priors.
For a given task loss L the optimum is ``s = log L``, i.e. effective weight ``exp(-s) = 1/L``, where the task
contributes ``1 + log L``: ``total`` goes negative once task losses drop below 1/e -- expected, not a bug. The effective weights ``exp(-s)``
are returned as ``w_seg`` / ``w_cls`` for logging.

All terms are computed in float32 (logits are cast with ``.float()``), so half-precision logits under AMP are safe.
"""

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss, SoftBCEWithLogitsLoss
from torch import Tensor, nn

SEG_LOSSES: tuple[str, ...] = ("dice_bce", "dice_focal")
WEIGHTINGS: tuple[str, ...] = ("fixed", "uncertainty")
DICE_REDUCTIONS: tuple[str, ...] = ("batch", "image", "image_all")


def per_image_dice_loss(mask_logits: Tensor, mask: Tensor, tversky_beta: float = 0.5) -> Tensor:
    """Mean over the images with a lesion pixel of ``1 - 2*sum(p*t) / (sum(p) + sum(t))`` (the Tversky index
    with false negatives weighted ``tversky_beta`` and false positives ``1 - tversky_beta``); 0 if there is none."""
    probs = mask_logits.sigmoid().flatten(1)
    target = mask.flatten(1)
    has_lesion = target.sum(1) > 0
    if not has_lesion.any():
        return mask_logits.sum() * 0.0  # keeps the graph, as smp's DiceLoss does for an all-empty batch
    probs, target = probs[has_lesion], target[has_lesion]
    tp = (probs * target).sum(1)
    fp, fn = probs.sum(1) - tp, target.sum(1) - tp
    index = tp / (tp + (1 - tversky_beta) * fp + tversky_beta * fn)
    return (1 - index).mean()


def smoothed_per_image_dice_loss(mask_logits: Tensor, mask: Tensor, normal_weight: float = 1.0) -> Tensor:
    """Weighted mean over all images of ``1 - (2*sum(p*t) + 1) / (sum(p) + sum(t) + 1)``: a lesion image weighs 1,
    a normal one ``normal_weight``; 0 if every weight is 0 (only normal images, ``normal_weight=0``)."""
    probs = mask_logits.sigmoid().flatten(1)
    target = mask.flatten(1)
    dice = (2 * (probs * target).sum(1) + 1) / (probs.sum(1) + target.sum(1) + 1)
    weights = torch.where(target.sum(1) > 0, 1.0, normal_weight)
    if not weights.sum() > 0:
        return mask_logits.sum() * 0.0
    return (weights * (1 - dice)).sum() / weights.sum()


def _require_non_negative(**values: float) -> None:
    """Raise naming the Hydra key (``loss.<name>``) so a bad override is easy to find."""
    for name, value in values.items():
        if not value >= 0:  # also rejects NaN
            raise ValueError(f"loss.{name} must be >= 0, got {value}")


class MultiTaskLoss(nn.Module):
    """Weighted sum of the segmentation and classification losses; see the module docstring for the formulas.

    ``forward`` returns a dict with ``loss`` (the total to backpropagate), ``seg``, ``cls`` and the unweighted
    ``dice`` and ``bce`` (or ``focal``) terms; with uncertainty weighting also ``w_seg``/``w_cls`` (``exp(-s)``).
    """

    class_weights: Tensor

    def __init__(
        self,
        alpha: float = 0.5,
        beta: float = 0.5,
        seg_loss: str = "dice_bce",
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        focal_weight: float = 1.0,
        focal_gamma: float = 2.0,
        label_smoothing: float = 0.0,
        weighting: str = "fixed",
        dice_reduction: str = "batch",
        normal_dice_weight: float = 1.0,
        tversky_beta: float = 0.5,
        num_classes: int = 3,
    ) -> None:
        super().__init__()
        if seg_loss not in SEG_LOSSES:
            raise ValueError(f"loss.seg_loss must be one of {SEG_LOSSES}, got {seg_loss!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"loss.weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if dice_reduction not in DICE_REDUCTIONS:
            raise ValueError(f"loss.dice_reduction must be one of {DICE_REDUCTIONS}, got {dice_reduction!r}")
        _require_non_negative(
            alpha=alpha,
            beta=beta,
            dice_weight=dice_weight,
            bce_weight=bce_weight,
            focal_weight=focal_weight,
            focal_gamma=focal_gamma,
            normal_dice_weight=normal_dice_weight,
        )
        if normal_dice_weight != 1 and dice_reduction != "image_all":
            raise ValueError(
                f"loss.normal_dice_weight={normal_dice_weight} only applies with loss.dice_reduction=image_all, "
                f"got dice_reduction={dice_reduction!r}"
            )
        if not 0 < tversky_beta < 1:
            raise ValueError(f"loss.tversky_beta must be in (0, 1), got {tversky_beta}")
        if tversky_beta != 0.5 and dice_reduction != "image":
            raise ValueError(
                f"loss.tversky_beta={tversky_beta} only applies with loss.dice_reduction=image, "
                f"got dice_reduction={dice_reduction!r}"
            )
        if alpha == 0 and beta == 0:
            raise ValueError("loss.alpha and loss.beta are both 0, so nothing would be trained; set one > 0")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"loss.label_smoothing must be in [0, 1), got {label_smoothing}")
        if num_classes < 2:
            raise ValueError(f"loss.num_classes must be >= 2, got {num_classes}")

        self.alpha = alpha
        self.beta = beta
        self.dice_weight = dice_weight
        self.label_smoothing = label_smoothing
        self.weighting = weighting
        self.dice: nn.Module | Callable[[Tensor, Tensor], Tensor] = {
            "batch": DiceLoss(mode="binary", from_logits=True),
            "image": partial(per_image_dice_loss, tversky_beta=tversky_beta),
            "image_all": partial(smoothed_per_image_dice_loss, normal_weight=normal_dice_weight),
        }[dice_reduction]
        # The pixel-wise term is the one that still sees all-normal batches (Dice is 0 there).
        self.pixel_name = "bce" if seg_loss == "dice_bce" else "focal"
        self.pixel_weight = bce_weight if seg_loss == "dice_bce" else focal_weight
        self.pixel_loss: nn.Module = (
            SoftBCEWithLogitsLoss(ignore_index=None)
            if seg_loss == "dice_bce"
            else FocalLoss(mode="binary", gamma=focal_gamma)
        )
        # A buffer, not a plain attribute: follows .to(device) and is saved in checkpoints.
        self.register_buffer("class_weights", torch.ones(num_classes))
        if weighting == "uncertainty":
            self.s_seg = nn.Parameter(torch.zeros(()))
            self.s_cls = nn.Parameter(torch.zeros(()))

    def set_class_weights(self, weights: Tensor | Sequence[float]) -> None:
        """Set the cross-entropy class weights (e.g. from train-split class frequencies), one per class, > 0."""
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.shape != self.class_weights.shape:
            raise ValueError(
                f"class weights must have shape {tuple(self.class_weights.shape)}, got {tuple(weights.shape)}"
            )
        if not (torch.isfinite(weights).all() and (weights > 0).all()):
            raise ValueError(f"class weights must be finite and > 0, got {weights.tolist()}")
        with torch.no_grad():
            self.class_weights.copy_(weights)

    def forward(
        self, mask_logits: Tensor, class_logits: Tensor, mask: Tensor, label: Tensor
    ) -> dict[str, Tensor]:
        """Losses for mask_logits (B,1,H,W), class_logits (B,C) against mask (B,1,H,W) in {0,1}, label (B,)."""
        if mask_logits.shape != mask.shape:
            raise ValueError(
                f"mask_logits {tuple(mask_logits.shape)} and mask {tuple(mask.shape)} differ in shape"
            )
        # Autocast only lowers matmul/conv-like ops, none of which are used here, so float32 inputs keep every
        # term in float32 under AMP.
        mask_logits, mask, class_logits = mask_logits.float(), mask.float(), class_logits.float()
        dice = self.dice(mask_logits, mask)
        pixel = self.pixel_loss(mask_logits, mask)
        seg = self.dice_weight * dice + self.pixel_weight * pixel
        cls = F.cross_entropy(
            class_logits,
            label.long(),
            weight=self.class_weights.float(),
            label_smoothing=self.label_smoothing,
        )
        out = {"dice": dice, self.pixel_name: pixel, "seg": seg, "cls": cls}
        if self.weighting == "uncertainty":
            w_seg, w_cls = torch.exp(-self.s_seg), torch.exp(-self.s_cls)
            out["loss"] = self.alpha * (w_seg * seg + self.s_seg) + self.beta * (w_cls * cls + self.s_cls)
            out["w_seg"], out["w_cls"] = w_seg.detach(), w_cls.detach()
        else:
            out["loss"] = self.alpha * seg + self.beta * cls
        return out
