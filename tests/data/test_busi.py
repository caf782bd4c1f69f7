"""The BUSI reader: manifest, every quirk of real downloads, and a clear error for every kind of bad input."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest

from busi_mtl.data.busi import BUSIDataError, load_image, load_mask, scan_busi

from conftest import lesion_image, write_png


def test_manifest_rows_labels_and_sizes(make_busi):
    root = make_busi((2, 3, 4))
    manifest = scan_busi(root)
    assert manifest.groupby("class").size().to_dict() == {"normal": 2, "benign": 3, "malignant": 4}
    assert set(manifest.columns) >= {"id", "class", "label", "image_path", "mask_paths", "width", "height"}
    row = manifest.set_index("id").loc["benign (2)"]
    assert row["label"] == 1 and (row["width"], row["height"]) == (128, 96)
    assert row["mask_paths"] == (str(root / "benign" / "benign (2)_mask.png"),)


def test_natural_order_and_logged_counts(make_busi, caplog):
    root = make_busi((1, 11, 1))
    with caplog.at_level(logging.INFO):
        manifest = scan_busi(root)
    benign = manifest[manifest["class"] == "benign"]["id"].tolist()
    assert benign[:3] == ["benign (1)", "benign (2)", "benign (3)"] and benign[-1] == "benign (11)"
    assert "normal 1, benign 11, malignant 1" in caplog.text


def test_multiple_masks_are_united(make_busi):
    root = make_busi()
    _, mask = lesion_image()
    second = np.zeros_like(mask)
    second[5:15, 5:20] = 1
    write_png(root / "benign" / "benign (1)_mask_1.png", second * 255)
    write_png(root / "benign" / "benign (1)_mask_2.png", np.zeros_like(mask))
    row = scan_busi(root).set_index("id").loc["benign (1)"]
    assert row["n_masks"] == 3
    assert [p.rsplit("/", 1)[1] for p in row["mask_paths"]] == [
        "benign (1)_mask.png",
        "benign (1)_mask_1.png",
        "benign (1)_mask_2.png",
    ]
    union = load_mask(row["mask_paths"], (96, 128))
    assert union.sum() == (mask | second).sum()


@pytest.mark.parametrize(
    "encode",
    [
        lambda m: m * 255,
        lambda m: m,  # values {0, 1}
        lambda m: np.dstack([m * 255] * 3),  # RGB
        lambda m: np.dstack([m * 255] * 3 + [np.full_like(m, 255)]),  # RGBA, opaque
    ],
    ids=["gray255", "gray01", "rgb", "rgba"],
)
def test_mask_encodings_binarise(tmp_path, encode):
    _, mask = lesion_image()
    path = write_png(tmp_path / "m.png", encode(mask))
    loaded = load_mask([path], mask.shape)
    assert loaded.dtype == np.uint8 and set(np.unique(loaded)) == {0, 1}
    np.testing.assert_array_equal(loaded, mask)


def test_rgb_image_becomes_one_gray_channel(tmp_path):
    image, _ = lesion_image()
    path = write_png(tmp_path / "i.png", np.dstack([image] * 3))
    loaded = load_image(path)
    assert loaded.shape == image.shape
    np.testing.assert_array_equal(loaded, image)


def test_mask_size_mismatch_is_resized_with_warning(make_busi, caplog):
    root = make_busi()
    _, mask = lesion_image()
    big = cv2.resize(mask, (256, 192), interpolation=cv2.INTER_NEAREST)
    write_png(root / "malignant" / "malignant (1)_mask.png", big * 255)
    row = scan_busi(root).set_index("id").loc["malignant (1)"]
    assert row["mask_size_mismatch"]
    with caplog.at_level(logging.WARNING):
        loaded = load_mask(row["mask_paths"], (96, 128))
    assert "resized with nearest neighbour" in caplog.text and "malignant (1)_mask.png" in caplog.text
    assert loaded.shape == (96, 128)
    assert abs(int(loaded.sum()) - int(mask.sum())) < 0.05 * mask.sum()


def test_normal_without_mask_is_legal_and_empty(make_busi):
    root = make_busi()
    (root / "normal" / "normal (1)_mask.png").unlink()
    row = scan_busi(root).set_index("id").loc["normal (1)"]
    assert row["n_masks"] == 0
    assert load_mask(row["mask_paths"], (96, 128)).sum() == 0


def test_missing_root_explains_layout_and_synthetic(tmp_path):
    with pytest.raises(BUSIDataError) as err:
        scan_busi(tmp_path / "nope")
    text = str(err.value)
    assert "nope" in text and "benign" in text and "busi_mtl.data.synthetic" in text


def test_missing_class_folder(make_busi):
    root = make_busi()
    for p in (root / "normal").iterdir():
        p.unlink()
    (root / "normal").rmdir()
    with pytest.raises(BUSIDataError, match=r"class folder\(s\) \['normal'\] missing"):
        scan_busi(root)
    assert len(scan_busi(root, required_classes=("benign", "malignant"))) == 6


def test_empty_class_folder(make_busi):
    root = make_busi()
    for p in (root / "malignant").iterdir():
        p.unlink()
    with pytest.raises(BUSIDataError, match="malignant: class folder holds no images"):
        scan_busi(root)


def test_lesion_image_without_mask_errors_or_skips(make_busi, caplog):
    root = make_busi()
    (root / "benign" / "benign (2)_mask.png").unlink()
    with pytest.raises(
        BUSIDataError, match=r"benign \(2\)\.png: benign image without a mask.*on_missing_mask=skip"
    ):
        scan_busi(root)
    with caplog.at_level(logging.WARNING):
        manifest = scan_busi(root, on_missing_mask="skip")
    assert "benign (2)" not in set(manifest["id"]) and len(manifest) == 8
    assert "Skipped" in caplog.text


def test_truncated_png_names_the_file(make_busi):
    root = make_busi()
    path = root / "benign" / "benign (1).png"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(BUSIDataError, match=r"benign \(1\)\.png: cannot be decoded \(truncated or corrupt"):
        load_image(path)


def test_zero_byte_and_non_png_files_fail_at_scan(make_busi):
    root = make_busi()
    (root / "normal" / "normal (2).png").write_bytes(b"")
    with pytest.raises(BUSIDataError, match=r"normal \(2\)\.png: file is empty"):
        scan_busi(root)
    (root / "normal" / "normal (2).png").write_text("<html>not an image</html>")
    with pytest.raises(BUSIDataError, match=r"normal \(2\)\.png: not a PNG file"):
        scan_busi(root)


def test_sixteen_bit_png_is_refused_with_a_fix(make_busi):
    root = make_busi()
    image, _ = lesion_image()
    write_png(root / "benign" / "benign (3).png", image.astype(np.uint16) * 257)
    with pytest.raises(BUSIDataError, match=r"benign \(3\)\.png: 16-bit PNG.*Convert"):
        scan_busi(root)


def test_non_binary_mask_values_are_refused(make_busi):
    root = make_busi()
    _, mask = lesion_image()
    soft = cv2.GaussianBlur(mask * 255, (7, 7), 2)
    path = write_png(root / "benign" / "benign (1)_mask.png", soft)
    with pytest.raises(BUSIDataError, match="besides 0/1/255"):
        load_mask([path], mask.shape)


def test_file_in_the_wrong_class_folder(make_busi):
    root = make_busi()
    image, mask = lesion_image()
    write_png(root / "benign" / "malignant (9).png", image)
    write_png(root / "benign" / "malignant (9)_mask.png", mask * 255)
    with pytest.raises(BUSIDataError, match="label would be ambiguous"):
        scan_busi(root)


def test_stray_files_are_reported_not_silently_dropped(make_busi, caplog):
    root = make_busi()
    (root / "benign" / "Thumbs.db").write_bytes(b"x")
    write_png(root / "benign" / "benign (99)_mask.png", np.zeros((4, 4), np.uint8))
    with caplog.at_level(logging.WARNING):
        manifest = scan_busi(root)
    assert len(manifest) == 9
    assert "Thumbs.db" in caplog.text and "benign (99)_mask.png have no image" in caplog.text


def test_synthetic_set_reads_cleanly(synthetic_busi):
    manifest = scan_busi(synthetic_busi)
    assert manifest.groupby("class").size().to_dict() == {"benign": 12, "malignant": 12, "normal": 12}
    for row in manifest.to_dict("records"):
        mask = load_mask(row["mask_paths"], load_image(row["image_path"]).shape)
        assert (mask.sum() > 0) == (row["class"] != "normal"), row["id"]


@pytest.mark.real_data
def test_real_busi_counts_and_masks(real_busi):
    manifest = scan_busi(real_busi)
    assert manifest.groupby("class").size().to_dict() == {"benign": 437, "malignant": 210, "normal": 133}
    assert int((manifest["n_masks"] > 1).sum()) == 17
    assert int(manifest["n_masks"].sum()) == 798
    for row in manifest.to_dict("records"):
        mask = load_mask(row["mask_paths"], (row["height"], row["width"]))
        assert set(np.unique(mask)) <= {0, 1}
        assert (mask.sum() > 0) == (row["class"] != "normal"), row["id"]
