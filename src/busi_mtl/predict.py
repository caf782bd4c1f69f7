"""Predict on new images: ``python -m busi_mtl.predict ckpt_path=... input=IMAGE_OR_FOLDER [output=DIR]``.

For every image (PNG/JPG/BMP/TIFF, gray or RGB, any size) writes the lesion mask at the image's original
resolution (``masks/<name>_mask.png``), an overlay with the contour, the predicted class and its
probability (``overlays/<name>_overlay.png``), and one row of ``predictions.csv`` (class probabilities,
predicted class, lesion area in pixels). Preprocessing is rebuilt from the checkpoint, so it always
matches training. Files that cannot be read are listed in the CSV with the reason and skipped.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from rich.progress import track

from busi_mtl.data import CLASSES
from busi_mtl.data.busi import MASK_RE, to_gray
from busi_mtl.data.transforms import Preprocessing, preprocess_image, restore_size
from busi_mtl.models.module import MultiTaskModule, load_module, read_checkpoint
from busi_mtl.postprocess import full_size_masks
from busi_mtl.utils.paths import CONFIG_DIR
from busi_mtl.utils.run import resolve_device, task_wrapper
from busi_mtl.visualize import draw_overlay

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
COLUMNS = [
    "file",
    *(f"p_{c}" for c in CLASSES),
    "pred_class",
    "lesion_area_px",
    "height",
    "width",
    "mask",
    "error",
]


class UnreadableImage(ValueError):
    """An input file that is not a decodable image."""


def read_image(path: Path) -> np.ndarray:
    """Any common image file as uint8 grayscale; 16-bit images are scaled to 8 bits."""
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise UnreadableImage("empty file")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise UnreadableImage("not a decodable image (corrupt, truncated or another format)")
    if image.dtype == np.uint16:
        image = (image / 257).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        raise UnreadableImage(f"unsupported pixel type {image.dtype}")
    return to_gray(image)


def list_inputs(source: Path) -> list[Path]:
    """The image files to predict: ``source`` itself, or the images directly inside it (BUSI masks skipped)."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"input={source}: no such file or folder.")
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    masks = [p for p in files if MASK_RE.match(p.stem)]
    if masks:
        log.info("Skipping %d BUSI-style mask files (*_mask*.png) in %s.", len(masks), source)
    files = [p for p in files if p not in masks]
    if not files:
        raise FileNotFoundError(f"input={source}: no images ({', '.join(IMAGE_SUFFIXES)}) inside.")
    return files


def safe_names(files: Sequence[Path]) -> list[str]:
    """Output base names from input names: one path component, no leading dots, unique."""
    names, seen = [], set()
    for path in files:
        base = re.sub(r"[^\w ()+,.=@-]", "_", path.stem).lstrip(".") or "image"
        name, k = base, 1
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        seen.add(name)
        names.append(name)
    return names


def inside(folder: Path, path: Path) -> Path:
    """``path`` if it resolves inside ``folder``; refuses anything that would escape it."""
    resolved = path.resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise ValueError(f"refusing to write {path}: outside the output folder {folder}")
    return resolved


@dataclass
class Predictor:
    """A checkpoint's network with its own preprocessing, for images of any size."""

    module: MultiTaskModule
    preprocessing: Preprocessing
    threshold: float
    tta: bool = False

    @classmethod
    def from_checkpoint(
        cls, ckpt_path: str | Path, device: str = "auto", tta: bool = False, threshold: float | None = None
    ) -> Predictor:
        ckpt = read_checkpoint(ckpt_path)
        if "datamodule_hyper_parameters" not in ckpt:
            raise ValueError(
                f"{ckpt_path}: no preprocessing settings inside; was it written by busi_mtl.train?"
            )
        module = load_module(ckpt, map_location=resolve_device(device))
        preprocessing = Preprocessing.from_hparams(ckpt["datamodule_hyper_parameters"])
        return cls(module, preprocessing, module.hparams.threshold if threshold is None else threshold, tta)

    @torch.no_grad()
    def network(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Lesion probability maps at the network's resolution (N, S, S), and class probabilities (N, 3)."""
        batch = np.stack([preprocess_image(im, self.preprocessing) for im in images])
        x = torch.from_numpy(batch).to(self.module.device).float().div_(255).unsqueeze(1)
        probs, classes = self.module.probabilities(x, self.tta)
        return probs[:, 0].cpu().numpy(), classes.cpu().numpy()

    def __call__(self, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        """Lesion probability maps at each image's own size, and class probabilities (N, 3)."""
        small, classes = self.network(images)
        keep_aspect = self.preprocessing.keep_aspect
        full = [restore_size(p, *im.shape[:2], keep_aspect) for p, im in zip(small, images, strict=True)]
        return full, classes

    def masks(self, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        """The delivered lesion masks (uint8 0/1, each image's own size; the checkpoint's threshold and
        post-processing), and class probabilities (N, 3)."""
        small, classes = self.network(images)
        masks = [
            full_size_masks(
                p, *im.shape[:2], self.preprocessing.keep_aspect, self.threshold, self.module.postprocess, c
            )[1].astype(np.uint8)
            for p, im, c in zip(small, images, classes, strict=True)
        ]
        return masks, classes


def _batches(files: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(files), size):
        yield files[start : start + size]


def predict_folder(predictor: Predictor, source: Path, output: Path, batch_size: int = 8) -> pd.DataFrame:
    """Predict every image under ``source`` into ``output``; returns the predictions table."""
    files = list_inputs(source)
    names = dict(zip(files, safe_names(files), strict=True))
    (output / "masks").mkdir(parents=True, exist_ok=True)
    (output / "overlays").mkdir(parents=True, exist_ok=True)
    rows = []
    chunks = list(_batches(files, batch_size))
    for chunk in track(chunks, description=f"Predicting {len(files)} images", total=len(chunks)):
        readable, images = [], []
        for path in chunk:
            try:
                images.append(read_image(path))
                readable.append(path)
            except (UnreadableImage, OSError) as err:
                log.warning("%s: skipped, %s", path, err)
                rows.append({"file": str(path), "error": str(err)})
        if not readable:
            continue
        masks, class_probs = predictor.masks(images)
        for path, image, mask, cls_prob in zip(readable, images, masks, class_probs, strict=True):
            label = CLASSES[int(cls_prob.argmax())]
            mask_path = inside(output, output / "masks" / f"{names[path]}_mask.png")
            overlay_path = inside(output, output / "overlays" / f"{names[path]}_overlay.png")
            cv2.imwrite(str(mask_path), mask * 255)
            lines = [
                f"{label} {cls_prob.max():.2f}",
                " ".join(f"{c[:3]} {p:.2f}" for c, p in zip(CLASSES, cls_prob, strict=True)),
            ]
            overlay = draw_overlay(image, mask, None, lines)
            cv2.imwrite(str(overlay_path), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
            rows.append(
                {
                    "file": str(path),
                    **{f"p_{c}": float(p) for c, p in zip(CLASSES, cls_prob, strict=True)},
                    "pred_class": label,
                    "lesion_area_px": int(mask.sum()),
                    "height": image.shape[0],
                    "width": image.shape[1],
                    "mask": str(mask_path.relative_to(output.resolve())),
                }
            )
    table = pd.DataFrame(rows, columns=COLUMNS).astype(
        {"lesion_area_px": "Int64", "height": "Int64", "width": "Int64"}
    )
    table["error"] = table["error"].fillna("")
    table.to_csv(output / "predictions.csv", index=False)
    failed = int((table["error"] != "").sum())
    log.info(
        "Predicted %d images into %s (%d unreadable, listed in predictions.csv).",
        len(table) - failed,
        output,
        failed,
    )
    if failed == len(table):
        raise RuntimeError(
            f"input={source}: none of the {failed} files could be read; see {output / 'predictions.csv'}."
        )
    return table


@task_wrapper
def predict(cfg: DictConfig) -> pd.DataFrame:
    predictor = Predictor.from_checkpoint(cfg.ckpt_path, cfg.device, cfg.tta, cfg.threshold)
    return predict_folder(
        predictor, Path(cfg.input).expanduser(), Path(cfg.output).expanduser(), cfg.batch_size
    )


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
