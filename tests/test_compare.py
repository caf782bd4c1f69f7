"""Paired CV comparison: hand-checked differences, the corrected t-test, and refusing unpaired folds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml
from scipy import stats

from busi_mtl.compare import compare, corrected_ttest, main, to_markdown

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
