"""Tests for the synthetic BUSI generator: exact file layout, quirks, determinism and class realism."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from busi_mtl.data import CLASSES
from busi_mtl.data.synthetic import (
    DEFAULT_SIZE,
    FILE_NAME_RE,
    GENERATOR_VERSION,
    QUIRK_BLOCK,
    generate_busi,
    main,
    plan_case,
    render_case,
    speckle_envelope,
)

BUSI_NAME = re.compile(r"^(benign|malignant|normal) \((\d+)\)(_mask(_(\d+))?)?\.png$")
LESION_CLASSES = ("benign", "malignant")


def _read(path: Path) -> np.ndarray:
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert array is not None, path
    return array


def _mask_paths(image: Path) -> list[Path]:
    """Masks of one image in BUSI order: _mask, _mask_1, _mask_2, ..."""
    prefix = f"{image.stem}_mask"
    paths = [p for p in image.parent.iterdir() if p.name.startswith(prefix)]
    return sorted(paths, key=lambda p: int(p.stem.removeprefix(prefix).removeprefix("_") or 0))


def _images(root: Path, label: str) -> list[Path]:
    return sorted((p for p in (root / label).iterdir() if "_mask" not in p.name), key=lambda p: p.name)


def _as_binary(mask: np.ndarray) -> np.ndarray:
    """Collapse any of the shipped mask encodings to a bool HxW array, checking it is two-valued."""
    plane = mask if mask.ndim == 2 else mask[..., 0]
    if mask.ndim == 3:
        assert all(np.array_equal(mask[..., c], plane) for c in range(3))
    assert set(np.unique(plane)) <= ({0, 255} if plane.max() > 1 else {0, 1})
    return plane > 0


@pytest.fixture(scope="module")
def quirky(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One full quirk block per class, so every quirk is guaranteed to occur."""
    return generate_busi(tmp_path_factory.mktemp("quirky"), per_class=QUIRK_BLOCK, seed=3)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_busi(tmp_path_factory.mktemp("plain"), per_class=3, seed=3, quirks=False)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """40 single-lesion cases per lesion class at a reduced size (shapes scale with the image)."""
    return {
        label: [
            (img, masks[0])
            for img, masks in (
                render_case(label, np.random.default_rng([11, i]), 300, 340) for i in range(40)
            )
        ]
        for label in LESION_CLASSES
    }


def test_layout_names_and_manifest(quirky: Path) -> None:
    for label in CLASSES:
        names = [p.name for p in (quirky / label).iterdir()]
        assert names and all(BUSI_NAME.match(n) and FILE_NAME_RE.match(n) for n in names)
        assert {BUSI_NAME.match(n).group(1) for n in names} == {label}
        indices = sorted(int(BUSI_NAME.match(p.name).group(2)) for p in _images(quirky, label))
        assert indices == list(range(1, QUIRK_BLOCK + 1))
        for name in names:  # every mask belongs to an existing image
            assert (quirky / label / (name.split("_mask")[0].removesuffix(".png") + ".png")).exists()
    assert {p.name for p in quirky.iterdir()} == {*CLASSES, "synthetic.json"}
    manifest = json.loads((quirky / "synthetic.json").read_text())
    assert manifest["seed"] == 3 and manifest["quirks"] is True and manifest["version"] == GENERATOR_VERSION
    assert manifest["per_class"] == dict.fromkeys(CLASSES, QUIRK_BLOCK)


def test_masks_match_images_and_classes(quirky: Path) -> None:
    for label in CLASSES:
        for image_path in _images(quirky, label):
            image = _read(image_path)
            masks = [_as_binary(_read(p)) for p in _mask_paths(image_path)]
            assert all(m.shape == image.shape[:2] for m in masks)
            if label == "normal":
                assert len(masks) <= 1 and not any(m.any() for m in masks)
                continue
            assert masks and all(m.any() for m in masks)
            union = np.sum(masks, axis=0)
            assert union.max() == 1, "lesions of one image must be separate"


def test_files_follow_the_quirk_plan(quirky: Path) -> None:
    seen = {"mask_counts": set(), "encodings": set(), "rgb_image": 0, "sizes": set()}
    for label in CLASSES:
        for image_path in _images(quirky, label):
            index = int(BUSI_NAME.match(image_path.name).group(2))
            plan = plan_case(3, label, index)
            image, masks = _read(image_path), [_read(p) for p in _mask_paths(image_path)]
            assert image.shape[:2] == (plan.height, plan.width)
            assert (image.ndim == 3) == plan.rgb_image
            if plan.rgb_image:
                assert image.shape[2] == 3 and np.array_equal(image[..., 0], image[..., 2])
            expected_masks = plan.n_lesions if label != "normal" else int(plan.write_mask)
            assert len(masks) == expected_masks
            channels = {1 if m.ndim == 2 else m.shape[2] for m in masks}
            assert channels <= {{"gray": 1, "binary": 1, "rgb": 3, "rgba": 4}[plan.mask_encoding]}
            if label != "normal":
                assert {int(m.max()) for m in masks} == {1 if plan.mask_encoding == "binary" else 255}
            seen["mask_counts"].add((label, len(masks)))
            seen["encodings"].add(plan.mask_encoding)
            seen["rgb_image"] += plan.rgb_image
            seen["sizes"].add(image.shape[:2])
    assert {("benign", 2), ("benign", 3), ("malignant", 2), ("malignant", 3), ("normal", 0)} <= seen[
        "mask_counts"
    ]
    assert seen["encodings"] == {"gray", "rgb", "rgba", "binary"}
    assert seen["rgb_image"] > 0 and len(seen["sizes"]) > 10


def test_quirk_rates_are_stratified() -> None:
    n = 10 * QUIRK_BLOCK
    for label in CLASSES:
        plans = [plan_case(0, label, i) for i in range(1, n + 1)]
        encodings = [p.mask_encoding for p in plans]
        assert encodings.count("rgb") == n // 10
        assert encodings.count("rgba") == encodings.count("binary") == n // 20
        assert sum(p.rgb_image for p in plans) == n // 10
        assert all(380 <= p.width <= 640 and 330 <= p.height <= 560 for p in plans)
        if label == "normal":
            assert sum(not p.write_mask for p in plans) == n // 20 and all(p.n_lesions == 0 for p in plans)
        else:
            lesions = [p.n_lesions for p in plans]
            assert lesions.count(3) == 1 and lesions.index(3) < QUIRK_BLOCK
            assert 0.05 <= (lesions.count(2) + 1) / n <= 0.10


def test_no_quirks_gives_plain_files(plain: Path) -> None:
    for label in CLASSES:
        for image_path in _images(plain, label):
            image, masks = _read(image_path), [_read(p) for p in _mask_paths(image_path)]
            assert image.ndim == 2 and image.dtype == np.uint8 and image.shape == DEFAULT_SIZE
            assert len(masks) == 1 and masks[0].ndim == 2 and masks[0].shape == DEFAULT_SIZE
            assert set(np.unique(masks[0])) == ({0} if label == "normal" else {0, 255})


def test_deterministic_and_index_stable(tmp_path: Path) -> None:
    small = generate_busi(tmp_path / "a", per_class=3, seed=0)
    large = generate_busi(tmp_path / "b", per_class=5, seed=0)
    other = generate_busi(tmp_path / "c", per_class=3, seed=1)
    for label in CLASSES:
        for path in (small / label).iterdir():
            assert path.read_bytes() == (large / label / path.name).read_bytes(), path.name
        for path in _images(small, label):
            assert path.read_bytes() != (other / label / path.name).read_bytes()
    again = render_case("malignant", np.random.default_rng(7), 200, 220, n_lesions=2)
    first = render_case("malignant", np.random.default_rng(7), 200, 220, n_lesions=2)
    assert np.array_equal(again[0], first[0]) and all(map(np.array_equal, again[1], first[1]))


def test_existing_dataset_needs_overwrite(tmp_path: Path) -> None:
    generate_busi(tmp_path, per_class=2, seed=0, quirks=False)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"overwrite") as err:
        generate_busi(tmp_path, per_class=1, seed=0, quirks=False)
    assert str(tmp_path) in str(err.value)
    generate_busi(tmp_path, per_class=1, seed=0, quirks=False, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "benign").iterdir()) == [
        "benign (1).png",
        "benign (1)_mask.png",
    ]
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "busi"
    main(["--out", str(out), "--per-class", "benign=2,malignant=1,normal=1", "--seed", "5", "--no-quirks"])
    assert [len(_images(out, c)) for c in ("benign", "malignant", "normal")] == [2, 1, 1]
    summary = capsys.readouterr().out
    assert "benign=2" in summary and "malignant=1" in summary and str(out) in summary
    assert json.loads((out / "synthetic.json").read_text())["quirks"] is False
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out), "--per-class", "1"])
    assert exit_info.value.code != 0 and "--overwrite" in capsys.readouterr().err
    for bad in ("tumour=3", "many"):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "x"), "--per-class", bad])


def test_render_case_contract() -> None:
    image, masks = render_case("normal", np.random.default_rng(0), 210, 230)
    assert image.shape == (210, 230) and image.dtype == np.uint8 and masks == []
    image, masks = render_case("benign", np.random.default_rng(0), 210, 230, n_lesions=3)
    assert len(masks) == 3 and all(m.dtype == np.uint8 and set(np.unique(m)) == {0, 1} for m in masks)
    assert np.sum(masks, axis=0).max() == 1
    with pytest.raises(ValueError, match="label"):
        render_case("cyst", np.random.default_rng(0), 210, 230)


def _shape(mask: np.ndarray) -> tuple[float, float]:
    """(bounding-box width/height, solidity = area / convex hull area) of the largest component."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    _, _, w, h = cv2.boundingRect(contour)
    return w / h, cv2.contourArea(contour) / cv2.contourArea(cv2.convexHull(contour))


def test_bi_rads_shape_descriptors(rendered: dict[str, list[tuple[np.ndarray, np.ndarray]]]) -> None:
    benign = np.array([_shape(m) for _, m in rendered["benign"]])
    malignant = np.array([_shape(m) for _, m in rendered["malignant"]])
    assert benign[:, 0].mean() > 1.2 and benign[:, 1].mean() > 0.95 and benign[:, 1].min() > 0.93
    assert malignant[:, 0].mean() < 1.05
    assert malignant[:, 1].mean() < benign[:, 1].mean() - 0.05
    widths = {k: np.array([cv2.boundingRect(m)[2] / m.shape[1] for _, m in v]) for k, v in rendered.items()}
    assert all(w.min() >= 0.03 and w.max() <= 0.4 for w in widths.values())
    assert abs(np.median(widths["benign"]) - np.median(widths["malignant"])) < 0.08


def test_lesion_brightness_is_not_a_class_cue(
    rendered: dict[str, list[tuple[np.ndarray, np.ndarray]]],
) -> None:
    means = {k: np.array([img[m > 0].mean() for img, m in v]) for k, v in rendered.items()}
    values = np.concatenate([means["benign"], means["malignant"]])
    is_malignant = np.r_[np.zeros(len(means["benign"])), np.ones(len(means["malignant"]))]
    best = max(
        max(np.mean((values > t) == is_malignant), np.mean((values <= t) == is_malignant)) for t in values
    )
    assert best < 0.8
    surround = np.array(
        [img[cv2.dilate(m, np.ones((15, 15), np.uint8)) - m > 0].mean() for img, m in rendered["benign"]]
    )
    assert np.mean(means["benign"] < surround) > 0.9, "lesions should be hypoechoic to their surroundings"


def test_posterior_features_differ_by_class(rendered: dict[str, list[tuple[np.ndarray, np.ndarray]]]) -> None:
    """Benign masses tend to enhance the echoes below them, malignant ones to shadow them."""

    def below_minus_beside(img: np.ndarray, mask: np.ndarray) -> float:
        x, y, w, h = cv2.boundingRect(mask)
        rows = slice(y + h, min(img.shape[0], y + h + max(h // 2, 8)))
        beside = np.r_[img[rows, max(0, x - w // 2) : x].ravel(), img[rows, x + w : x + w + w // 2].ravel()]
        return float(img[rows, x + w // 4 : x + 3 * w // 4].mean() - beside.mean())

    contrast = {
        k: np.array([below_minus_beside(i.astype(float), m) for i, m in v]) for k, v in rendered.items()
    }
    assert np.median(contrast["benign"]) > 5 and np.median(contrast["malignant"]) < -5


def test_speckle_is_rayleigh_with_anisotropic_grain() -> None:
    echo = np.ones((256, 256), np.float32)
    env = speckle_envelope(echo, np.random.default_rng(0), sigma_axial=1.0, sigma_lateral=3.0)[16:-16, 16:-16]
    assert np.sqrt(np.mean(env**2)) == pytest.approx(1.0, rel=0.05)
    assert env.mean() / env.std() == pytest.approx(
        np.sqrt(np.pi / (4 - np.pi)), rel=0.05
    )  # Rayleigh SNR 1.91
    centred = env - env.mean()
    lateral, axial = (np.mean(centred * np.roll(centred, 3, axis=a)) / centred.var() for a in (1, 0))
    assert lateral > 0.4 > axial
    compounded = speckle_envelope(echo, np.random.default_rng(0), 1.0, 3.0, looks=3)
    assert compounded.mean() / compounded.std() > 1.5 * env.mean() / env.std()


def test_rendered_texture_is_speckled_not_flat(
    rendered: dict[str, list[tuple[np.ndarray, np.ndarray]]],
) -> None:
    img = rendered["benign"][0][0].astype(np.float32)
    local_mean = cv2.blur(img, (9, 9))
    local_std = np.sqrt(np.maximum(cv2.blur(img**2, (9, 9)) - local_mean**2, 0))
    bright = local_mean > 60
    assert 0.05 < np.median(local_std[bright] / local_mean[bright]) < 0.5
    assert 50 < img.mean() < 180
