"""Preprocessing: resizing and its inverse, speckle reduction, the on-disk cache, joint augmentation."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

import busi_mtl.data.transforms as T
from busi_mtl.data.busi import scan_busi

from conftest import lesion_image


def test_image_size_must_be_a_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        T.Preprocessing(image_size=250)
    with pytest.raises(ValueError, match=r"data\.denoise"):
        T.Preprocessing(denoise="wavelet")


@pytest.mark.parametrize("keep_aspect", [False, True])
def test_resize_and_restore_roundtrip(keep_aspect):
    _, mask = lesion_image(300, 500)
    small = T.resize_square(mask, 128, keep_aspect, is_mask=True)
    assert small.shape == (128, 128) and set(np.unique(small)) == {0, 1}
    back = T.restore_size(small.astype(np.float32), 300, 500, keep_aspect) >= 0.5
    assert back.shape == (300, 500)
    iou = (back & (mask == 1)).sum() / (back | (mask == 1)).sum()
    assert iou > 0.95


def test_letterbox_keeps_aspect_and_centres():
    image = np.full((100, 200), 200, np.uint8)
    square = T.resize_square(image, 64, keep_aspect=True)
    assert square[:16].max() == 0 and square[-16:].max() == 0  # 50 px padding above and below, scaled
    assert square[24:40].min() == 200


@pytest.mark.parametrize("method", ["median", "bilateral", "nlm"])
def test_speckle_reduction_smooths(method):
    rng = np.random.default_rng(0)
    envelope_db = 20 * np.log10(rng.rayleigh(1.0, (128, 128)))  # log-compressed speckle, as on a scanner
    speckled = np.clip(150 + envelope_db * 255 / 50, 0, 255).astype(np.uint8)
    out = T.reduce_speckle(speckled, method)
    assert out.shape == speckled.shape and out.dtype == np.uint8
    assert out.std() < 0.8 * speckled.std()


def test_cache_is_built_once_and_keyed_by_settings_and_files(synthetic_busi, tmp_path, monkeypatch):
    manifest = scan_busi(synthetic_busi)
    calls = []
    original = T._process_one
    monkeypatch.setattr(T, "_process_one", lambda *a: calls.append(a[0]) or original(*a))
    settings = T.Preprocessing(image_size=64)
    first = T.build_cache(manifest, settings, tmp_path)
    assert len(calls) == len(manifest)
    assert first.images.shape == (len(manifest), 64, 64) and first.images.dtype == np.uint8
    assert first.masks.max() == 1 and first.hashes.shape == (len(manifest), 256)
    assert first.ids == manifest["id"].tolist()

    again = T.build_cache(manifest, settings, tmp_path)
    assert len(calls) == len(manifest) and again.path == first.path
    np.testing.assert_array_equal(again.images, first.images)

    other = T.build_cache(manifest, T.Preprocessing(image_size=64, denoise="median"), tmp_path)
    assert other.path != first.path and len(calls) == 2 * len(manifest)
    assert not np.array_equal(other.images, first.images)

    target = manifest["image_path"].iloc[0]
    os.utime(target, ns=(0, 0))  # a changed file invalidates the cache
    assert T.build_cache(manifest, settings, tmp_path).path != first.path


def test_cached_arrays_pickle_without_pixels(synthetic_busi, tmp_path):
    arrays = T.build_cache(scan_busi(synthetic_busi), T.Preprocessing(image_size=64), tmp_path)
    blob = pickle.dumps(arrays)
    assert len(blob) < 20_000  # ids, location and hashes; not the 36 x 64 x 64 x 2 bytes of pixels
    restored = pickle.loads(blob)
    np.testing.assert_array_equal(restored.images, arrays.images)


def test_augmentation_keeps_image_and_mask_aligned():
    """Geometric transforms must move image and mask together: the lesion stays dark under its mask."""
    image, mask = lesion_image(128, 128, seed=4)
    transform = T.train_augmentation(strength=1.5, seed=0)
    changed = 0
    for _ in range(60):
        out = transform(image=image, mask=mask)
        aug_image, aug_mask = out["image"].astype(float), out["mask"]
        assert aug_mask.shape == (128, 128) and set(np.unique(aug_mask)) <= {0, 1}
        if aug_mask.sum() < 50:
            continue
        tissue = np.median(aug_image[(aug_mask == 0) & (aug_image > 0)])  # zero fill is not tissue
        assert (aug_image[aug_mask == 1] < tissue).mean() > 0.9  # mask pixels still lie on the dark lesion
        changed += not np.array_equal(aug_mask, mask)
    assert changed > 20


def test_augmentation_is_seeded():
    image, mask = lesion_image(64, 64)
    a = [T.train_augmentation(seed=1)(image=image, mask=mask)["image"] for _ in range(2)]
    b = T.train_augmentation(seed=2)(image=image, mask=mask)["image"]
    np.testing.assert_array_equal(a[0], a[1])
    assert not np.array_equal(a[0], b)
