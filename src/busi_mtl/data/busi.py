"""Read the BUSI folder layout into a manifest, and decode its images and masks safely.

The layout, as distributed (Al-Dhabyani et al., 2020)::

    ROOT/{benign,malignant,normal}/<class> (N).png
    ROOT/<class>/<class> (N)_mask.png, optionally <class> (N)_mask_1.png, _mask_2.png (union = lesion)

Every problem a real download has is either handled (RGB images, RGB/RGBA/0-1 masks, several masks,
mask/image size mismatch) or reported as a :class:`BUSIDataError` that names the file and the fix.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pandas as pd

from busi_mtl.data import CLASSES

log = logging.getLogger(__name__)

#: What to do with a benign/malignant image that has no mask: refuse, leave it out, or (audits only) keep it.
MissingMaskPolicy = Literal["error", "skip", "keep"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MASK_RE = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<k>\d+))?$")
_NUMBER_RE = re.compile(r"\((\d+)\)")
LAYOUT_HELP = (
    "Expected the BUSI layout: ROOT/benign, ROOT/malignant, ROOT/normal, each holding '<class> (N).png' "
    "images and '<class> (N)_mask.png' masks (extra masks '_mask_1.png', ...). Download BUSI "
    "(Al-Dhabyani et al. 2020, 'Dataset_BUSI_with_GT') and point data.root at that folder, or make a "
    "synthetic set with `python -m busi_mtl.data.synthetic --out data/synthetic --per-class 50` "
    "(or train with data=synthetic)."
)


class BUSIDataError(ValueError):
    """Bad input data: the message names the file, what is wrong and how to fix it."""


def png_header(path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit_depth, colour_type) from a PNG's IHDR chunk, without decoding pixels.

    Cheap enough to run on every file of a dataset at start-up, so non-PNG files, zero-byte files and
    16-bit images are refused before any training starts.
    """
    try:
        with path.open("rb") as fh:
            head = fh.read(33)
    except OSError as err:
        raise BUSIDataError(f"{path}: cannot be read ({err}).") from err
    if not head:
        raise BUSIDataError(f"{path}: file is empty (0 bytes); re-copy it from the original dataset.")
    if not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        raise BUSIDataError(
            f"{path}: not a PNG file (bad signature) although it is named .png; "
            "replace it with the original image or remove it."
        )
    width, height, bit_depth, colour_type = struct.unpack(">IIBB", head[16:26])
    if bit_depth == 16:
        raise BUSIDataError(
            f"{path}: 16-bit PNG; BUSI images and masks are 8-bit. Convert it first, e.g. "
            "`cv2.imwrite(out, (img / 257).astype('uint8'))`, so intensities keep their meaning."
        )
    return width, height, bit_depth, colour_type


def read_png(path: str | Path) -> np.ndarray:
    """Decode a PNG (any channel layout) to a uint8 array, or raise a BUSIDataError naming the file."""
    path = Path(path)
    png_header(path)
    img = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise BUSIDataError(
            f"{path}: cannot be decoded (truncated or corrupt PNG); re-copy it from the original dataset."
        )
    return img


def to_gray(img: np.ndarray) -> np.ndarray:
    """One grayscale channel from gray, BGR or BGRA pixels (alpha dropped): BUSI ships RGB copies of gray scans."""
    if img.ndim == 2:
        return img
    if img.shape[2] == 1:
        return img[..., 0]
    if img.shape[2] == 4:
        img = img[..., :3]
    return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2GRAY)


def load_image(path: str | Path) -> np.ndarray:
    """The ultrasound image as uint8 (H, W)."""
    return to_gray(read_png(path))


def load_mask(mask_paths: Sequence[str | Path], shape: tuple[int, int]) -> np.ndarray:
    """Union of an image's masks as uint8 (H, W) in {0, 1}; no masks means no lesion.

    Masks may be gray, RGB or RGBA with values {0, 255} or {0, 1}; any other value means the file is not a
    label mask (e.g. a JPEG-compressed or anti-aliased export) and is refused rather than guessed at.
    A mask whose size differs from its image but has its aspect ratio (a rescaled export) is resized with
    nearest neighbour, with a warning; a different aspect ratio means a wrong file and is an error.
    """
    union = np.zeros(shape, dtype=np.uint8)
    for mask_path in mask_paths:
        raw = read_png(mask_path)
        values = np.unique(raw[..., :3] if raw.ndim == 3 else raw)
        bad = np.setdiff1d(values, [0, 1, 255])
        if bad.size:
            raise BUSIDataError(
                f"{mask_path}: mask has values {bad[:8].tolist()} besides 0/1/255; a label mask must be "
                "binary. Re-export it losslessly (PNG, no anti-aliasing) or threshold it yourself."
            )
        mask = raw > 0 if raw.ndim == 2 else (raw[..., :3] > 0).any(axis=2)
        if mask.shape != shape:
            mask_aspect, image_aspect = mask.shape[1] / mask.shape[0], shape[1] / shape[0]
            if abs(mask_aspect / image_aspect - 1) > 0.05:
                raise BUSIDataError(
                    f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {shape[1]}x{shape[0]}, "
                    "a different aspect ratio: it is probably not this image's mask. Re-export the mask "
                    "at the image's size."
                )
            log.warning(
                "%s: mask is %dx%d but its image is %dx%d; resized with nearest neighbour.",
                mask_path,
                mask.shape[1],
                mask.shape[0],
                shape[1],
                shape[0],
            )
            mask = cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
        union |= mask.astype(np.uint8)
    return union


def _natural_key(stem: str) -> tuple[str, int]:
    match = _NUMBER_RE.search(stem)
    return (stem[: match.start()] if match else stem, int(match.group(1)) if match else -1)


def _scan_class(folder: Path, cls: str, on_missing_mask: MissingMaskPolicy) -> list[dict]:
    """Rows for one class folder; raises on anything that would make a label or mask untrustworthy."""
    pngs = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")
    ignored = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() != ".png")
    if ignored:
        log.warning("%s: ignoring %d non-PNG file(s): %s", folder, len(ignored), ", ".join(ignored[:5]))
    masks: dict[str, list[tuple[int, Path]]] = {}
    images: dict[str, Path] = {}
    for path in pngs:
        match = MASK_RE.match(path.stem)
        if match:
            masks.setdefault(match["stem"], []).append((int(match["k"] or 0), path))
        else:
            images[path.stem] = path
    for stem in sorted(set(masks) - set(images)):
        log.warning("%s: mask(s) %s have no image '%s.png'; ignored.", folder, masks[stem][0][1].name, stem)

    rows = []
    for stem in sorted(images, key=_natural_key):
        prefix = stem.split(" (")[0].lower()
        if prefix in CLASSES and prefix != cls:
            raise BUSIDataError(
                f"{images[stem]}: file name says '{prefix}' but it is in the '{cls}' folder; "
                "the label would be ambiguous. Move or rename the file."
            )
        mask_paths = [p for _, p in sorted(masks.get(stem, []))]
        if not mask_paths and cls != "normal":
            message = f"{images[stem]}: {cls} image without a mask (expected '{stem}_mask.png' beside it)."
            if on_missing_mask == "skip":
                log.warning("%s Skipped (data.on_missing_mask=skip).", message)
                continue
            if on_missing_mask == "error":
                raise BUSIDataError(
                    f"{message} Add the mask, or set data.on_missing_mask=skip to leave such images out."
                )
        width, height, _, colour_type = png_header(images[stem])
        mask_sizes = {png_header(p)[:2] for p in mask_paths}
        rows.append(
            {
                "id": stem,
                "class": cls,
                "label": CLASSES.index(cls),
                "image_path": str(images[stem]),
                "mask_paths": tuple(str(p) for p in mask_paths),
                "n_masks": len(mask_paths),
                "width": width,
                "height": height,
                "rgb": colour_type in (2, 6),
                "mask_size_mismatch": any(size != (width, height) for size in mask_sizes),
            }
        )
    return rows


def scan_busi(
    root: str | Path,
    on_missing_mask: MissingMaskPolicy = "error",
    required_classes: Iterable[str] = CLASSES,
) -> pd.DataFrame:
    """Manifest of a BUSI-layout folder: one row per image with its class, label, mask paths and size.

    Class folders in ``required_classes`` must exist and be non-empty; the others of ``CLASSES`` are read
    when present (external test sets often have no normal images). Only PNG headers are read here; pixels
    are decoded (and verified) by preprocessing.
    """
    if on_missing_mask not in ("error", "skip", "keep"):
        raise ValueError(f"on_missing_mask must be 'error', 'skip' or 'keep', got {on_missing_mask!r}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise BUSIDataError(f"Dataset root {root} does not exist or is not a folder. {LAYOUT_HELP}")
    required = set(required_classes)
    present = [cls for cls in CLASSES if (root / cls).is_dir()]
    missing = sorted(required - set(present))
    if missing:
        raise BUSIDataError(f"{root}: class folder(s) {missing} missing. {LAYOUT_HELP}")

    rows: list[dict] = []
    for cls in present:
        class_rows = _scan_class(root / cls, cls, on_missing_mask)
        if not class_rows and cls in required:
            raise BUSIDataError(f"{root / cls}: class folder holds no images. {LAYOUT_HELP}")
        rows.extend(class_rows)
    manifest = pd.DataFrame(rows)
    if manifest["id"].duplicated().any():
        # Generic datasets may reuse file names across class folders; class-prefixed ids stay unique.
        manifest["id"] = manifest["class"] + "/" + manifest["id"]
    counts = manifest["class"].value_counts().reindex(present, fill_value=0)
    log.info(
        "Read %d images from %s: %s (%d with several masks).",
        len(manifest),
        root,
        ", ".join(f"{cls} {n}" for cls, n in counts.items()),
        int((manifest["n_masks"] > 1).sum()),
    )
    return manifest.reset_index(drop=True)
