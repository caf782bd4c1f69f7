"""Synthetic breast-ultrasound images in the exact BUSI folder layout.

The real BUSI set (Al-Dhabyani et al. 2020) is not redistributable here, so the quickstart and every test run on
this generator instead. Images are simulated B-mode frames (scatterer speckle, layered breast anatomy, depth
attenuation, log compression), and lesions follow the BI-RADS descriptors radiologists use: benign ones are oval,
circumscribed and wider-than-tall; malignant ones are irregular, spiculated and taller-than-wide. Brightness is
deliberately *not* a class cue, so a model has to learn shape and margin.

With ``quirks=True`` a deterministic fraction of files carries the irregularities of the distributed BUSI
(multiple masks per image, RGB/RGBA/{0,1} masks, RGB images, varied sizes, a normal image without a mask) so
that the loader is exercised on them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from busi_mtl.data import CLASSES

GENERATOR_VERSION = "1.0.0"
#: (height, width) of every image when quirks are off: roughly the median BUSI frame.
DEFAULT_SIZE: tuple[int, int] = (450, 500)
#: File names the real BUSI uses (and nothing else), e.g. ``benign (12)_mask_1.png``.
FILE_NAME_RE = re.compile(r"^(benign|malignant|normal) \(\d+\)(_mask(_\d+)?)?\.png$")
MASK_ENCODINGS = ("gray", "rgb", "rgba", "binary")
#: Quirks are stratified over consecutive blocks of this many indices, so every full block holds each quirk.
QUIRK_BLOCK = 20

# Independent random streams per case; the tag keeps them from ever sharing a seed sequence.
_RENDER_STREAM, _LAYOUT_STREAM, _QUIRK_STREAM = 0, 1, 2
_CAPTIONS = ("RT BREAST", "LT BREAST", "RT 10:00 3CM FN", "LT 2:00 4CM FN", "RT AXILLA", "TRANS", "LONG")


@dataclass(frozen=True)
class CasePlan:
    """Everything about one file set that is decided before rendering (size, lesion count, file quirks)."""

    height: int
    width: int
    n_lesions: int  # lesions rendered; one mask file each (normal: 0)
    write_mask: bool  # False only for the quirky normal images that ship without a mask
    mask_encoding: str  # one of MASK_ENCODINGS
    rgb_image: bool


def plan_case(seed: int, label: str, index: int, quirks: bool = True) -> CasePlan:
    """Decide size and file quirks of case ``index`` (1-based) from (seed, class, index) alone.

    Quirks are stratified: within each block of QUIRK_BLOCK indices every quirk dimension draws one value per
    1/QUIRK_BLOCK stratum, so rates are exact per block and small datasets still hit every quirk, while the plan
    of case k never depends on how many cases are generated.
    """
    if index < 1:
        raise ValueError(f"BUSI numbering starts at 1, got index={index}")
    class_id = CLASSES.index(label)
    lesion = label != "normal"
    if not quirks:
        return CasePlan(
            *DEFAULT_SIZE, n_lesions=int(lesion), write_mask=True, mask_encoding="gray", rgb_image=False
        )
    block, pos = divmod(index - 1, QUIRK_BLOCK)
    qrng = np.random.default_rng([seed, class_id, block, _QUIRK_STREAM])
    strata = qrng.permuted(np.tile(np.arange(QUIRK_BLOCK), (4, 1)), axis=1)[:, pos]
    u_multi, u_mask, u_rgb, u_nomask = (strata + qrng.random((4, QUIRK_BLOCK))[:, pos]) / QUIRK_BLOCK
    lrng = np.random.default_rng([seed, class_id, index, _LAYOUT_STREAM])
    height, width = int(lrng.integers(330, 561)), int(lrng.integers(380, 641))
    n_lesions = 0
    if lesion:  # ~8% two lesions; the first-stratum case of block 0 gets three (one per lesion class)
        n_lesions = 3 if block == 0 and u_multi < 1 / QUIRK_BLOCK else 2 if u_multi < 0.08 else 1
    encoding = "rgb" if u_mask < 0.10 else "rgba" if u_mask < 0.15 else "binary" if u_mask < 0.20 else "gray"
    return CasePlan(height, width, n_lesions, lesion or u_nomask >= 0.05, encoding, bool(u_rgb < 0.10))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell_y: float, cell_x: float) -> np.ndarray:
    """Zero-mean, unit-std random field correlated over about (cell_y, cell_x) px: cheap tissue texture."""
    gh, gw = int(h / cell_y) + 4, int(w / cell_x) + 4
    field = cv2.resize(
        rng.standard_normal((gh, gw)).astype(np.float32),
        None,
        fx=cell_x,
        fy=cell_y,
        interpolation=cv2.INTER_CUBIC,
    )[int(cell_y) : int(cell_y) + h, int(cell_x) : int(cell_x) + w]
    return (field - field.mean()) / (field.std() + 1e-6)


def _boundary(rng: np.random.Generator, w: int, mean: float, amp: float) -> np.ndarray:
    """A wavy tissue interface y(x): random low-frequency sinusoids plus a smoothed random walk."""
    x = np.arange(w, dtype=np.float32) / w
    y = np.full(w, mean, dtype=np.float32)
    for f in rng.uniform(0.2, 2.5, 3):
        y += amp * rng.normal() / (1 + f) * np.sin(2 * np.pi * f * x + rng.uniform(0, 2 * np.pi))
    walk = cv2.GaussianBlur(np.cumsum(rng.normal(0, 1, w)).astype(np.float32)[None], (0, 0), 0.03 * w).ravel()
    return y + 0.5 * amp * (walk - walk.mean()) / (walk.std() + 1e-6)


def _streak(canvas: np.ndarray, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, value: float) -> None:
    """Polyline whose echo strength wanders along it and fades at the ends, as specular interfaces do."""
    n = len(x)
    bright = value * np.exp(0.12 * np.cumsum(rng.normal(0, 1, n))) * np.sqrt(np.sin(np.linspace(0, np.pi, n)))
    pts = np.round(np.stack([x, y], 1) * 16).astype(np.int32)
    thickness = int(rng.integers(1, 5))
    for i in range(n - 1):
        cv2.line(canvas, tuple(pts[i]), tuple(pts[i + 1]), float(bright[i]), thickness, cv2.LINE_8, shift=4)


def _curve(
    canvas: np.ndarray,
    rng: np.random.Generator,
    start: tuple[float, float],
    slope: float,
    bend: float,
    value: float,
) -> None:
    """One gently curved streak (ligament, septum, muscle fibre) from ``start``, heading along ``slope``."""
    t = np.linspace(0, 1, 16)
    length = rng.uniform(0.15, 0.6) * canvas.shape[1]
    y = start[1] + slope * length * t + bend * np.sin(np.pi * t * rng.uniform(0.5, 2))
    _streak(canvas, rng, start[0] + length * t, y, value)


def _tissue(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Echogenicity (scatterer amplitude) of normal breast: skin, fat lobules, gland with ligaments, muscle.

    Also returns the fat/gland and gland/muscle interfaces y(x), so lesions can be put in the gland layer.
    """
    yy = np.arange(h, dtype=np.float32)[:, None]
    skin = rng.uniform(0.01, 0.03) * h
    dermis = skin + rng.uniform(0.025, 0.045) * h
    fat_end = _boundary(rng, w, rng.uniform(0.17, 0.33) * h, 0.05 * h)
    gland_end = _boundary(rng, w, rng.uniform(0.62, 0.85) * h, 0.04 * h)
    gland_end += max(0.0, float(np.max(fat_end + 0.2 * h - gland_end)))  # keep the gland at least 0.2 h thick
    fat, gland, muscle = rng.uniform(0.3, 0.5), rng.uniform(0.8, 1.3), rng.uniform(0.25, 0.4)
    echo = np.where(yy < dermis, 1.5, np.where(yy < fat_end, fat, np.where(yy < gland_end, gland, muscle)))
    echo = cv2.GaussianBlur(echo.astype(np.float32), (0, 0), 2)
    lobules = np.ones_like(echo)  # hypoechoic fat lobules: round-ish in the fat, flat islands in the gland
    for _ in range(int(rng.integers(10, 25))):
        x, in_fat = int(rng.uniform(0, w)), rng.random() < 0.5
        top, bot = (dermis, fat_end[x]) if in_fat else (fat_end[x], gland_end[x])
        half_height = (rng.uniform(0.15, 0.35) if in_fat else rng.uniform(0.08, 0.15)) * max(bot - top, 8)
        axes = (int(rng.uniform(0.04, 0.14) * w), int(half_height))
        centre = (x, int(rng.uniform(top, max(bot, top + 1))))
        cv2.ellipse(lobules, centre, axes, rng.uniform(-15, 15), 0, 360, rng.uniform(0.35, 0.7), -1)
    echo *= cv2.GaussianBlur(lobules, (0, 0), rng.uniform(2, 4))
    echo *= np.exp(0.4 * _smooth_noise(rng, h, w, 8, 28) + 0.15 * _smooth_noise(rng, h, w, 3, 12))
    lines = np.zeros_like(echo)
    # Cooper's ligaments and gland septa: curvilinear, roughly parallel to the tissue planes
    planes = rng.uniform(-0.15, 0.15)
    for _ in range(int(rng.integers(10, 25))):
        x0 = rng.uniform(-0.2, 0.9) * w
        start = (x0, rng.uniform(dermis, gland_end[int(np.clip(x0, 0, w - 1))]))
        _curve(lines, rng, start, planes + rng.normal(0, 0.06), rng.uniform(-12, 12), rng.uniform(3, 8))
    for _ in range(int(rng.integers(3, 8))):  # arcs of septa over fat lobules
        centre = (int(rng.uniform(0, w)), int(rng.uniform(dermis, fat_end.mean())))
        axes = (int(rng.uniform(0.05, 0.15) * w), int(rng.uniform(0.03, 0.08) * h))
        arc = rng.uniform(160, 200)
        cv2.ellipse(lines, centre, axes, rng.uniform(-10, 10), arc, arc + 180, rng.uniform(1.5, 3.5), 1)
    xs = np.linspace(0, w - 1, 32)
    for yb, bright in ((fat_end, 1.5), (gland_end, 2.5)):  # superficial and pectoral fascia
        _streak(lines, rng, xs, np.interp(xs, np.arange(w), yb), bright * rng.uniform(0.6, 1.2))
    fibres = np.zeros_like(echo)  # pectoral muscle: short, parallel, slightly oblique fibres
    slope = np.tan(np.radians(rng.uniform(-8, 8)))
    for _ in range(int(rng.integers(15, 35))):
        start = (rng.uniform(-0.2, 0.9) * w, rng.uniform(0.5, 1.1) * h)
        _curve(fibres, rng, start, slope, rng.uniform(-3, 3), rng.uniform(1.0, 2.5))
    lines = np.maximum(lines, np.where(yy > gland_end + 3, fibres, 0))
    lines[: int(dermis)] = 0
    lines[int(skin) : int(skin + rng.uniform(2, 4))] = 5.0  # skin entry echo
    echo = np.maximum(echo, cv2.GaussianBlur(lines, (0, 0), 1.8, sigmaY=1.0))
    return echo, fat_end, gland_end


def _lesion_outline(label: str, rng: np.random.Generator, width_px: float) -> np.ndarray:
    """Lesion boundary as (N, 2) points around the origin whose bounding box is ``width_px`` wide.

    A radial function r(theta) sets the margin: benign gets a smooth oval (optionally gently macrolobulated),
    malignant gets lobulation, a jagged high-harmonic edge, spicules and sometimes angular corners; one
    malignant outline in ten is nearly smooth, as some carcinomas are.
    """
    t = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    r = np.ones_like(t)
    if label == "benign":
        hw, tilt = 1 / rng.uniform(1.3, 2.2), rng.uniform(-0.25, 0.25)
        for k in (2, 3, 4):
            r += rng.normal(0, 0.02) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
        if rng.random() < 0.3:
            r += rng.uniform(0.03, 0.06) * np.cos(int(rng.integers(2, 4)) * t + rng.uniform(0, 2 * np.pi))
    else:
        hw, tilt = rng.uniform(0.9, 1.6), rng.uniform(-0.3, 0.3)
        lobulation, roughness = rng.uniform(0.05, 0.14), rng.uniform(0.02, 0.05)
        circumscribed = rng.random() < 0.1  # some carcinomas (medullary, mucinous) look deceptively benign
        if circumscribed:
            lobulation, roughness = lobulation / 3, roughness / 5
        for k in range(2, 7):  # macro-lobulation
            r += rng.normal(0, lobulation) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
        if not circumscribed and rng.random() < 0.3:  # angular margin: straight edges between a few corners
            knots = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 9))))
            r = np.interp(
                t, knots, np.interp(knots, t, r) * rng.uniform(0.9, 1.15, len(knots)), period=2 * np.pi
            )
        for k in range(7, 19):  # micro-lobulated, jagged outline
            r += rng.normal(0, roughness * np.sqrt(7 / k)) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
        for _ in range(0 if circumscribed else int(rng.integers(0, 6))):  # spiculations
            d = np.angle(np.exp(1j * (t - rng.uniform(0, 2 * np.pi))))
            r += rng.uniform(0.1, 0.4) * np.clip(1 - np.abs(d) / rng.uniform(0.06, 0.16), 0, None) ** 1.5
    r = np.clip(r, 0.35, None)
    x, y = r * np.cos(t), r * np.sin(t) * hw
    x, y = x * np.cos(tilt) - y * np.sin(tilt), x * np.sin(tilt) + y * np.cos(tilt)
    pts = np.stack([x, y], 1)
    return pts * width_px / np.ptp(pts[:, 0])


def _place(
    outline: np.ndarray,
    taken: list[tuple[float, float]],
    h: int,
    w: int,
    rng: np.random.Generator,
    y_band: tuple[float, float],
) -> np.ndarray:
    """Shift (and if needed shrink) an outline into the widest horizontal span free of earlier lesions."""
    gap = 0.04 * w
    edges = [(0.0, 0.0), *sorted(taken), (float(w), float(w))]
    spans = [(e0[1] + gap, e1[0] - gap) for e0, e1 in itertools.pairwise(edges)]
    a, b = max(spans, key=lambda s: s[1] - s[0])
    scale = min(1.0, (b - a) / np.ptp(outline[:, 0]), 0.85 * h / np.ptp(outline[:, 1]))
    outline = outline * scale
    (x0, y0), (x1, y1) = outline.min(0), outline.max(0)
    cx = rng.uniform(a - x0, max(b - x1, a - x0))
    lo, hi = 0.06 * h - y0, 0.97 * h - y1
    cy = np.clip(rng.uniform(*y_band), lo, max(lo, hi))
    return outline + np.array([cx, cy])


def _rasterise(outline: np.ndarray, h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(outline * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    return mask


def _ring(mask: np.ndarray, px: int) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    return (cv2.dilate(mask, kernel) - mask).astype(np.float32)


def _paint_lesion(echo: np.ndarray, mask: np.ndarray, label: str, rng: np.random.Generator) -> None:
    """Render one lesion into ``echo`` in place: interior, margin, calcifications and posterior feature."""
    h, w = echo.shape
    benign = label == "benign"
    # echogenicity relative to the surrounding tissue, drawn from the same distribution for both classes
    surround = float(np.percentile(echo[_ring(mask, 12) > 0], 75))
    level = surround * float(np.exp(rng.uniform(np.log(0.04), np.log(0.4))))
    hetero = rng.uniform(0.05, 0.3) if benign else rng.uniform(0.3, 0.7)
    cell = rng.uniform(5, 12)
    inside = level * np.exp(hetero * _smooth_noise(rng, h, w, cell, 1.5 * cell) - hetero**2 / 2)
    edge_blur = rng.uniform(0.6, 1.4) if benign else rng.uniform(1.0, 2.5)  # circumscribed vs indistinct
    alpha = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), edge_blur)
    echo *= 1 - alpha
    echo += alpha * inside
    if benign and rng.random() < 0.3:  # thin echogenic capsule
        np.maximum(echo, rng.uniform(1.5, 3.0) * cv2.GaussianBlur(_ring(mask, 1), (0, 0), 0.6), out=echo)
    if not benign and rng.random() < 0.35:  # thick, ill-defined echogenic halo
        halo = cv2.GaussianBlur(_ring(mask, int(rng.integers(3, 8))), (0, 0), 2.5)
        echo *= 1 + rng.uniform(0.8, 1.8) * halo
    if rng.random() < (0.1 if benign else 0.5):  # benign: coarse "popcorn"; malignant: microcalcifications
        n_calc, radius = (
            (int(rng.integers(1, 4)), int(rng.integers(2, 4))) if benign else (int(rng.integers(2, 12)), 1)
        )
        ys, xs = np.nonzero(mask)
        for i in rng.choice(len(ys), size=min(n_calc, len(ys)), replace=False):
            cv2.circle(echo, (int(xs[i]), int(ys[i])), radius, rng.uniform(3, 6), -1)
    u = rng.random()
    enhance, shadow = (0.6, 0.1) if benign else (0.15, 0.6)
    if u < enhance + shadow:
        gain = rng.uniform(1.6, 3.0) if u < enhance else rng.uniform(0.2, 0.55)
        rows, cols = mask.any(1), mask.any(0)
        bottom = np.where(cols, h - 1 - np.argmax(mask[::-1], 0), h)
        yy = np.arange(h, dtype=np.float32)[:, None]
        column = cv2.GaussianBlur((yy > bottom).astype(np.float32), (0, 0), 0.12 * cols.sum() + 1, sigmaY=2)
        reach = rng.uniform(1.0, 3.0) * rows.sum()  # fades over a few lesion heights
        fade = np.exp(-np.clip(yy - bottom[cols].max(), 0, None) / reach)
        echo *= 1 + (gain - 1) * column * fade


def speckle_envelope(
    echo: np.ndarray, rng: np.random.Generator, sigma_axial: float, sigma_lateral: float, looks: int = 1
) -> np.ndarray:
    """Envelope of a complex Gaussian scatterer field weighted by ``echo`` and blurred by an anisotropic PSF.

    Normalised so a uniform ``echo`` of 1 gives unit RMS: with one look the envelope is Rayleigh distributed,
    the fully developed speckle of B-mode, with grains wider laterally than axially. Scanners compound several
    looks (independent realisations, averaged in intensity), which is why real BUSI speckle is smoother.
    """
    kx, ky = (2 * int(np.ceil(3 * s)) + 1 for s in (sigma_lateral, sigma_axial))
    energy_x, energy_y = (
        np.sum(cv2.getGaussianKernel(k, s) ** 2) for k, s in ((kx, sigma_lateral), (ky, sigma_axial))
    )
    gain = 1 / (2 * looks * energy_x * energy_y)
    intensity = np.zeros_like(echo, dtype=np.float32)
    for n in rng.standard_normal((2 * looks, *echo.shape), dtype=np.float32):
        intensity += cv2.GaussianBlur(n * echo, (kx, ky), sigma_lateral, sigmaY=sigma_axial) ** 2
    return np.sqrt(gain * intensity)


def _overlays(img: np.ndarray, rng: np.random.Generator, target: tuple[int, int, int, int]) -> None:
    """Scanner clutter found in BUSI: caption text, calipers across the ``target`` box, dark side bands."""
    h, w = img.shape
    if rng.random() < 0.4:
        org = (int(rng.integers(4, 40)), int(rng.integers(14, 30)) if rng.random() < 0.5 else h - 12)
        text, scale, shade = str(rng.choice(_CAPTIONS)), rng.uniform(0.35, 0.55), int(rng.integers(220, 256))
        cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, shade, 1, cv2.LINE_AA)
    if rng.random() < 0.25:
        x, y, bw, bh = target
        for p, q in (((x, y + bh // 2), (x + bw, y + bh // 2)), ((x + bw // 2, y), (x + bw // 2, y + bh))):
            for pt in (p, q):
                cv2.drawMarker(img, pt, 255, cv2.MARKER_CROSS, int(rng.integers(7, 12)), 1)
            n = max(int(np.hypot(q[0] - p[0], q[1] - p[1]) / 5), 1)
            for s in np.linspace(0, 1, n + 1)[1:-1]:
                img[int(p[1] + s * (q[1] - p[1])), int(p[0] + s * (q[0] - p[0]))] = 230
    if rng.random() < 0.15:
        img[:, : int(rng.integers(2, 12))] = 0
        img[:, w - int(rng.integers(2, 12)) :] = 0


def render_case(
    label: str, rng: np.random.Generator, height: int, width: int, *, n_lesions: int = 1
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One B-mode image (uint8 HxW) and its lesion masks (list of uint8 HxW in {0,1}; empty list for normal).

    ``n_lesions`` separate lesions are rendered for benign/malignant (BUSI's multi-mask images); normal images
    never have one, but get lesion-like distractors as often as the other classes.
    """
    if label not in CLASSES:
        raise ValueError(f"label must be one of {CLASSES}, got {label!r}")
    if label != "normal" and n_lesions < 1:
        raise ValueError(f"a {label} case needs at least one lesion, got n_lesions={n_lesions}")
    h, w = height, width
    echo, fat_end, gland_end = _tissue(rng, h, w)
    band = (float(fat_end.mean()), float(gland_end.mean()))
    if rng.random() < 0.5:  # distractor: flat, soft-edged hypoechoic structure (fat lobule, duct), no mask
        outline = _place(
            _lesion_outline("benign", rng, rng.uniform(0.08, 0.25) * w) * (1, 0.6), [], h, w, rng, band
        )
        alpha = cv2.GaussianBlur(_rasterise(outline, h, w).astype(np.float32), (0, 0), rng.uniform(3, 6))
        echo *= 1 - alpha * (1 - rng.uniform(0.15, 0.5))
        target = cv2.boundingRect(np.round(outline).astype(np.int32))
    else:  # calipers measure something on normal images too, so they never imply a lesion
        target = (int(rng.uniform(0.1, 0.7) * w), int(band[0]), int(rng.uniform(0.08, 0.2) * w), int(0.1 * h))
    masks: list[np.ndarray] = []
    if label != "normal":
        taken: list[tuple[float, float]] = []
        first_width = (0.05 + 0.3 * rng.beta(2, 1.6)) * w  # same size distribution for both classes
        for i in range(n_lesions):
            width = first_width if i == 0 else max(rng.uniform(0.3, 0.6) * first_width, 0.05 * w)
            outline = _place(_lesion_outline(label, rng, width), taken, h, w, rng, band)
            mask = _rasterise(outline, h, w)
            _paint_lesion(echo, mask, label, rng)
            x, _, bw, _ = cv2.boundingRect(mask)
            taken.append((float(x), float(x + bw)))
            masks.append(mask)
        target = cv2.boundingRect(masks[0])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    tgc = np.exp(-rng.uniform(0.3, 1.2) * yy / h) * (1 - rng.uniform(0, 0.25) * ((2 * xx - w) / w) ** 2)
    env = speckle_envelope(echo * tgc, rng, rng.uniform(0.9, 1.2), rng.uniform(1.6, 2.4), looks=3)
    dynamic_range, unit_gray = rng.uniform(50, 60), rng.uniform(115, 145)
    db = 20 * np.log10(np.maximum(env, 1e-4))
    gray = (db + dynamic_range * unit_gray / 255) * (255 / dynamic_range)
    img = np.clip(cv2.GaussianBlur(gray, (0, 0), 1.2, sigmaY=0.8), 0, 255).astype(np.uint8)
    _overlays(img, rng, target)
    return img, masks


def _encode_mask(mask: np.ndarray, encoding: str) -> np.ndarray:
    if encoding == "binary":
        return mask
    m = mask * np.uint8(255)
    if encoding == "gray":
        return m
    return cv2.merge([m, m, m] + ([np.full_like(m, 255)] if encoding == "rgba" else []))


def _imwrite(path: Path, array: np.ndarray) -> None:
    if not cv2.imwrite(str(path), array, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise OSError(f"could not write {path}")


def _counts(per_class: int | Mapping[str, int]) -> dict[str, int]:
    counts = dict.fromkeys(CLASSES, per_class) if isinstance(per_class, int) else dict(per_class)
    unknown = set(counts) - set(CLASSES)
    if unknown:
        raise ValueError(f"unknown class(es) {sorted(unknown)}; expected some of {CLASSES}")
    if any(not isinstance(n, int) or n < 0 for n in counts.values()):
        raise ValueError(f"per-class counts must be non-negative integers, got {counts}")
    return {c: counts.get(c, 0) for c in CLASSES}


def _clear(out: Path, overwrite: bool) -> None:
    """Refuse to mix two datasets; with ``overwrite`` remove only BUSI-named files and our manifest."""
    existing = [p for c in CLASSES if (out / c).is_dir() for p in (out / c).iterdir() if p.suffix == ".png"]
    manifest = out / "synthetic.json"
    if not (existing or manifest.exists()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{out} already contains a dataset; pass overwrite=True (CLI: --overwrite) to replace it"
        )
    for p in existing:
        if FILE_NAME_RE.match(p.name):
            p.unlink()
    manifest.unlink(missing_ok=True)


def generate_busi(
    out: str | Path,
    per_class: int | Mapping[str, int] = 50,
    seed: int = 0,
    quirks: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic BUSI-layout dataset to `out` and return its path.

    Case k of a class depends only on (seed, class, k), so growing ``per_class`` only appends files.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    counts = _counts(per_class)
    out = Path(out)
    _clear(out, overwrite)
    n_masks = 0
    for class_id, label in enumerate(CLASSES):
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(1, counts[label] + 1):
            plan = plan_case(seed, label, index, quirks)
            rng = np.random.default_rng([seed, class_id, index, _RENDER_STREAM])
            img, masks = render_case(label, rng, plan.height, plan.width, n_lesions=plan.n_lesions)
            stem = f"{label} ({index})"
            _imwrite(folder / f"{stem}.png", cv2.merge([img, img, img]) if plan.rgb_image else img)
            if label == "normal" and plan.write_mask:
                masks = [np.zeros_like(img)]
            for j, mask in enumerate(masks):
                _imwrite(
                    folder / f"{stem}_mask{f'_{j}' if j else ''}.png", _encode_mask(mask, plan.mask_encoding)
                )
            n_masks += len(masks)
    manifest = {
        "generator": "busi_mtl.data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "per_class": counts,
        "quirks": quirks,
        "images": sum(counts.values()),
        "masks": n_masks,
    }
    (out / "synthetic.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _parse_per_class(text: str) -> int | dict[str, int]:
    """``50`` or ``benign=40,malignant=20,normal=15``."""
    try:
        if "=" not in text:
            return int(text)
        return {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(",") if item.strip())}
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected N or class=N,... , got {text!r}") from err


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m busi_mtl.data.synthetic --out DIR [--per-class N] [--seed S] [--no-quirks] [--overwrite]``."""
    parser = argparse.ArgumentParser(prog="busi-mtl-synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="dataset root to create")
    parser.add_argument(
        "--per-class",
        type=_parse_per_class,
        default=50,
        help="images per class: N, or e.g. benign=40,malignant=20,normal=15 (default 50)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-quirks",
        dest="quirks",
        action="store_false",
        help="plain files: one 8-bit mask each, grayscale 500x450 images",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = generate_busi(args.out, args.per_class, args.seed, args.quirks, args.overwrite)
    except (FileExistsError, ValueError) as err:
        parser.error(str(err))
    counts = json.loads((out / "synthetic.json").read_text())["per_class"]
    summary = " ".join(f"{c}={n}" for c, n in counts.items())
    print(f"synthetic BUSI: {summary} -> {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
