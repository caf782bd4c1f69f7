"""Shared fixtures: tiny BUSI-layout folders written in tmp dirs, and the real BUSI when it is present."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest

from busi_mtl.data.synthetic import generate_busi

REPO = Path(__file__).resolve().parents[1]
REAL_BUSI = Path(os.environ.get("BUSI_REAL_ROOT", REPO.parent / "shared" / "data" / "Dataset_BUSI_with_GT"))


@pytest.fixture(scope="session")
def real_busi() -> Path:
    """The real BUSI from ../shared (or $BUSI_REAL_ROOT); tests using it skip when it is absent."""
    if not (REAL_BUSI / "benign").is_dir():
        pytest.skip(f"real BUSI not found at {REAL_BUSI}")
    return REAL_BUSI


@pytest.fixture(scope="session")
def synthetic_busi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic BUSI (12 per class, quirks on), generated once per test session."""
    return generate_busi(tmp_path_factory.mktemp("synthetic") / "busi", per_class=12, seed=3)


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array), path
    return path


def lesion_image(height: int = 96, width: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A textured gray image with a dark oval lesion, and the lesion's {0,1} mask."""
    rng = np.random.default_rng(seed)
    image = rng.integers(90, 200, size=(height, width), dtype=np.uint8)
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, (width // 2, height // 2), (width // 5, height // 6), 0, 0, 360, 1, -1)
    image[mask == 1] //= 3
    return image, mask


@pytest.fixture
def make_busi(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing a small, clean BUSI-layout folder; tests then break it in specific ways."""

    def make(per_class: Sequence[int] = (3, 3, 3), root: Path | None = None) -> Path:
        root = root or tmp_path / "Dataset_BUSI_with_GT"
        for k, (cls, count) in enumerate(zip(("normal", "benign", "malignant"), per_class, strict=True)):
            (root / cls).mkdir(parents=True, exist_ok=True)
            for n in range(1, count + 1):
                image, mask = lesion_image(seed=100 * k + n)
                if cls == "normal":
                    image, mask = (
                        np.random.default_rng(n).integers(90, 200, image.shape, dtype=np.uint8),
                        mask * 0,
                    )
                write_png(root / cls / f"{cls} ({n}).png", image)
                write_png(root / cls / f"{cls} ({n})_mask.png", mask * 255)
        return root

    return make
