"""Verify a BUSI-layout dataset: mask/label consistency and near-duplicate scans.

``python -m busi_mtl.data.audit data.root=...`` writes ``audit.csv`` (one row per image, one column per
check), ``duplicates.csv`` (the near-duplicate groups) and ``audit_summary.json`` to the run directory and
prints a summary. The same near-duplicate groups are what :mod:`busi_mtl.data.splits` keeps together.
With ``split_file=<split CSV>`` (columns id, class, split: one of this project's or a published one) it
also writes ``split_leaks.csv``, the val/test images with a near-duplicate in train.

Near-duplicates are found with a difference hash (dHash): the image shrunk to ``hash_size x (hash_size+1)``
and one bit per horizontally adjacent pair (left brighter than right?). Re-crops, adjacent frames of one
sweep and re-saved copies differ in few bits; unrelated scans in about half of them. Images within
``threshold`` bits are linked, and linked images form a group (connected components), so a chain of
adjacent frames is one group even when its ends differ more than the threshold.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from scipy.sparse.csgraph import connected_components
from sklearn.metrics import pairwise_distances

from busi_mtl.data import CLASSES, NORMAL
from busi_mtl.data.busi import load_image, load_mask, scan_busi
from busi_mtl.data.splits import duplicate_leaks, read_split_file, warn_leaks
from busi_mtl.utils.paths import CONFIG_DIR

log = logging.getLogger(__name__)

#: Checks reported per image; each is a boolean column of audit.csv.
FLAGS = (
    "missing_mask",
    "empty_mask_lesion",
    "nonempty_mask_normal",
    "mask_size_mismatch",
    "multi_mask",
    "near_duplicate",
    "cross_class_duplicate",
)


def dhash(image: np.ndarray, hash_size: int = 16) -> np.ndarray:
    """Difference hash of a grayscale image as ``hash_size**2`` booleans."""
    small = cv2.resize(image, (hash_size + 1, hash_size), interpolation=cv2.INTER_AREA).astype(np.int16)
    return (small[:, 1:] > small[:, :-1]).ravel()


def hamming_matrix(hashes: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances in bits between rows of a boolean hash matrix."""
    if len(hashes) == 0:
        return np.zeros((0, 0), dtype=np.int32)
    frac = pairwise_distances(hashes.astype(bool), metric="hamming")
    return np.rint(frac * hashes.shape[1]).astype(np.int32)


def duplicate_groups(hashes: np.ndarray, threshold: int) -> np.ndarray:
    """Group id per image: images linked by chains of pairs within ``threshold`` bits share a group."""
    if len(hashes) == 0:
        return np.zeros(0, dtype=np.int64)
    _, groups = connected_components(hamming_matrix(hashes) <= threshold, directed=False)
    return groups.astype(np.int64)


def audit_dataset(
    root: str | Path, hash_size: int = 16, dup_threshold: int = 64
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-image checks and the near-duplicate groups of a BUSI-layout folder.

    Images without masks are kept (flagged ``missing_mask``) so one run reports all of them; unreadable
    files still stop the audit with an error naming the file, since nothing about them can be checked.
    """
    manifest = scan_busi(root, on_missing_mask="keep")
    rows, hashes = [], []
    for rec in manifest.to_dict("records"):
        image = load_image(rec["image_path"])
        mask = load_mask(rec["mask_paths"], image.shape)
        hashes.append(dhash(image, hash_size))
        lesion_px = int(mask.sum())
        is_normal = rec["label"] == NORMAL
        rows.append(
            {
                **{key: rec[key] for key in ("id", "class", "width", "height", "n_masks")},
                "lesion_fraction": lesion_px / mask.size,
                "missing_mask": not is_normal and rec["n_masks"] == 0,
                "empty_mask_lesion": not is_normal and rec["n_masks"] > 0 and lesion_px == 0,
                "nonempty_mask_normal": is_normal and lesion_px > 0,
                "mask_size_mismatch": rec["mask_size_mismatch"],
                "multi_mask": rec["n_masks"] > 1,
            }
        )
    report = pd.DataFrame(rows)
    hash_matrix = np.array(hashes)
    distances = hamming_matrix(hash_matrix).astype(float)
    np.fill_diagonal(distances, np.inf)
    report["dup_group"] = duplicate_groups(hash_matrix, dup_threshold)
    nearest = distances.argmin(axis=1) if len(report) > 1 else np.zeros(len(report), dtype=int)
    report["nearest_id"] = report["id"].to_numpy()[nearest]
    report["nearest_distance"] = distances[np.arange(len(report)), nearest] if len(report) > 1 else np.inf
    group_size = report.groupby("dup_group")["id"].transform("size")
    group_classes = report.groupby("dup_group")["class"].transform("nunique")
    report["near_duplicate"] = group_size > 1
    report["cross_class_duplicate"] = group_classes > 1

    dup = report[report["near_duplicate"]]
    groups = (
        dup.groupby("dup_group")
        .agg(
            size=("id", "size"), classes=("class", lambda c: "/".join(sorted(set(c)))), ids=("id", "; ".join)
        )
        .reset_index()
        .sort_values(["size", "dup_group"], ascending=[False, True])
    )
    return report, groups


def summarize(report: pd.DataFrame, groups: pd.DataFrame) -> dict:
    """Counts per class and per check, as printed and saved in audit_summary.json."""
    per_class = report.groupby("class").size().reindex(CLASSES, fill_value=0)
    return {
        "images": len(report),
        "per_class": {cls: int(n) for cls, n in per_class.items()},
        "mask_files": int(report["n_masks"].sum()),
        **{flag: int(report[flag].sum()) for flag in FLAGS},
        "duplicate_groups": len(groups),
        "cross_class_groups": int((groups["classes"].str.contains("/")).sum()) if len(groups) else 0,
        "split_groups": int(report["dup_group"].nunique()),
    }


def print_summary(summary: dict, groups: pd.DataFrame, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="BUSI audit", show_header=True)
    table.add_column("check")
    table.add_column("count", justify="right")
    for key, value in summary.items():
        if key != "per_class":
            table.add_row(key, str(value))
    for cls, n in summary["per_class"].items():
        table.add_row(f"images: {cls}", str(n))
    console.print(table)
    cross = groups[groups["classes"].str.contains("/")] if len(groups) else groups
    for rec in cross.itertuples(index=False):
        console.print(f"[yellow]cross-class duplicate group ({rec.classes}):[/] {rec.ids}")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="audit")
def main(cfg: DictConfig) -> dict:
    """Hydra entry point: audit ``data.root`` and write the report to the run directory."""
    out = Path(cfg.paths.output_dir)
    report, groups = audit_dataset(cfg.data.root, cfg.data.hash_size, cfg.data.dup_threshold)
    summary = summarize(report, groups)
    report.to_csv(out / "audit.csv", index=False)
    groups.to_csv(out / "duplicates.csv", index=False)
    if cfg.get("split_file"):
        # the report is the manifest (same rows, same order), so its groups line up with the split table's
        table = read_split_file(cfg.split_file, report.assign(label=report["class"].map(CLASSES.index)))
        leaks = duplicate_leaks(table, report["dup_group"].to_numpy())
        leaks.to_csv(out / "split_leaks.csv", index=False)
        summary.update(
            {f"split_leaks_{name}": int((leaks["split"] == name).sum()) for name in ("val", "test")}
        )
        warn_leaks(leaks, f"split_file={cfg.split_file}")
    (out / "audit_summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary, groups)
    log.info("Audit written to %s", out)
    return summary


if __name__ == "__main__":
    main()
