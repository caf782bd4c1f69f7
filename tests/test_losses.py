"""MultiTaskLoss against hand-computed values on tiny tensors."""

import math

import pytest
import torch

from busi_mtl.losses import MultiTaskLoss

LN3 = math.log(3.0)

# One 1x4 image. Logits 0, ln3, 0, -ln3 give probabilities p = 0.5, 0.75, 0.5, 0.25; GT t = 1, 1, 0, 0.
MASK_LOGITS = torch.tensor([0.0, LN3, 0.0, -LN3]).reshape(1, 1, 1, 4)
MASK = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 1, 4)
# Dice = 2*sum(p*t) / (sum p + sum t) = 2*1.25 / (2 + 2) = 0.625 -> loss 0.375.
DICE = 0.375
# BCE = mean(-log p_t), p_t = 0.5, 0.75, 0.5, 0.75 -> (2 ln2 + 2 ln(4/3)) / 4 = ln(8/3) / 2.
BCE = math.log(8 / 3) / 2
# Focal (gamma=2) = mean((1-p_t)^2 * -log p_t) = (2 * 0.25 ln2 + 2 * 0.0625 ln(4/3)) / 4.
FOCAL = (0.5 * math.log(2) + 0.125 * math.log(4 / 3)) / 4

# Two samples, 3 classes. Row 0: uniform softmax, label 1 -> CE ln3.
# Row 1: logits (ln2, 0, 0) -> softmax (1/2, 1/4, 1/4), label 0 -> CE ln2.
CLASS_LOGITS = torch.tensor([[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0]])
LABEL = torch.tensor([1, 0])
CE = (LN3 + math.log(2)) / 2


def _batch(n: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`n` copies of the 1x4 image (pooled Dice/BCE/focal are unchanged by repetition) and the 2 CE samples."""
    return MASK_LOGITS.repeat(n, 1, 1, 1), CLASS_LOGITS, MASK.repeat(n, 1, 1, 1), LABEL


def test_dice_bce_ce_hand_values() -> None:
    out = MultiTaskLoss(alpha=1.0, beta=1.0)(*_batch())
    assert out["dice"].item() == pytest.approx(DICE, abs=1e-6)
    assert out["bce"].item() == pytest.approx(BCE, abs=1e-6)
    assert out["cls"].item() == pytest.approx(CE, abs=1e-6)
    assert out["seg"].item() == pytest.approx(DICE + BCE, abs=1e-6)
    assert "focal" not in out
    assert "w_seg" not in out


def test_focal_hand_value() -> None:
    out = MultiTaskLoss(seg_loss="dice_focal", dice_weight=0.5, focal_weight=3.0)(*_batch())
    assert out["focal"].item() == pytest.approx(FOCAL, abs=1e-6)
    assert out["seg"].item() == pytest.approx(0.5 * DICE + 3.0 * FOCAL, abs=1e-6)
    assert "bce" not in out


def test_dice_is_pooled_over_the_batch() -> None:
    # Add a normal image predicting p = 0.5 everywhere: sum p grows by 2, so Dice = 2.5 / 6 -> loss 1 - 5/12.
    logits = torch.cat([MASK_LOGITS, torch.zeros(1, 1, 1, 4)])
    mask = torch.cat([MASK, torch.zeros(1, 1, 1, 4)])
    out = MultiTaskLoss()(logits, CLASS_LOGITS, mask, LABEL)
    assert out["dice"].item() == pytest.approx(1 - 5 / 12, abs=1e-6)


def test_per_image_dice_averages_lesion_images_only() -> None:
    # Image 0: the 1x4 image (loss 0.375). Image 1: a small lesion t = 1,0,0,0 with p = 0.5 everywhere:
    # Dice = 2*0.5 / (2 + 1) = 1/3 -> loss 2/3. Image 2: normal, p = 0.5 everywhere, left out.
    logits = torch.cat([MASK_LOGITS, torch.zeros(2, 1, 1, 4)])
    mask = torch.cat([MASK, torch.tensor([1.0, 0, 0, 0]).reshape(1, 1, 1, 4), torch.zeros(1, 1, 1, 4)])
    labels = torch.tensor([1, 1, 0])
    class_logits = torch.zeros(3, 3)
    out = MultiTaskLoss(dice_reduction="image")(logits, class_logits, mask, labels)
    assert out["dice"].item() == pytest.approx((DICE + 2 / 3) / 2, abs=1e-6)
    # Pooled over the batch instead (the normal image's p counts too): 2*(1.25 + 0.5) / (6 + 3).
    pooled = MultiTaskLoss()(logits, class_logits, mask, labels)
    assert pooled["dice"].item() == pytest.approx(1 - 3.5 / 9, abs=1e-6)


def test_per_image_dice_is_zero_without_lesions_and_keeps_gradients() -> None:
    logits = torch.full((2, 1, 4, 4), 1.5, requires_grad=True)
    out = MultiTaskLoss(dice_reduction="image")(
        logits, CLASS_LOGITS, torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
    )
    assert out["dice"].item() == 0.0
    out["loss"].backward()
    assert logits.grad is not None
    assert (logits.grad > 0).all()  # the pixel term still pushes the false positives down


def test_smoothed_per_image_dice_counts_normal_images() -> None:
    # Image 0: the 1x4 image, 1 - (2*1.25 + 1) / (2 + 2 + 1) = 0.3. Image 1: normal, p = 0.5 everywhere:
    # 1 - 1 / (2 + 1) = 2/3. Image 2: normal, p ~ 0 everywhere: ~0.
    logits = torch.cat([MASK_LOGITS, torch.zeros(1, 1, 1, 4), torch.full((1, 1, 1, 4), -30.0)])
    mask = torch.cat([MASK, torch.zeros(2, 1, 1, 4)])
    out = MultiTaskLoss(dice_reduction="image_all")(logits, torch.zeros(3, 3), mask, torch.tensor([1, 0, 0]))
    assert out["dice"].item() == pytest.approx((0.3 + 2 / 3 + 0) / 3, abs=1e-6)


def test_normal_dice_weight_weighs_normal_images_in_the_smoothed_mean() -> None:
    # The three images above; the normal ones weigh 0.25 each against the lesion image's 1.
    logits = torch.cat([MASK_LOGITS, torch.zeros(1, 1, 1, 4), torch.full((1, 1, 1, 4), -30.0)])
    mask = torch.cat([MASK, torch.zeros(2, 1, 1, 4)])
    labels = torch.tensor([1, 0, 0])
    out = MultiTaskLoss(dice_reduction="image_all", normal_dice_weight=0.25)(
        logits, torch.zeros(3, 3), mask, labels
    )
    assert out["dice"].item() == pytest.approx((0.3 + 0.25 * 2 / 3) / 1.5, abs=1e-6)
    # Weight 0 is the lesion images' mean alone, as with dice_reduction=image (up to the smoothing of 1).
    out = MultiTaskLoss(dice_reduction="image_all", normal_dice_weight=0.0)(
        logits, torch.zeros(3, 3), mask, labels
    )
    assert out["dice"].item() == pytest.approx(0.3, abs=1e-6)


def test_normal_dice_weight_zero_on_a_normal_only_batch_keeps_gradients() -> None:
    logits = torch.full((2, 1, 4, 4), 1.5, requires_grad=True)
    loss = MultiTaskLoss(dice_reduction="image_all", normal_dice_weight=0.0)
    out = loss(logits, CLASS_LOGITS, torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    assert out["dice"].item() == 0.0
    out["loss"].backward()
    assert logits.grad is not None
    assert (logits.grad > 0).all()


def test_normal_dice_weight_is_refused_where_it_would_be_ignored() -> None:
    with pytest.raises(ValueError, match=r"loss\.normal_dice_weight=0\.5 only applies .*image_all.*'image'"):
        MultiTaskLoss(dice_reduction="image", normal_dice_weight=0.5)
    with pytest.raises(ValueError, match=r"loss\.normal_dice_weight must be >= 0"):
        MultiTaskLoss(dice_reduction="image_all", normal_dice_weight=-1.0)


def test_alpha_beta_and_term_weights_compose() -> None:
    loss = MultiTaskLoss(alpha=0.3, beta=0.7, dice_weight=2.0, bce_weight=0.5)
    out = loss(*_batch())
    seg = 2.0 * DICE + 0.5 * BCE
    assert out["seg"].item() == pytest.approx(seg, abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.3 * seg + 0.7 * CE, abs=1e-6)


def test_beta_zero_is_segmentation_only() -> None:
    out = MultiTaskLoss(alpha=1.0, beta=0.0)(*_batch())
    assert out["loss"].item() == pytest.approx(DICE + BCE, abs=1e-6)
    assert out["cls"].item() == pytest.approx(CE, abs=1e-6)  # still reported for logging


def test_class_weights_give_weighted_mean_ce() -> None:
    loss = MultiTaskLoss()
    loss.set_class_weights(torch.tensor([1.0, 2.0, 3.0]))
    out = loss(*_batch())
    # Weighted mean: (w[1] * ln3 + w[0] * ln2) / (w[1] + w[0]) = (2 ln3 + ln2) / 3.
    assert out["cls"].item() == pytest.approx((2 * LN3 + math.log(2)) / 3, abs=1e-6)


def test_class_weights_buffer_is_checkpointed_and_validated() -> None:
    loss = MultiTaskLoss()
    assert torch.equal(loss.class_weights, torch.ones(3))
    loss.set_class_weights([0.5, 1.0, 4.0])
    restored = MultiTaskLoss()
    restored.load_state_dict(loss.state_dict())
    assert torch.equal(restored.class_weights, torch.tensor([0.5, 1.0, 4.0]))
    with pytest.raises(ValueError, match="shape"):
        loss.set_class_weights(torch.ones(2))
    with pytest.raises(ValueError, match="> 0"):
        loss.set_class_weights(torch.tensor([1.0, 0.0, 1.0]))


def test_label_smoothing() -> None:
    out = MultiTaskLoss(label_smoothing=0.3)(*_batch())
    # Target distribution (1 - 0.3) * onehot + 0.3 / 3. Row 0 (uniform softmax): ln3 whatever the target.
    # Row 1: q = (0.8, 0.1, 0.1), -log p = (ln2, ln4, ln4) -> 0.8 ln2 + 0.2 * 2 ln2 = 1.2 ln2.
    assert out["cls"].item() == pytest.approx((LN3 + 1.2 * math.log(2)) / 2, abs=1e-6)


@pytest.mark.parametrize(("seg_loss", "pixel_key"), [("dice_bce", "bce"), ("dice_focal", "focal")])
def test_all_normal_batch_is_carried_by_pixel_term(seg_loss: str, pixel_key: str) -> None:
    mask_logits = torch.full((2, 1, 4, 4), 1.5, requires_grad=True)
    mask = torch.zeros(2, 1, 4, 4)
    out = MultiTaskLoss(seg_loss=seg_loss)(mask_logits, CLASS_LOGITS, mask, torch.zeros(2, dtype=torch.long))
    assert out["dice"].item() == 0.0  # smp drops the Dice of a batch without any lesion pixel
    assert out[pixel_key].item() > 0
    assert out["seg"].item() > 0
    out["seg"].backward()
    assert mask_logits.grad is not None
    assert (mask_logits.grad > 0).all()  # every false-positive pixel is pushed down


@pytest.mark.parametrize(("alpha", "beta"), [(0.0, 0.0), (-0.1, 1.0), (1.0, -2.0)])
def test_invalid_alpha_beta(alpha: float, beta: float) -> None:
    with pytest.raises(ValueError, match=r"loss\.(alpha|beta)"):
        MultiTaskLoss(alpha=alpha, beta=beta)


def test_unknown_options_list_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"dice_bce.*dice_focal"):
        MultiTaskLoss(seg_loss="dice")
    with pytest.raises(ValueError, match=r"fixed.*uncertainty"):
        MultiTaskLoss(weighting="gradnorm")
    with pytest.raises(ValueError, match=r"loss\.dice_reduction.*batch.*image.*image_all"):
        MultiTaskLoss(dice_reduction="sample")


def test_uncertainty_weighting_formula_and_gradients() -> None:
    loss = MultiTaskLoss(alpha=0.4, beta=0.6, weighting="uncertainty")
    params = dict(loss.named_parameters())
    assert set(params) == {"s_seg", "s_cls"}
    # At init (s = 0) it reduces to fixed weighting.
    out = loss(*_batch())
    assert out["loss"].item() == pytest.approx(0.4 * (DICE + BCE) + 0.6 * CE, abs=1e-6)

    with torch.no_grad():
        loss.s_seg.fill_(1.0)
        loss.s_cls.fill_(-0.5)
    out = loss(*_batch())
    seg = DICE + BCE
    expected = 0.4 * (math.exp(-1.0) * seg + 1.0) + 0.6 * (math.exp(0.5) * CE - 0.5)
    assert out["loss"].item() == pytest.approx(expected, abs=1e-6)
    assert out["w_seg"].item() == pytest.approx(math.exp(-1.0), abs=1e-6)
    assert out["w_cls"].item() == pytest.approx(math.exp(0.5), abs=1e-6)

    out["loss"].backward()
    # d total / d s = weight * (1 - exp(-s) * task_loss)
    assert loss.s_seg.grad.item() == pytest.approx(0.4 * (1 - math.exp(-1.0) * seg), abs=1e-6)
    assert loss.s_cls.grad.item() == pytest.approx(0.6 * (1 - math.exp(0.5) * CE), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_give_float32_losses(dtype: torch.dtype) -> None:
    mask_logits, class_logits, mask, label = _batch()
    loss = MultiTaskLoss(weighting="uncertainty")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(mask_logits.to(dtype), class_logits.to(dtype), mask, label)
    reference = loss(mask_logits.to(dtype).float(), class_logits.to(dtype).float(), mask, label)
    for key, value in out.items():
        assert value.dtype == torch.float32, key
        assert value.item() == pytest.approx(reference[key].item(), abs=1e-6), key


def test_tversky_beta_weighs_missed_lesion_pixels() -> None:
    # p = 0.5, 0.75, 0.5, 0.25 against t = 1, 1, 1, 0: TP 1.75, FP 0.25, FN 1.25.
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0]).reshape(1, 1, 1, 4)
    label = torch.tensor([1])
    expected = {0.5: 1 - 1.75 / 2.5, 0.8: 1 - 1.75 / (1.75 + 0.2 * 0.25 + 0.8 * 1.25), 0.2: 1 - 1.75 / 2.2}
    for beta, loss in expected.items():
        out = MultiTaskLoss(dice_reduction="image", tversky_beta=beta)(
            MASK_LOGITS, torch.zeros(1, 3), mask, label
        )
        assert out["dice"].item() == pytest.approx(loss, abs=1e-6)
    # 0.5 is the per-image Dice: 2*1.75 / (2 + 3).
    assert expected[0.5] == pytest.approx(1 - 2 * 1.75 / 5)


def test_tversky_beta_is_refused_out_of_range_or_where_it_would_be_ignored() -> None:
    with pytest.raises(ValueError, match=r"loss\.tversky_beta=0\.7 only applies .*image.*'batch'"):
        MultiTaskLoss(tversky_beta=0.7)
    for beta in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"loss\.tversky_beta must be in \(0, 1\)"):
            MultiTaskLoss(dice_reduction="image", tversky_beta=beta)
