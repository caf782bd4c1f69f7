"""Paired comparisons: CVs by fold (hand-checked differences, the corrected t-test, refusing unpaired
folds) and evaluations by image (the paired bootstrap, refusing different images or groups)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml
from scipy import stats

from busi_mtl.compare import compare, compare_evaluations, corrected_ttest, main, to_markdown
from busi_mtl.evaluate import evaluate

from conftest import compose_config

IDS = [f"benign ({i})" for i in range(1, 11)]


def _split(fold: int) -> pd.DataFrame:
    """10 images: 2 test, fold `fold`'s 2 held out, 6 train (held-out / train ratio 1/3)."""
    split = ["test", "test"] + ["train"] * 8
    split[2 + 2 * fold] = split[3 + 2 * fold] = "val"
    return pd.DataFrame({"id": IDS, "split": split})


def _cv(root: Path, name: str, score: list[float], test_dice: list[float], folds=(0, 1, 2)) -> Path:
    cv = root / name
    for job, (fold, s, t) in enumerate(zip(folds, score, test_dice, strict=True)):
        d = cv / str(job)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"data.fold={fold}", "experiment=x"]))
        metrics = {"best_val": s, "val": {"score": s}, "test": {"dice": t, "confusion_matrix": [[1]]}}
        (d / "metrics.json").write_text(json.dumps(metrics))
        _split(fold).to_csv(d / "split.csv", index=False)
    return cv


def test_corrected_ttest_without_correction_is_the_paired_t_test() -> None:
    a, b = [0.80, 0.76, 0.79, 0.83, 0.75], [0.78, 0.75, 0.80, 0.79, 0.74]
    differences = [x - y for x, y in zip(a, b, strict=True)]
    p, low, high = corrected_ttest(differences, 0.0)
    reference = stats.ttest_rel(a, b)
    assert p == pytest.approx(reference.pvalue)
    interval = reference.confidence_interval(0.95)
    assert (low, high) == pytest.approx((interval.low, interval.high))


def test_corrected_ttest_inflates_the_variance_by_the_train_overlap() -> None:
    differences = [0.02, 0.01, -0.01, 0.04, 0.01]
    mean, sd = 0.014, stats.tstd(differences)
    t = mean / math.sqrt((1 / 5 + 0.25) * sd**2)  # 5-fold CV: held out / train = 1/4
    p, low, high = corrected_ttest(differences, 0.25)
    assert p == pytest.approx(2 * stats.t.sf(t, 4))
    assert p > corrected_ttest(differences, 0.0)[0]
    assert (low + high) / 2 == pytest.approx(mean)
    assert corrected_ttest([0.01, 0.01, 0.01], 0.25) == (0.0, 0.01, 0.01)
    assert all(math.isnan(x) for x in corrected_ttest([0.01], 0.25))


def test_compare_pairs_by_fold(tmp_path: Path) -> None:
    reference = _cv(tmp_path, "ref", [0.70, 0.80, 0.75], [0.60, 0.60, 0.60])
    # jobs in another order: fold 2 first; pairing must follow data.fold, not the job number
    candidate = _cv(tmp_path, "new", [0.77, 0.72, 0.8002], [0.65, 0.55, 0.60], folds=(2, 0, 1))
    table = compare(candidate, reference, ["val/score", "test/dice", "val/missing"]).set_index("metric")
    assert list(table.index) == ["val/score", "test/dice"]
    score = table.loc["val/score"]
    assert score["per_fold"] == "+0.020 / +0.000 / +0.020"  # folds 0, 1, 2
    assert (score["higher"], score["equal"], score["lower"]) == (2, 1, 0)
    assert score["difference"] == pytest.approx((0.02 + 0.0002 + 0.02) / 3)
    p, _, _ = corrected_ttest([0.02, 0.0002, 0.02], 1 / 3)
    assert score["p_corrected"] == pytest.approx(p)
    dice = table.loc["test/dice"]
    assert (dice["higher"], dice["equal"], dice["lower"]) == (1, 1, 1)
    assert math.isnan(dice["p_corrected"])  # one test split for all folds: no p-value
    markdown = to_markdown(table.reset_index())
    assert "| test/dice | 0.600 | 0.600 | +0.000 | 1 / 1 / 1 | n/a |" in markdown


def test_compare_a_cv_gathered_from_two_multiruns(tmp_path: Path) -> None:
    """Folds run as two sweeps, linked into one folder (the README's recipe), pair like one CV."""
    reference = _cv(tmp_path, "ref", [0.70, 0.80, 0.75], [0.6] * 3)
    first = _cv(tmp_path, "first", [0.72], [0.6], folds=(0,))
    later = _cv(tmp_path, "later", [0.81, 0.74], [0.6] * 2, folds=(1, 2))  # job dirs 0 and 1
    gathered = tmp_path / "gathered"
    gathered.mkdir()
    (gathered / "0").symlink_to(first / "0")
    for job, fold in ((0, 1), (1, 2)):
        (gathered / str(fold)).symlink_to(later / str(job))
    table = compare(gathered, reference, ["val/score"]).set_index("metric")
    assert table.loc["val/score", "per_fold"] == "+0.020 / +0.010 / -0.010"


def test_compare_refuses_different_folds(tmp_path: Path) -> None:
    reference = _cv(tmp_path, "ref", [0.7, 0.8, 0.75], [0.6] * 3)
    candidate = _cv(tmp_path, "new", [0.7, 0.8, 0.75], [0.6] * 3)
    _split(2).to_csv(candidate / "1" / "split.csv", index=False)  # fold 1's run used fold 2's split
    with pytest.raises(ValueError, match=r"Fold 1: .* split the images differently"):
        compare(candidate, reference)
    fewer = _cv(tmp_path, "fewer", [0.7, 0.8], [0.6] * 2, folds=(0, 1))
    with pytest.raises(ValueError, match="different folds"):
        compare(fewer, reference)


def test_compare_refuses_sweeps_and_failed_folds(tmp_path: Path) -> None:
    reference = _cv(tmp_path, "ref", [0.7, 0.8, 0.75], [0.6] * 3)
    twice = _cv(tmp_path, "twice", [0.7, 0.8, 0.75], [0.6] * 3, folds=(0, 1, 1))
    with pytest.raises(ValueError, match=r"folds \[1\] appear more than once"):
        compare(twice, reference)
    failed = _cv(tmp_path, "failed", [0.7, 0.8, 0.75], [0.6] * 3)
    (failed / "2" / "metrics.json").unlink()
    (failed / "2" / "error.txt").write_text("Traceback\nRuntimeError: out of memory\n")
    with pytest.raises(ValueError, match=r"jobs \['2'\] did not finish"):
        compare(failed, reference)


def test_main_writes_the_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reference = _cv(tmp_path, "ref", [0.70, 0.80, 0.75], [0.60] * 3)
    candidate = _cv(tmp_path, "new", [0.72, 0.81, 0.76], [0.62] * 3)
    main([str(candidate), str(reference), "--out", str(tmp_path / "out")])
    table = pd.read_csv(tmp_path / "out" / "compare.csv")
    assert table["metric"].tolist() == ["val/score", "test/dice"]
    assert table.loc[0, "higher"] == 3
    assert (tmp_path / "out" / "compare.md").read_text().startswith("| metric | reference | candidate |")
    assert "paired by fold" in capsys.readouterr().out


def _evaluation(root: Path, name: str, dice: list[float], weights: dict | None = None) -> Path:
    """An evaluation directory of 4 benign images, the first two one scan (group 7)."""
    d = root / name
    d.mkdir()
    n = len(dice)
    pd.DataFrame(
        {
            "id": [f"benign ({i})" for i in range(n)][::-1],  # row order must not matter
            "class": ["benign"] * n,
            "pred_class": ["benign"] * n,
            "p_normal": [0.1] * n,
            "p_benign": [0.8] * n,
            "p_malignant": [0.1] * n,
            "dice": dice[::-1],
            "dup_group": [7, 7, *range(n - 2)][::-1],
        }
    ).to_csv(d / "per_image.csv", index=False)
    (d / "metrics.json").write_text(json.dumps({"score_weights": weights or {"dice": 0.5, "acc": 0.5}}))
    return d


def test_compare_evaluations_by_image(tmp_path: Path) -> None:
    reference = _evaluation(tmp_path, "ref", [0.5, 0.5, 0.5, 0.5])
    candidate = _evaluation(tmp_path, "new", [0.9, 0.9, 0.5, 0.5])
    table, drawn = compare_evaluations(candidate, reference, resamples=500)
    assert drawn == {"images": 4, "groups": 3, "resamples": 500, "seed": 0}
    dice = table.set_index("metric").loc["dice"]
    assert (dice["reference"], dice["candidate"], dice["difference"]) == pytest.approx((0.5, 0.7, 0.2))
    # The scan of two frames is drawn whole: 0 to 3 copies of it among 3 draws; 2 frames of +0.4 give
    # +0.4 * 2k / (2k + (3 - k)) for k copies, from 0 to +0.4 (never the +0.133 of one frame alone).
    assert dice["ci_low"] == pytest.approx(0.0) and dice["ci_high"] == pytest.approx(0.4)
    score = table.set_index("metric").loc["score"]
    assert score["difference"] == pytest.approx(0.1)  # 0.5 * dice + 0.5 * acc
    other_weights = _evaluation(tmp_path, "weights", [0.9, 0.9, 0.5, 0.5], {"dice": 1.0})
    assert "score" not in compare_evaluations(other_weights, reference)[0]["metric"].tolist()


def test_compare_evaluations_refuses_other_images_or_groups(tmp_path: Path) -> None:
    reference = _evaluation(tmp_path, "ref", [0.5] * 4)
    fewer = _evaluation(tmp_path, "fewer", [0.5] * 3)
    with pytest.raises(ValueError, match=r"different images \(1 in one only"):
        compare_evaluations(fewer, reference)
    regrouped = _evaluation(tmp_path, "regrouped", [0.5] * 4)
    table = pd.read_csv(regrouped / "per_image.csv")
    table["dup_group"] = range(4)
    table.to_csv(regrouped / "per_image.csv", index=False)
    with pytest.raises(ValueError, match="group the images' near-duplicates differently"):
        compare_evaluations(regrouped, reference)
    table.drop(columns="dup_group").to_csv(regrouped / "per_image.csv", index=False)
    with pytest.raises(ValueError, match="no dup_group column"):
        compare_evaluations(regrouped, reference)
    with pytest.raises(SystemExit, match="not one of each"):
        main([str(reference), str(_cv(tmp_path, "cv", [0.7, 0.8, 0.75], [0.6] * 3))])


def test_two_evaluations_of_a_checkpoint_compared(trained_run, tmp_path, capsys) -> None:
    # Evaluate one checkpoint at two thresholds; the comparison's point differences are the difference
    # of the two metrics.json, and its interval holds the difference.
    run, _ = trained_run
    ckpt = f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    reports = {}
    for name, threshold in (("low", 0.3), ("high", 0.7)):
        cfg = compose_config(
            "eval", ["trainer.accelerator=cpu", ckpt, f"threshold={threshold}"], tmp_path / name
        )
        reports[name] = evaluate(cfg)["test"]
    low, high = tmp_path / "low" / "run", tmp_path / "high" / "run"
    main([str(high), str(low), "--out", str(tmp_path / "out"), "--resamples", "200"])
    table = pd.read_csv(tmp_path / "out" / "compare.csv").set_index("metric")
    for key in ("score", "dice", "normal_empty_rate", "f1"):
        expected = reports["high"][key] - reports["low"][key]
        assert table.loc[key, "difference"] == pytest.approx(expected, abs=1e-5), key
        assert table.loc[key, "ci_low"] - 1e-9 <= expected <= table.loc[key, "ci_high"] + 1e-9, key
    assert table.loc["f1", "difference"] == 0  # the classifier does not depend on the threshold
    assert "paired by image" in capsys.readouterr().out
    assert "near-duplicate groups" in (tmp_path / "out" / "compare.md").read_text()
