"""Mask post-processing: classifier gating and small-component removal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from busi_mtl.data.transforms import restore_size
from busi_mtl.postprocess import PostProcess, full_size_masks, peak_region


def _masks() -> torch.Tensor:
    masks = torch.zeros(3, 1, 40, 40, dtype=torch.bool)
    masks[:, :, 5:25, 5:25] = True  # a 400-pixel lesion in every image
    masks[:, :, 32:34, 32:34] = True  # a 4-pixel speck
    return masks


PROBS = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4]])


def test_disabled_is_identity():
    pp = PostProcess()
    assert not pp.enabled
    assert torch.equal(pp(_masks(), PROBS), _masks())


def test_normal_gate_empties_confident_normals_only():
    out = PostProcess(normal_gate=0.5)(_masks(), PROBS)
    assert not out[0].any() and not out[2].any()  # p(normal) 0.9 and exactly 0.5
    assert torch.equal(out[1], _masks()[1])


def test_small_components_are_dropped():
    out = PostProcess(min_area=0.005)(_masks(), PROBS)  # 0.005 * 1600 = 8 pixels
    assert out[:, :, 5:25, 5:25].all()
    assert not out[:, :, 32:34, 32:34].any()
    assert out.dtype == torch.bool and out.shape == (3, 1, 40, 40)


def test_max_components_keeps_the_largest():
    masks = _masks()
    masks[:, :, 30:38, 2:10] = True  # a 64-pixel second blob
    one = PostProcess(max_components=1)(masks, PROBS)
    assert one.sum() == 3 * 400 and one[:, :, 5:25, 5:25].all()
    two = PostProcess(max_components=2)(masks, PROBS)
    assert two.sum() == 3 * (400 + 64) and not two[:, :, 32:34, 32:34].any()
    assert PostProcess(max_components=1).enabled


def test_rescue_fills_empty_masks_the_classifier_calls_lesions():
    probs = torch.zeros(4, 1, 40, 40)
    probs[:, :, 5:15, 5:15] = 0.3  # a faint lesion, under the threshold
    probs[:, :, 9:11, 9:11] = 0.4  # its peak
    probs[:, :, 30:35, 30:35] = 0.25  # a second faint blob: above half the peak, not connected to it
    masks = probs > 0.5  # all empty
    masks[3, :, 20:22, 20:22] = True  # image 3 already has a lesion pixel
    class_probs = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.4, 0.3, 0.3], [0.1, 0.8, 0.1]])
    out = PostProcess(rescue=0.5)(masks, class_probs, probs)
    assert not out[0].any()  # the classifier calls it normal
    assert out[1, :, 5:15, 5:15].all() and out[1].sum() == 100  # the peak's region only
    assert torch.equal(out[2], out[1])
    assert torch.equal(out[3], masks[3])  # not empty: left alone
    tight = PostProcess(rescue=0.9)(masks, class_probs, probs)
    assert tight[1].sum() == 4  # only the 0.4 peak is within 90% of it
    gated = PostProcess(normal_gate=0.3, rescue=0.5)(masks, class_probs, probs)
    assert not gated[2].any() and gated[1].sum() == 100  # p(normal) 0.4 >= the gate: stays empty
    with pytest.raises(ValueError, match="lesion probabilities"):
        PostProcess(rescue=0.5)(masks, class_probs)
    assert PostProcess(rescue=0.5).enabled


def test_peak_region_follows_the_peak():
    prob = np.zeros((10, 10), np.float32)
    prob[0:3, 0:3] = 0.6
    prob[6:9, 6:9] = 0.8
    np.testing.assert_array_equal(np.argwhere(peak_region(prob, 0.5)), np.argwhere(prob == 0.8))
    assert peak_region(prob, 0.7).sum() == 9


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"normal_gate": 1.5}, "normal_gate"),
        ({"min_area": 1.0}, "min_area"),
        ({"max_components": 0}, "max_comp"),
        ({"rescue": 0.0}, "rescue"),
        ({"rescue": 1.5}, "rescue"),
    ],
)
def test_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PostProcess(**kwargs)


def test_full_size_masks_threshold_and_post_process_at_the_image_size():
    prob = np.zeros((8, 8), np.float32)
    prob[1:4, 1:4] = 0.9  # a lesion
    prob[6, 6] = 0.9  # a speck: 19 px of 40 x 60 (0.8%) once resized back and thresholded
    pp = PostProcess(normal_gate=0.5, min_area=0.005)
    raw, processed = full_size_masks(prob, 40, 60, False, 0.5, pp, np.array([0.1, 0.8, 0.1], np.float32))
    assert raw.shape == processed.shape == (40, 60) and raw.dtype == processed.dtype == bool
    np.testing.assert_array_equal(raw, restore_size(prob, 40, 60, False) > 0.5)
    assert processed.sum() == raw.sum()  # nothing under 0.5% of the image
    dropped = full_size_masks(
        prob, 40, 60, False, 0.5, PostProcess(min_area=0.01), np.ones(3, np.float32) / 3
    )
    assert dropped[1].sum() == raw.sum() - 19  # under 1%: the speck goes, the lesion stays
    gated = full_size_masks(prob, 40, 60, False, 0.5, pp, np.array([0.6, 0.3, 0.1], np.float32))
    assert gated[0].sum() == raw.sum() and not gated[1].any()  # a confident normal: empty, raw kept
