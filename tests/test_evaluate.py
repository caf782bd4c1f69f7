"""Evaluating a checkpoint: its own preprocessing and split, files written, whole folders, bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from busi_mtl.data.synthetic import generate_busi
from busi_mtl.evaluate import evaluate
from busi_mtl.utils import run as run_utils

from conftest import compose_config


def _evaluate(tmp_path, *overrides):
    cfg = compose_config("eval", ["trainer.accelerator=cpu", *overrides], tmp_path)
    return evaluate(cfg), tmp_path / "run"


def test_evaluate_reproduces_the_training_test_numbers(trained_run, tmp_path):
    run, train_metrics = trained_run
    best = json.loads((run / "metrics.json").read_text())["best_ckpt"]
    metrics, out = _evaluate(tmp_path, f"ckpt_path={best}")
    for key in ("dice", "iou", "f1", "acc", "auroc", "normal_empty_rate", "pixel_acc"):
        assert metrics["test"][key] == pytest.approx(train_metrics["test"][key], abs=1e-5, nan_ok=True), key
    figures = ("confusion_matrix.png", "roc.png", "dice_distribution.png", "gallery.png", "worst_cases.png")
    for name in ("metrics.json", "per_image.csv", "split.csv", *figures):
        assert (out / name).is_file(), name
    table = pd.read_csv(out / "per_image.csv")
    test_ids = pd.read_csv(run / "split.csv").query("split == 'test'")["id"]
    assert sorted(table["id"]) == sorted(test_ids)
    assert {"id", "class", "pred_class", "p_normal", "p_benign", "p_malignant", "dice", "iou"} <= set(
        table.columns
    )
    lesion = table[table["class"] != "normal"]
    assert lesion["dice"].mean() == pytest.approx(metrics["test"]["dice"], abs=1e-5)


def test_evaluate_a_whole_folder(trained_run, synthetic_busi, tmp_path):
    run, _ = trained_run
    metrics, out = _evaluate(
        tmp_path, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "split=all", f"data.root={synthetic_busi}"
    )
    assert metrics["n_images"] == 36
    assert metrics["all"]["n_lesion_images"] == 24 and metrics["all"]["n_normal_images"] == 12
    assert len(pd.read_csv(out / "per_image.csv")) == 36


def test_threshold_override_changes_predictions(trained_run, tmp_path):
    run, _ = trained_run
    ckpt = f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    low, _ = _evaluate(tmp_path / "a", ckpt, "threshold=0.05")
    high, _ = _evaluate(tmp_path / "b", ckpt, "threshold=0.95")
    assert low["test"]["normal_empty_rate"] <= high["test"]["normal_empty_rate"]
    low_px = pd.read_csv(tmp_path / "a" / "run" / "per_image.csv")["pred_lesion_px"].sum()
    high_px = pd.read_csv(tmp_path / "b" / "run" / "per_image.csv")["pred_lesion_px"].sum()
    assert low_px > high_px


def test_an_evaluation_after_an_edit_warns_and_records_it(trained_run, tmp_path, monkeypatch, caplog):
    # As if conf/eval.yaml had been edited after this process imported the package (e.g. mid-multirun).
    monkeypatch.setitem(run_utils.LOADED_TREE, "conf/eval.yaml", "0" * 40)
    run, _ = trained_run
    with caplog.at_level("WARNING", logger="busi_mtl.utils.run"):
        _, out = _evaluate(tmp_path, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert "Changed since this process started: conf/eval.yaml" in caplog.text
    assert json.loads((out / "run_info.json").read_text())["changed_since_start"] == ["conf/eval.yaml"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        _evaluate(tmp_path, f"ckpt_path={tmp_path / 'nope.ckpt'}")
    assert (tmp_path / "run" / "error.txt").is_file()


def test_external_validation_on_a_set_without_normals(trained_run, tmp_path):
    run, _ = trained_run
    external = generate_busi(tmp_path / "external", per_class={"benign": 6, "malignant": 6}, seed=11)

    cfg = compose_config(
        "external",
        [
            f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
            f"data.root={external}",
            "trainer.accelerator=cpu",
        ],
        tmp_path,
    )
    metrics = evaluate(cfg)
    values = metrics["all"]
    assert metrics["n_images"] == 12 and values["n_normal_images"] == 0 and values["n_lesion_images"] == 12
    assert 0 <= values["bm_acc"] <= 1 and 0 <= values["bm_auroc"] <= 1 and 0 <= values["dice"] <= 1


def test_postprocess_override_reports_pp_metrics(trained_run, tmp_path):
    run, _ = trained_run
    metrics, out = _evaluate(
        tmp_path, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "postprocess.min_area=0.01"
    )
    assert {"pp_dice", "pp_normal_empty_rate", "bm_acc"} <= set(metrics["test"])
    table = pd.read_csv(out / "per_image.csv")
    assert (table["pp_lesion_px"] <= table["pred_lesion_px"]).all()
