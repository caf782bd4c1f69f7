"""Evaluating a checkpoint: its own preprocessing and split, files written, whole folders, bad input."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from busi_mtl.data import BENIGN
from busi_mtl.data.busi import load_image, load_mask, scan_busi
from busi_mtl.data.synthetic import generate_busi
from busi_mtl.evaluate import aggregate, confidence_intervals, evaluate, image_groups, native_scores
from busi_mtl.metrics import per_image_scores
from busi_mtl.models.module import read_checkpoint
from busi_mtl.postprocess import PostProcess
from busi_mtl.predict import Predictor
from busi_mtl.utils import run as run_utils

from conftest import compose_config, write_png


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


def test_native_metrics_score_the_masks_predict_writes(trained_run, tmp_path):
    run, _ = trained_run
    ckpt = run / "checkpoints" / "last.ckpt"
    metrics, out = _evaluate(tmp_path, f"ckpt_path={ckpt}")
    values, table = metrics["test"], pd.read_csv(out / "per_image.csv")
    lesion = table[table["class"] != "normal"]
    assert values["native_dice"] == pytest.approx(lesion["native_dice"].mean(), abs=1e-6)
    assert values["native_pp_dice"] == pytest.approx(lesion["native_pp_dice"].mean(), abs=1e-6)
    assert values["native_n_lesion_images"] == len(lesion)
    # Independently: busi_mtl.predict's full-size masks against the mask files, image by image.
    manifest = scan_busi(read_checkpoint(ckpt)["datamodule_hyper_parameters"]["root"]).set_index("id")
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    for row in lesion.itertuples():
        image = load_image(manifest.loc[row.id, "image_path"])
        [mask], _ = predictor.masks([image])
        true = load_mask(manifest.loc[row.id, "mask_paths"], image.shape)
        dice, _ = per_image_scores(torch.from_numpy(mask)[None], torch.from_numpy(true)[None])
        assert float(dice[0]) == pytest.approx(row.native_pp_dice, abs=1e-4), row.id


def test_native_metrics_count_a_lesion_the_resize_lost(tmp_path):
    # A 3x3 px lesion in a 320x320 image: empty once area-resized to 64 px, so the network-resolution
    # Dice leaves the image out; at its own size it counts, and an empty prediction scores 0.
    mask = np.zeros((320, 320), np.uint8)
    mask[100:103, 100:103] = 255
    manifest = pd.DataFrame(
        {
            "id": ["benign (1)"],
            "height": [320],
            "width": [320],
            "mask_paths": [(str(write_png(tmp_path / "benign (1)_mask.png", mask)),)],
        }
    )
    outputs = [
        {
            "id": ["benign (1)"],
            "label": torch.tensor([BENIGN]),
            "probs": torch.tensor([[0.1, 0.8, 0.1]]),
            "lesion_prob": torch.zeros(1, 64, 64),
            "pred_mask": torch.zeros(1, 64, 64, dtype=torch.bool),
            "pp_mask": torch.zeros(1, 64, 64, dtype=torch.bool),
            "true_mask": torch.zeros(1, 64, 64, dtype=torch.bool),
        }
    ]
    values = aggregate(outputs, {"dice": 1.0}, postprocessed=False)
    assert values["n_lesion_images"] == 0 and np.isnan(values["dice"])
    datamodule = SimpleNamespace(manifest=manifest, preprocessing=SimpleNamespace(keep_aspect=False))
    native, per_image = native_scores(outputs, datamodule, 0.5, PostProcess())
    assert native["native_n_lesion_images"] == 1 and native["native_dice"] == 0
    assert native["native_dice_micro"] == 0 and per_image["native_dice"].tolist() == [0.0]
    assert "native_pp_dice" not in native  # no post-processing configured


def test_intervals_resample_by_the_audit_duplicate_groups():
    # Rows are matched to the manifest by id; "a" and "b" are one scan, so 3 images are 2 cases.
    datamodule = SimpleNamespace(
        manifest=pd.DataFrame({"id": ["a", "b", "c", "d"]}), duplicate_groups=np.array([0, 0, 1, 2])
    )
    table = pd.DataFrame(
        {
            "id": ["d", "a", "b"],
            "class": ["benign"] * 3,
            "pred_class": ["benign"] * 3,
            **{f"p_{c}": [1 / 3] * 3 for c in ("normal", "benign", "malignant")},
            "dice": [0.2, 0.9, 0.9],
        }
    )
    table["dup_group"] = image_groups(table["id"], datamodule)
    assert table["dup_group"].tolist() == [2, 0, 0]
    out = confidence_intervals(table, resamples=200, seed=0, score_weights={"dice": 1.0})
    assert out["bootstrap"] == {"resamples": 200, "seed": 0, "unit": "near-duplicate group", "groups": 2}
    assert out["ci95"]["dice"] == pytest.approx([0.2, 0.9])  # either case alone, or both (0.667)


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
    assert math.isnan(values["auroc"])  # no normal image: the 3-class AUROC is undefined, not deflated


def test_postprocess_override_reports_pp_metrics(trained_run, tmp_path):
    run, _ = trained_run
    metrics, out = _evaluate(
        tmp_path, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "postprocess.min_area=0.01"
    )
    assert {"pp_dice", "pp_normal_empty_rate", "bm_acc"} <= set(metrics["test"])
    table = pd.read_csv(out / "per_image.csv")
    assert (table["pp_lesion_px"] <= table["pred_lesion_px"]).all()


def test_rescue_override_fills_only_empty_masks_called_lesions(trained_run, tmp_path):
    run, _ = trained_run
    metrics, out = _evaluate(
        tmp_path,
        f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        "postprocess.rescue=0.5",  # beside the checkpoint's normal gate 0.5
        "threshold=0.99",  # few pixels pass: most masks start empty
    )
    assert metrics["test"]["pp_dice"] >= 0
    table = pd.read_csv(out / "per_image.csv")
    filled = (table["pred_lesion_px"] == 0) & (table["p_normal"] < 0.5)
    assert filled.any()
    assert (table.loc[filled, "pp_lesion_px"] > 0).all()
    gated = table["p_normal"] >= 0.5
    assert (table.loc[gated, "pp_lesion_px"] == 0).all()
    kept = ~filled & ~gated
    assert (table.loc[kept, "pp_lesion_px"] == table.loc[kept, "pred_lesion_px"]).all()
