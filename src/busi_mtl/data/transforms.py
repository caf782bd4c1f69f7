"""Preprocessing (decoded, denoised and resized once, cached on disk) and albumentations pipelines.

Offline, once per dataset and setting: grayscale -> optional speckle reduction at native resolution ->
optional CLAHE -> resize (optionally letterboxed to keep the aspect ratio) -> uint8 arrays in a cache
folder keyed by a hash of the files and the settings. Online, per sample: augmentation (train only) on
those uint8 arrays. Intensity normalisation (z-score with the train split's mean/std) is the network's
first layer, so checkpoints and exported models carry it and cannot be fed mismatched statistics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import albumentations as A
import cv2
import numpy as np
import pandas as pd

from busi_mtl.data.audit import dhash
from busi_mtl.data.busi import load_image, load_mask

log = logging.getLogger(__name__)

Denoise = Literal["none", "median", "bilateral", "nlm"]
CACHE_VERSION = 1


@dataclass(frozen=True)
class Preprocessing:
    """Settings of the cached, deterministic part of preprocessing; its hash names the cache."""

    image_size: int = 256
    keep_aspect: bool = False
    denoise: Denoise = "none"
    clahe: bool = False
    hash_size: int = 16

    @classmethod
    def from_hparams(cls, hparams: dict) -> Preprocessing:
        """The preprocessing part of a datamodule's saved hyperparameters (e.g. from a checkpoint)."""
        return cls(**{f.name: hparams[f.name] for f in fields(cls) if f.name in hparams})

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.image_size % 32:
            raise ValueError(
                f"data.image_size={self.image_size} must be a positive multiple of 32 "
                "(the U-Net encoders downsample five times by 2)."
            )
        if self.denoise not in ("none", "median", "bilateral", "nlm"):
            raise ValueError(f"data.denoise={self.denoise!r}: choose none, median, bilateral or nlm.")


def reduce_speckle(image: np.ndarray, method: Denoise) -> np.ndarray:
    """OpenCV speckle reduction tuned to log-compressed B-mode speckle (grey-level std ~25-30)."""
    if method == "median":
        return cv2.medianBlur(image, 5)
    if method == "bilateral":
        return cv2.bilateralFilter(image, d=9, sigmaColor=40, sigmaSpace=7)
    if method == "nlm":
        return cv2.fastNlMeansDenoising(image, h=20, templateWindowSize=7, searchWindowSize=21)
    return image


def letterbox_pad(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding that makes an image square, centred."""
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return top, side - height - top, left, side - width - left


def resize_square(array: np.ndarray, size: int, keep_aspect: bool, is_mask: bool = False) -> np.ndarray:
    """Resize to size x size; masks via area interpolation then threshold, which keeps thin lesions."""
    if keep_aspect:
        top, bottom, left, right = letterbox_pad(*array.shape[:2])
        array = cv2.copyMakeBorder(array, top, bottom, left, right, cv2.BORDER_CONSTANT, value=0)
    if is_mask:
        area = cv2.resize(array.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
        return (area >= 0.5).astype(np.uint8)
    return cv2.resize(array, (size, size), interpolation=cv2.INTER_AREA)


def restore_size(prob: np.ndarray, height: int, width: int, keep_aspect: bool) -> np.ndarray:
    """Inverse of :func:`resize_square` for a float map: back to the original height x width."""
    if not keep_aspect:
        return cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)
    side = max(height, width)
    top, _, left, _ = letterbox_pad(height, width)
    square = cv2.resize(prob, (side, side), interpolation=cv2.INTER_LINEAR)
    return square[top : top + height, left : left + width]


def preprocess_image(image: np.ndarray, settings: Preprocessing) -> np.ndarray:
    """The deterministic image path shared by training, evaluation and prediction."""
    image = reduce_speckle(image, settings.denoise)
    if settings.clahe:
        image = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(image)
    return resize_square(image, settings.image_size, settings.keep_aspect)


def _cache_key(manifest: pd.DataFrame, settings: Preprocessing) -> str:
    """Hash of the settings and of every input file's path, size and mtime."""
    files = []
    for paths in [[p] for p in manifest["image_path"]] + [list(m) for m in manifest["mask_paths"]]:
        for p in paths:
            stat = os.stat(p)
            files.append((os.path.abspath(p), stat.st_size, stat.st_mtime_ns))
    payload = json.dumps({"v": CACHE_VERSION, "settings": asdict(settings), "files": files}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _process_one(image_path: str, mask_paths: tuple[str, ...], settings: Preprocessing):
    image = load_image(image_path)
    mask = load_mask(mask_paths, image.shape)
    return (
        preprocess_image(image, settings),
        resize_square(mask, settings.image_size, settings.keep_aspect, is_mask=True),
        dhash(image, settings.hash_size),
    )


@dataclass
class CachedArrays:
    """Preprocessed dataset in manifest order: images/masks (N, S, S) uint8 (memory-mapped), hashes (N, B)."""

    images: np.ndarray
    masks: np.ndarray
    hashes: np.ndarray
    ids: list[str]
    path: Path

    def __getstate__(self) -> dict:
        """Pickle the cache location, not the pixels: spawned DataLoader workers re-map the files."""
        return {**self.__dict__, "images": None, "masks": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.images = np.load(self.path / "images.npy", mmap_mode="r")
        self.masks = np.load(self.path / "masks.npy", mmap_mode="r")


def build_cache(manifest: pd.DataFrame, settings: Preprocessing, cache_dir: str | Path) -> CachedArrays:
    """Preprocess every image once (threads; OpenCV releases the GIL) or reuse a matching cache."""
    folder = Path(cache_dir) / _cache_key(manifest, settings)
    done = folder / "meta.json"
    if not done.exists():
        log.info("Preprocessing %d images into %s (%s) ...", len(manifest), folder, settings)
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            results = list(
                pool.map(
                    _process_one, manifest["image_path"], manifest["mask_paths"], [settings] * len(manifest)
                )
            )
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, index in (("images", 0), ("masks", 1), ("hashes", 2)):
            np.save(tmp / f"{name}.npy", np.stack([r[index] for r in results]))
        meta = {"ids": manifest["id"].tolist(), "settings": asdict(settings), "version": CACHE_VERSION}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            tmp.rename(folder)  # atomic: a half-written cache is never picked up
        except OSError:  # another process finished first; use its copy
            log.info("Cache %s was written concurrently; using it.", folder)
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        log.info("Using cached preprocessing %s", folder)
    meta = json.loads(done.read_text())
    return CachedArrays(
        images=np.load(folder / "images.npy", mmap_mode="r"),
        masks=np.load(folder / "masks.npy", mmap_mode="r"),
        hashes=np.load(folder / "hashes.npy"),
        ids=meta["ids"],
        path=folder,
    )


def train_augmentation(strength: float = 1.0, seed: int | None = None) -> A.Compose:
    """Joint image/mask augmentation for B-mode scans; ``strength`` scales every magnitude.

    Horizontal flips only: a vertical flip would put the skin line at the bottom and turn posterior
    shadowing into something no probe produces.
    """
    s = float(strength)
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.Affine(
                scale=(1 - 0.15 * s, 1 + 0.15 * s),
                translate_percent=(-0.06 * s, 0.06 * s),
                rotate=(-12 * s, 12 * s),
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=0.7,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.2 * s, contrast_limit=0.2 * s, p=0.5),
            A.RandomGamma(gamma_limit=(100 - 25 * s, 100 + 25 * s), p=0.3),
            A.OneOf(
                [
                    A.GaussNoise(std_range=(0.01, 0.01 + 0.04 * s)),
                    A.MultiplicativeNoise(multiplier=(1 - 0.15 * s, 1 + 0.15 * s), elementwise=True),
                    A.GaussianBlur(blur_limit=(3, 5)),
                ],
                p=0.3,
            ),
            A.OneOf(
                [
                    A.ElasticTransform(alpha=30 * s, sigma=6, border_mode=cv2.BORDER_CONSTANT),
                    A.GridDistortion(distort_limit=0.2 * s, border_mode=cv2.BORDER_CONSTANT),
                ],
                p=0.2,
            ),
        ],
        seed=seed,
    )
