"""95% bootstrap intervals for an evaluation's headline metrics, resampling near-duplicate groups.

A test split of about a hundred images (18 of them normal on BUSI) leaves every figure uncertain by a few
points; an interval says by how much. Images are resampled by the audit's near-duplicate group (a cluster
bootstrap), not one by one: re-crops and adjacent frames of one scan are not independent evidence, so
counting them separately would make the intervals too narrow. Percentile intervals over ``resamples``
draws, seeded; a draw in which a metric is undefined (no normal image, a class missing for AUROC) is
left out of that metric's interval.

The metrics are recomputed from ``per_image.csv``'s columns with the definitions of
:mod:`busi_mtl.metrics` (per-image lesion Dice averaged over benign + malignant images, macro F1 over
the classes present in truth or prediction, macro one-vs-rest AUROC), so on the full table they give
the reported values; in numpy on arrays, as a thousand draws through torchmetrics or scikit-learn's
input checks would take seconds per evaluation.

:func:`paired_intervals` scores two evaluations of the same images on the same draws, for the interval
of their difference (``busi_mtl.compare`` on two evaluation directories).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from busi_mtl.data import CLASSES

#: Per-image lesion scores in per_image.csv, averaged over lesion images.
LESION_COLUMNS = ("dice", "iou", "pp_dice", "native_dice", "native_pp_dice")
#: Predicted lesion area columns, and the normal-image empty rate each gives.
EMPTY_RATES = {"pred_lesion_px": "normal_empty_rate", "pp_lesion_px": "pp_normal_empty_rate"}


def _columns(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """The table's columns the metrics need, as arrays (classes as indices, areas as "empty")."""
    columns = {
        "truth": table["class"].map(CLASSES.index).to_numpy(),
        "pred": table["pred_class"].map(CLASSES.index).to_numpy(),
        "probs": table[[f"p_{c}" for c in CLASSES]].to_numpy(float),
    }
    columns |= {c: table[c].to_numpy(float) for c in LESION_COLUMNS if c in table}
    return columns | {c: table[c].to_numpy() == 0 for c in EMPTY_RATES if c in table}


def _macro_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    """Macro F1 ``2TP / (2TP + FP + FN)`` over the classes present in truth or prediction."""
    k = len(CLASSES)
    counts = np.bincount(truth * k + pred, minlength=k * k).reshape(k, k)
    both = counts.sum(0) + counts.sum(1)  # 2TP + FP + FN per class
    present = both > 0
    return float((2 * np.diag(counts)[present] / both[present]).mean())


def _macro_auroc(truth: np.ndarray, probs: np.ndarray) -> float:
    """One-vs-rest ROC AUC (Mann-Whitney, ties halved), macro over classes; NaN if one is absent."""
    aucs = []
    for c in range(len(CLASSES)):
        positive = truth == c
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if not n_pos or not n_neg:
            return float("nan")
        ranks = rankdata(probs[:, c])
        aucs.append((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs))


def _metrics(columns: dict[str, np.ndarray], score_weights: dict[str, float] | None) -> dict[str, float]:
    lesion = columns["truth"] != CLASSES.index("normal")
    values = {}
    for column in LESION_COLUMNS:
        if column in columns:
            scores = columns[column][lesion]
            values[column] = float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")
    for column, name in EMPTY_RATES.items():
        if column in columns:
            values[name] = float(columns[column][~lesion].mean()) if (~lesion).any() else float("nan")
    values["acc"] = float((columns["truth"] == columns["pred"]).mean())
    values["f1"] = _macro_f1(columns["truth"], columns["pred"])
    values["auroc"] = _macro_auroc(columns["truth"], columns["probs"])
    if score_weights and all(k in values for k in score_weights):
        values["score"] = sum(w * values[k] for k, w in score_weights.items())
    return values


def table_metrics(table: pd.DataFrame, score_weights: dict[str, float] | None = None) -> dict[str, float]:
    """The headline metrics of a per-image table (NaN where undefined); ``score`` when its parts are in."""
    return _metrics(_columns(table), score_weights)


def _draws(
    tables: list[pd.DataFrame],
    groups: np.ndarray,
    resamples: int,
    seed: int,
    score_weights: dict[str, float] | None,
) -> list[pd.DataFrame]:
    """The metrics of each table over the same ``resamples`` draws of whole groups with replacement
    (``groups``: one label per row, shared by the tables, whose rows are the same images in one order)."""
    if {len(table) for table in tables} != {len(groups)}:
        sizes = " and ".join(str(len(table)) for table in tables)
        raise ValueError(f"got {len(groups)} group labels for {sizes} images")
    _, codes = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]
    columns, rng = [_columns(table) for table in tables], np.random.default_rng(seed)
    draws: list[list[dict[str, float]]] = [[] for _ in tables]
    for _ in range(resamples):
        rows = np.concatenate([members[g] for g in rng.integers(len(members), size=len(members))])
        for table_columns, table_draws in zip(columns, draws, strict=True):
            table_draws.append(_metrics({k: a[rows] for k, a in table_columns.items()}, score_weights))
    return [pd.DataFrame(table_draws) for table_draws in draws]


def _percentiles(frame: pd.DataFrame) -> dict[str, list[float]]:
    """The 2.5th and 97.5th percentiles of each column, over its defined draws."""
    return {
        name: [float(v) for v in np.nanpercentile(col, [2.5, 97.5])] if col.notna().any() else [np.nan] * 2
        for name, col in frame.items()
    }


def bootstrap_intervals(
    table: pd.DataFrame,
    groups: np.ndarray,
    resamples: int = 1000,
    seed: int = 0,
    score_weights: dict[str, float] | None = None,
) -> dict[str, list[float]]:
    """``{metric: [2.5th, 97.5th percentile]}`` over ``resamples`` draws of whole groups with replacement
    (``groups``: one label per table row); a metric undefined in every draw gets ``[nan, nan]``."""
    (frame,) = _draws([table], groups, resamples, seed, score_weights)
    return _percentiles(frame)


def paired_intervals(
    candidate: pd.DataFrame,
    reference: pd.DataFrame,
    groups: np.ndarray,
    resamples: int = 1000,
    seed: int = 0,
    score_weights: dict[str, float] | None = None,
) -> dict[str, list[float]]:
    """95% intervals of ``candidate - reference`` for each metric, both tables scored on the same draws.

    Two evaluations of the same images share each image's difficulty, so the difference varies far less
    between draws than either figure does; two separate intervals overlapping says little. The rows of
    the two tables must be the same images in the same order. The interval covers which images were
    drawn, for these two fixed models: not how a retrained model would come out.
    """
    ours, theirs = _draws([candidate, reference], groups, resamples, seed, score_weights)
    return _percentiles(ours - theirs)
