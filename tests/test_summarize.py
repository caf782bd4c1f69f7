"""Summarising multiruns: right means and standard deviations from fabricated run directories."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml

from busi_mtl.summarize import collect_runs, main, summarize, to_markdown, write_summary


def _job(
    sweep: Path, number: int, overrides: list[str], val_dice: float | None, test_f1: float = 0.5
) -> None:
    job = sweep / str(number)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if val_dice is None:
        (job / "error.txt").write_text("Traceback ...\nValueError: loss.alpha must be >= 0\n")
        return
    metrics = {
        "best_val": val_dice,
        "val": {"dice": val_dice, "f1": 0.7},
        "test": {"f1": test_f1, "confusion_matrix": [[1]]},
    }
    (job / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """alpha in {0.3, 0.7} x fold in {0, 1, 2}, one failed job, plus Hydra's own multirun.yaml."""
    sweep = tmp_path / "multirun"
    dice = {0.3: [0.60, 0.64, 0.71], 0.7: [0.80, 0.76, 0.84]}
    n = 0
    for alpha, values in dice.items():
        for fold, value in enumerate(values):
            _job(sweep, n, [f"loss.alpha={alpha}", f"data.fold={fold}", "data.root=/x"], value, test_f1=alpha)
            n += 1
    _job(sweep, n, ["loss.alpha=-1", "data.fold=0", "data.root=/x"], None)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def test_collect_runs_reads_overrides_status_and_metrics(sweep):
    runs = collect_runs(sweep)
    assert list(runs["job"]) == ["0", "1", "2", "3", "4", "5", "6"]
    assert runs["status"].tolist() == ["finished"] * 6 + ["failed"]
    assert runs.loc[6, "error"] == "ValueError: loss.alpha must be >= 0"
    assert runs.loc[4, "loss.alpha"] == 0.7 and runs.loc[4, "data.fold"] == 1
    assert runs.loc[4, "val/dice"] == 0.76 and "test/confusion_matrix" not in runs.columns


def test_summary_means_and_sample_stds(sweep):
    table = summarize(collect_runs(sweep), metrics=["val/dice", "test/f1"]).set_index("loss.alpha")
    assert list(table.index) == [-1.0, 0.3, 0.7]
    assert table.loc[0.3, "val/dice mean"] == pytest.approx(statistics.mean([0.60, 0.64, 0.71]))
    assert table.loc[0.3, "val/dice std"] == pytest.approx(statistics.stdev([0.60, 0.64, 0.71]))
    assert table.loc[0.7, "val/dice mean"] == pytest.approx(0.80)
    assert table.loc[0.7, "val/dice std"] == pytest.approx(0.04)
    assert table.loc[0.7, "val/dice count"] == 3 and table.loc[0.7, "failed"] == 0
    assert table.loc[-1.0, "failed"] == 1 and table.loc[-1.0, "val/dice count"] == 0
    assert "data.root" not in table.columns  # constant overrides are not configuration keys


def test_markdown_and_files(sweep, tmp_path):
    write_summary(sweep, metrics=["val/dice", "test/f1"])
    for name in ("runs.csv", "summary.csv", "summary.md", "summary_loss.alpha.png"):
        assert (sweep / name).is_file(), name
    markdown = (sweep / "summary.md").read_text()
    assert "| loss.alpha | val/dice | test/f1 | n | failed |" in markdown
    assert "| 0.7 | 0.800 ± 0.040 | 0.700 ± 0.000 | 3 | 0 |" in markdown
    assert len(pd.read_csv(sweep / "runs.csv")) == 7


def test_replicates_only_average_to_one_row(tmp_path):
    sweep = tmp_path / "cv"
    for fold, value in enumerate([0.5, 0.7]):
        _job(sweep, fold, [f"data.fold={fold}"], value)
    table = summarize(collect_runs(sweep), metrics=["val/dice"])
    assert len(table) == 1 and table.loc[0, "val/dice mean"] == pytest.approx(0.6)
    assert "0.600 ± 0.141" in to_markdown(table, ["val/dice"])


def test_cli_and_empty_dir(sweep, tmp_path):
    main([str(sweep), "--metrics", "val/dice", "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "summary.md").is_file()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no job directories"):
        collect_runs(tmp_path / "empty")
