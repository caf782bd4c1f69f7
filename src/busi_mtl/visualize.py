"""Pictures a researcher checks a model with: contour overlays, galleries and confusion matrices."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files or TensorBoard
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import auc, roc_curve

GT_COLOUR = (0, 255, 0)  # RGB
PRED_COLOUR = (255, 64, 64)


def draw_overlay(
    image: np.ndarray,
    pred_mask: np.ndarray | None = None,
    gt_mask: np.ndarray | None = None,
    lines: Sequence[str] = (),
    min_side: int = 256,
) -> np.ndarray:
    """RGB uint8 copy of a grayscale image with the true (green) and predicted (red) lesion contours.

    Small images are upscaled to ``min_side`` first so contours and captions stay legible.
    """
    if image.dtype != np.uint8:
        image = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    zoom = max(1.0, min_side / min(image.shape[:2]))
    size = (round(image.shape[1] * zoom), round(image.shape[0] * zoom))
    canvas = cv2.cvtColor(cv2.resize(image, size, interpolation=cv2.INTER_LINEAR), cv2.COLOR_GRAY2RGB)
    thickness = max(1, round(min(size) / 200))
    for mask, colour in ((gt_mask, GT_COLOUR), (pred_mask, PRED_COLOUR)):
        if mask is not None:
            mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(canvas, contours, -1, colour, thickness)
    scale = 0.45 * min(size) / 256
    for row, text in enumerate(lines):
        (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        y = (row + 1) * (h + base + 4)
        cv2.rectangle(canvas, (0, y - h - 3), (w + 6, y + base), (0, 0, 0), -1)
        cv2.putText(canvas, text, (3, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 0), 1, cv2.LINE_AA)
    return canvas


def tile(images: Sequence[np.ndarray], columns: int = 4, pad: int = 2) -> np.ndarray:
    """Equal-sized RGB tiles in a grid, row-major, on a white background."""
    if not images:
        raise ValueError("no images to tile")
    h, w = images[0].shape[:2]
    rows = -(-len(images) // columns)
    cols = min(columns, len(images))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, columns)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = (
            img
        )
    return grid


def class_lines(
    true_class: str | None, pred_class: str, probs: Sequence[float], classes: Sequence[str]
) -> list[str]:
    """Caption lines: true vs predicted class and the class probabilities."""
    head = f"{true_class} -> {pred_class}" if true_class is not None else pred_class
    return [head, " ".join(f"{c[:3]} {p:.2f}" for c, p in zip(classes, probs, strict=True))]


def confusion_figure(matrix: np.ndarray, classes: Sequence[str], title: str = "Confusion matrix") -> Figure:
    """Counts with row-normalised shading (rows: true class, columns: predicted)."""
    matrix = np.asarray(matrix)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.2, 3.8), dpi=120)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            colour = "white" if rates[i, j] > 0.6 else "black"
            ax.text(
                j, i, f"{matrix[i, j]}\n{rates[i, j]:.0%}", ha="center", va="center", color=colour, fontsize=8
            )
    fig.tight_layout()
    return fig


def roc_figure(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], title: str = "ROC") -> Figure:
    """One-vs-rest ROC curve and AUC per class."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2), dpi=120)
    for k, name in enumerate(classes):
        positives = labels == k
        if positives.all() or not positives.any():
            continue  # undefined without both positives and negatives
        fpr, tpr, _ = roc_curve(positives, probs[:, k])
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f}, n={int(positives.sum())})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def dice_figure(table: pd.DataFrame, title: str = "Per-image lesion Dice") -> Figure:
    """Distribution of per-image Dice for each lesion class, plus how often normal images stay empty."""
    lesion_classes = [c for c in table["class"].unique() if c != "normal"]
    fig, ax = plt.subplots(figsize=(4.6, 3.8), dpi=120)
    data = [table.loc[table["class"] == c, "dice"].dropna().to_numpy() for c in lesion_classes]
    if any(len(d) for d in data):
        ax.boxplot(data, tick_labels=lesion_classes, showfliers=False)
        for k, values in enumerate(data, start=1):
            jitter = np.random.default_rng(k).uniform(-0.12, 0.12, len(values))
            ax.scatter(k + jitter, values, s=6, alpha=0.5)
            if len(values):
                ax.text(k, 1.02, f"mean {values.mean():.3f}", ha="center", fontsize=7)
    normals = table[table["class"] == "normal"]
    if len(normals):
        empty = (normals["pred_lesion_px"] == 0).mean()
        ax.set_xlabel(f"normal images predicted empty: {empty:.0%} of {len(normals)}")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("Dice")
    ax.set_title(title)
    fig.tight_layout()
    return fig
