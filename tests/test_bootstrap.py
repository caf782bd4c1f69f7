"""Bootstrap intervals: the point metrics they resample, grouping by duplicate, reproducibility."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from busi_mtl.bootstrap import bootstrap_intervals, paired_intervals, table_metrics
from busi_mtl.data import CLASSES
from busi_mtl.evaluate import evaluate

from conftest import compose_config


def _table(dice: list[float], classes: list[str] | None = None) -> pd.DataFrame:
    n = len(dice)
    classes = classes or ["benign"] * n
    return pd.DataFrame(
        {
            "class": classes,
            "pred_class": classes,
            "p_normal": [0.1] * n,
            "p_benign": [0.8] * n,
            "p_malignant": [0.1] * n,
            "dice": dice,
            "pred_lesion_px": [10] * n,
        }
    )


def test_the_table_gives_back_the_evaluated_metrics(trained_run, tmp_path):
    run, _ = trained_run
    cfg = compose_config(
        "eval",
        ["trainer.accelerator=cpu", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "split=all"],
        tmp_path,
    )
    metrics = evaluate(cfg)
    values, table = metrics["all"], pd.read_csv(tmp_path / "run" / "per_image.csv")
    recomputed = table_metrics(table, {"dice": 0.5, "f1": 0.5})
    for key in ("dice", "iou", "pp_dice", "native_dice", "native_pp_dice", "normal_empty_rate", "acc", "f1"):
        assert recomputed[key] == pytest.approx(values[key], abs=1e-5), key
    for key in ("pp_normal_empty_rate", "auroc", "score"):
        assert recomputed[key] == pytest.approx(values[key], abs=1e-5), key
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["bootstrap"]["unit"] == "near-duplicate group" and saved["bootstrap"]["resamples"] == 1000
    for key in ("dice", "f1", "acc", "normal_empty_rate", "score"):
        low, high = saved["ci95"][key]
        assert low <= values[key] <= high, key


def test_f1_and_auroc_agree_with_scikit_learn_with_ties_and_missing_classes():
    rng = np.random.default_rng(0)
    for trial in range(20):
        # Odd trials: malignant in truth, never predicted (F1 0 for it). Even ones: absent from both, so
        # left out of the macro F1 (as torchmetrics does), and AUROC undefined.
        truth = np.r_[0, 1, 2, rng.integers(0, 3, 17)] if trial % 2 else np.r_[0, 1, rng.integers(0, 2, 18)]
        pred = rng.integers(0, 2, 20)
        probs = np.round(rng.random((20, 3)), 1)  # coarse scores: many ties
        table = pd.DataFrame(
            {
                "class": [CLASSES[k] for k in truth],
                "pred_class": [CLASSES[k] for k in pred],
                **{f"p_{c}": probs[:, k] for k, c in enumerate(CLASSES)},
            }
        )
        values = table_metrics(table)
        present = np.union1d(truth, pred)
        assert values["f1"] == pytest.approx(f1_score(truth, pred, labels=present, average="macro"))
        if trial % 2:
            auroc = np.mean([roc_auc_score(truth == k, probs[:, k]) for k in range(3)])
            assert values["auroc"] == pytest.approx(auroc)
        else:
            assert np.isnan(values["auroc"])
        assert values["acc"] == pytest.approx((truth == pred).mean())


def test_duplicates_are_resampled_together():
    # Two scans, each seen 50 times: there are only two independent cases, so the Dice could be 0 or 1.
    table = _table([1.0] * 50 + [0.0] * 50)
    grouped = bootstrap_intervals(table, np.repeat([0, 1], 50), resamples=400)
    assert grouped["dice"] == [0.0, 1.0]
    per_image = bootstrap_intervals(table, np.arange(100), resamples=400)
    assert 0.3 < per_image["dice"][0] < 0.5 < per_image["dice"][1] < 0.7


def test_intervals_are_seeded_and_skip_undefined_draws():
    table = _table([0.9, 0.2, 0.7, 0.4, 0.8, 0.1])
    first = bootstrap_intervals(table, np.arange(6), resamples=200, seed=3)
    assert first == bootstrap_intervals(table, np.arange(6), resamples=200, seed=3)
    assert first != bootstrap_intervals(table, np.arange(6), resamples=200, seed=4)
    assert np.isnan(first["normal_empty_rate"]).all() and np.isnan(first["auroc"]).all()  # no normal image
    with pytest.raises(ValueError, match="5 group labels for 6 images"):
        bootstrap_intervals(table, np.arange(5))


def test_paired_intervals_draw_the_same_images_for_both():
    # Each image is equally hard for both models; the candidate is 0.05 better on every one. Separately,
    # the two intervals overlap widely; paired, every draw gives the same +0.05.
    rng = np.random.default_rng(1)
    hard = rng.uniform(0.3, 0.9, 40)
    reference, candidate = _table(list(hard)), _table(list(hard + 0.05))
    groups = np.arange(40)
    ours, theirs = bootstrap_intervals(candidate, groups), bootstrap_intervals(reference, groups)
    assert ours["dice"][0] < theirs["dice"][1]  # overlapping separate intervals
    paired = paired_intervals(candidate, reference, groups)
    assert paired["dice"] == pytest.approx([0.05, 0.05])
    assert paired["f1"] == [0.0, 0.0] and paired["acc"] == [0.0, 0.0]  # same classes predicted
    assert paired_intervals(reference, reference, groups)["dice"] == [0.0, 0.0]


def test_paired_intervals_resample_whole_groups():
    # Two cases of two frames each: the candidate wins on case 0 and loses on case 1. Draws are
    # (0, 0) -> +0.4, (1, 1) -> -0.4 or one of each -> 0; frames of a case never part.
    candidate, reference = _table([0.9, 0.9, 0.1, 0.1]), _table([0.5] * 4)
    paired = paired_intervals(candidate, reference, np.array([0, 0, 1, 1]), resamples=400, seed=3)
    assert paired["dice"] == pytest.approx([-0.4, 0.4])
    with pytest.raises(ValueError, match="4 group labels for 4 and 3 images"):
        paired_intervals(candidate, reference.iloc[:3], np.array([0, 0, 1, 1]))
