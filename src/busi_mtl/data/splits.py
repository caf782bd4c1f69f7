"""Stratified, duplicate-grouped train/val/test splits and k-fold cross-validation, saved as CSV.

Every split is made with scikit-learn's ``StratifiedGroupKFold`` over near-duplicate groups (see
:mod:`busi_mtl.data.audit`), so no scan and its re-crops or neighbouring frames sit on both sides of a
split, and class proportions stay close to the whole set's.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from busi_mtl.data.busi import BUSIDataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ["id", "class", "label", "group", "split", "fold"]


def _fold_ids(labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """Fold index per sample from a shuffled StratifiedGroupKFold."""
    folds = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    try:
        for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            folds[held_out] = fold
    except ValueError as err:  # too few images (or duplicate groups) for this many equal parts
        raise ValueError(
            f"Cannot cut {len(labels)} images in {len(np.unique(groups))} duplicate groups into {n_splits} "
            f"stratified parts ({err}). Use a larger dataset, or fractions that need fewer parts "
            "(e.g. data.val_fraction=0.2 data.test_fraction=0.2 needs 5), or fewer data.num_folds."
        ) from err
    return folds


def _parts(val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """Smallest number of equal folds (n) and how many of them go to val and test.

    The fractions are realised exactly as whole folds: 0.15/0.15 needs 20 folds (3 val, 3 test).
    """
    for n in range(2, 21):
        k_val, k_test = val_fraction * n, test_fraction * n
        if abs(k_val - round(k_val)) < 1e-6 and abs(k_test - round(k_test)) < 1e-6:
            return n, round(k_val), round(k_test)
    raise ValueError(
        f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be multiples of "
        f"1/n for some n <= 20 (e.g. 0.15, 0.1, 0.2); closest: {Fraction(val_fraction).limit_denominator(20)}"
    )


def grouped_split(
    labels: np.ndarray,
    groups: np.ndarray,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 42,
    num_folds: int | None = None,
    fold: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Split name ("train"/"val"/"test") and CV fold (-1 outside CV) per sample.

    Without ``num_folds``: one split with the given val/test fractions. With ``num_folds=K``: the test
    set is the same as without (same seed and test fraction), the rest is cut into K stratified grouped
    folds, fold ``fold`` is val and the others train; sweeping ``fold`` over 0..K-1 is cross-validation.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}: each must be in [0, 1) "
            "and together below 1."
        )
    labels, groups = np.asarray(labels), np.asarray(groups)
    # The same n (from both fractions) in both modes, so CV's test set is the plain split's test set.
    n, k_val, k_test = _parts(val_fraction, test_fraction)
    parts = _fold_ids(labels, groups, n, seed) if k_val or k_test else np.full(len(labels), n - 1)
    split = np.where(parts < k_test, "test", np.where(parts < k_test + k_val, "val", "train")).astype(object)
    folds = np.full(len(labels), -1, dtype=np.int64)
    if num_folds:
        if num_folds < 2 or not 0 <= fold < num_folds:
            raise ValueError(
                f"data.fold={fold} must be in [0, data.num_folds={num_folds}) and num_folds >= 2"
            )
        rest = split != "test"
        folds[rest] = _fold_ids(labels[rest], groups[rest], num_folds, seed)
        split[rest] = np.where(folds[rest] == fold, "val", "train")
    return split.astype(str), folds


def make_split_table(
    manifest: pd.DataFrame,
    groups: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    num_folds: int | None = None,
    fold: int = 0,
) -> pd.DataFrame:
    """The split CSV's table for a manifest: id, class, label, duplicate group, split, fold."""
    split, folds = grouped_split(
        manifest["label"].to_numpy(), groups, val_fraction, test_fraction, seed, num_folds, fold
    )
    table = manifest[["id", "class", "label"]].copy()
    table["group"] = groups
    table["split"] = split
    table["fold"] = folds
    return table


def read_split_file(
    path: str | Path, manifest: pd.DataFrame, groups: np.ndarray | None = None
) -> pd.DataFrame:
    """Load a saved split and check it describes exactly this dataset (same ids and classes).

    A file without a ``group`` column (a published split, say) takes ``groups`` (the near-duplicate
    groups in the manifest's row order) when given, so the saved copy still says which images are one
    scan; otherwise, and for a missing ``fold`` column, -1.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise BUSIDataError(f"data.split_file={path}: cannot be read as a split CSV ({err}).") from err
    missing_cols = [c for c in ("id", "class", "split") if c not in table.columns]
    if missing_cols:
        raise BUSIDataError(
            f"data.split_file={path}: missing column(s) {missing_cols}; expected {SPLIT_COLUMNS}."
        )
    bad_split = sorted(set(table["split"]) - set(SPLITS))
    if bad_split:
        raise BUSIDataError(
            f"data.split_file={path}: unknown split name(s) {bad_split}; allowed {list(SPLITS)}."
        )
    if table["id"].duplicated().any():
        dups = table.loc[table["id"].duplicated(), "id"].tolist()[:5]
        raise BUSIDataError(f"data.split_file={path}: ids listed twice, e.g. {dups}.")
    unknown = sorted(set(table["id"]) - set(manifest["id"]))
    if unknown:
        raise BUSIDataError(
            f"data.split_file={path}: {len(unknown)} id(s) not in the dataset at data.root, e.g. {unknown[:5]}; "
            "the split was made for another dataset (or files were renamed)."
        )
    absent = sorted(set(manifest["id"]) - set(table["id"]))
    if absent:
        raise BUSIDataError(
            f"data.split_file={path}: {len(absent)} dataset image(s) not assigned to any split, e.g. "
            f"{absent[:5]}; regenerate the split (drop data.split_file)."
        )
    merged = manifest[["id", "class", "label"]].merge(table, on="id", suffixes=("", "_file"))
    relabelled = merged[merged["class"] != merged["class_file"]]
    if len(relabelled):
        raise BUSIDataError(
            f"data.split_file={path}: class differs from the dataset for {relabelled['id'].tolist()[:5]}."
        )
    if "group" not in merged:
        merged["group"] = -1 if groups is None else np.asarray(groups)
    if "fold" not in merged:
        merged["fold"] = -1
    return merged[SPLIT_COLUMNS]


def duplicate_leaks(table: pd.DataFrame, groups: np.ndarray) -> pd.DataFrame:
    """The val/test images with a near-duplicate (same ``groups`` id, in the table's row order) in the train
    split, and those copies.

    Their scores measure recall of a scan already seen in training, so a split with any is inflated; the
    splits made here have none, a loaded ``data.split_file`` or ``data.group_duplicates=false`` may.
    """
    frame = table[["id", "class", "split"]].assign(dup_group=np.asarray(groups))
    train = frame[frame["split"] == "train"]
    copies = train.groupby("dup_group")["id"].agg("; ".join)
    leaks = frame[(frame["split"] != "train") & frame["dup_group"].isin(copies.index)]
    return leaks.assign(train_copies=leaks["dup_group"].map(copies)).reset_index(drop=True)


def warn_leaks(leaks: pd.DataFrame, source: str) -> None:
    """Log how many val/test images have a copy in train (one example each), if any."""
    if len(leaks):
        counts = leaks["split"].value_counts()
        first = leaks.iloc[0]
        log.warning(
            "%s: %s image(s) have a near-duplicate in the train split (e.g. %s, a copy of %s), so their "
            "scores are inflated; a grouped split (the default) has none.",
            source,
            " and ".join(f"{counts[name]} {name}" for name in SPLITS if name in counts),
            first["id"],
            first["train_copies"],
        )


def log_split(table: pd.DataFrame) -> None:
    counts = pd.crosstab(table["split"], table["class"]).reindex(SPLITS, fill_value=0)
    for name, row in counts.iterrows():
        log.info(
            "split %-5s: %4d images (%s)", name, row.sum(), ", ".join(f"{c} {n}" for c, n in row.items())
        )
