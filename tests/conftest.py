"""Shared fixtures: tiny BUSI-layout folders written in tmp dirs, and the real BUSI when it is present."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

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


def copy_case(root: Path, cls: str, source: int, target: int) -> None:
    """Overwrite case ``target`` of ``cls`` (image and mask) with a byte copy of case ``source``: a duplicate scan."""
    for suffix in (".png", "_mask.png"):
        (root / cls / f"{cls} ({target}){suffix}").write_bytes(
            (root / cls / f"{cls} ({source}){suffix}").read_bytes()
        )


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


def compose_config(config_name: str, overrides: Sequence[str], workdir: Path):
    """A composed Hydra config as the entry points see it, with all paths under ``workdir``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from busi_mtl.utils.paths import CONFIG_DIR

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name, return_hydra_config=True, overrides=list(overrides))
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(workdir)
        cfg.paths.output_dir = str(workdir / "run")
        del cfg.hydra
    return cfg


#: A CPU-sized training config: tiny synthetic set, 64 px, small U-Net, two epochs.
TINY_TRAIN = [
    "experiment=demo",
    "data.synthetic.per_class=8",
    "data.image_size=64",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.val_fraction=0.2",
    "data.test_fraction=0.2",
    "model.decoder_channels=[32,16,8,8,8]",
    "model.head_hidden=[16]",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "trainer.accelerator=cpu",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One real (tiny) training run through busi_mtl.train, shared by the tests of what comes after it."""
    from busi_mtl.train import train

    workdir = tmp_path_factory.mktemp("trained")
    overrides = [*TINY_TRAIN, "logger=many", "postprocess.normal_gate=0.5", "num_threads=1"]
    threads = torch.get_num_threads()
    try:
        metrics = train(compose_config("train", overrides, workdir))
    finally:  # the setting is process-wide: the rest of the suite keeps its cores
        torch.set_num_threads(threads)
    return workdir / "run", metrics
