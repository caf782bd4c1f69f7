"""Fold-model ensembles: members from a CV run, post-processing chosen out of fold, and the same numbers as
busi_mtl.evaluate for a single member."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from busi_mtl.ensemble import (
    Predictions,
    average,
    ensemble,
    member_checkpoints,
    pool,
    score,
    tune,
)
from busi_mtl.evaluate import evaluate

from conftest import TINY_TRAIN, compose_config


@pytest.fixture(scope="module")
def cv_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 2-fold CV laid out as a multirun: sweep/0 and sweep/1 on the same synthetic set."""
    from busi_mtl.train import train

    workdir = tmp_path_factory.mktemp("cv")
    for fold in (0, 1):
        overrides = [*TINY_TRAIN, "data.num_folds=2", f"data.fold={fold}", "postprocess.normal_gate=0.5"]
        cfg = compose_config("train", overrides, workdir)
        with open_dict(cfg):
            cfg.paths.output_dir = str(workdir / "sweep" / str(fold))
        train(cfg)
    return workdir / "sweep"


def _ensemble(tmp_path: Path, *overrides: str) -> tuple[dict, Path]:
    cfg = compose_config("ensemble", ["device=cpu", *overrides], tmp_path)
    return ensemble(cfg), tmp_path / "run"


def test_cv_ensemble_tunes_out_of_fold_and_reports_the_test_split(cv_sweep, tmp_path):
    report, out = _ensemble(tmp_path, f"runs={cv_sweep}")
    split = pd.read_csv(cv_sweep / "0" / "split.csv")
    assert report["oof"]["n_images"] == (split["split"] != "test").sum()  # every non-test image once
    assert len(report["members"]) == 2 and len(report["member_metrics"]) == 2
    table = pd.read_csv(out / "per_image.csv")
    assert sorted(table["id"]) == sorted(split.loc[split["split"] == "test", "id"])
    oof_table = pd.read_csv(out / "oof_per_image.csv")
    assert len(oof_table) == report["oof"]["n_images"]
    groups = split.set_index("id")["group"]  # the groups the split kept together
    assert (oof_table["dup_group"].to_numpy() == groups.loc[oof_table["id"]].to_numpy()).all()
    grid = pd.read_csv(out / "oof_grid.csv")
    defaults = OmegaConf.load(Path(__file__).parents[1] / "conf" / "ensemble.yaml").grid
    assert len(grid) == np.prod([len(defaults[k]) for k in defaults])  # every combination once
    assert report["oof"]["all_image_dice"] == pytest.approx(grid["all_image_dice"].max())
    assert report["chosen"]["threshold"] in defaults.threshold
    for key in ("dice", "f1", "auroc", "pp_dice", "pp_normal_empty_rate", "native_dice"):
        assert key in report["test"], key
    low, high = report["ci95"]["dice"]  # the ensemble's test Dice, bootstrapped by duplicate group
    assert low <= report["test"]["dice"] <= high and report["bootstrap"]["groups"] <= len(table)
    assert json.loads((out / "metrics.json").read_text())["chosen"] == report["chosen"]


def test_pooled_cvs_average_out_of_fold_per_image(cv_sweep, tmp_path):
    """The same CV pooled twice: each image is held out by two identical members, so every choice and
    figure equals the single CV's, with twice the members."""
    single, _ = _ensemble(tmp_path / "one", f"runs={cv_sweep}", "tta=false")
    pooled, _ = _ensemble(tmp_path / "two", f"runs=[{cv_sweep},{cv_sweep}]", "tta=false")
    assert len(pooled["members"]) == 2 * len(single["members"])
    assert single["oof"]["members_per_image"] == [1] and pooled["oof"]["members_per_image"] == [2]
    assert pooled["oof"]["n_images"] == single["oof"]["n_images"]
    assert pooled["chosen"] == single["chosen"]
    for key in ("dice", "iou", "f1", "auroc", "pp_dice", "pp_normal_empty_rate"):
        assert pooled["test"][key] == pytest.approx(single["test"][key], abs=1e-5, nan_ok=True), key


def test_members_with_other_score_weights_are_refused(cv_sweep, tmp_path, monkeypatch):
    import busi_mtl.ensemble as ensemble_module

    loaded = []

    def load_module(ckpt, device):
        module = real_load(ckpt, device)
        if loaded:
            module.score_weights = {"dice": 1.0}
        loaded.append(module)
        return module

    real_load = ensemble_module.load_module
    monkeypatch.setattr(ensemble_module, "load_module", load_module)
    with pytest.raises(ValueError, match="val/score weights"):
        _ensemble(tmp_path, f"runs={cv_sweep}", "tta=false")


def test_one_member_without_tta_matches_evaluate(cv_sweep, tmp_path):
    best = member_checkpoints(cv_sweep)[0]
    report, _ = _ensemble(tmp_path / "ens", f"ckpt_paths=[{best}]", "tta=false", "tune=false")
    single = evaluate(
        compose_config("eval", ["trainer.accelerator=cpu", f"ckpt_path={best}"], tmp_path / "ev")
    )
    assert report["chosen"]["normal_gate"] == 0.5  # the checkpoint's own post-processing
    keys = ("dice", "iou", "f1", "acc", "auroc", "normal_empty_rate", "pp_dice", "pp_normal_empty_rate")
    for key in (*keys, "native_dice", "native_pp_dice", "native_pp_normal_empty_rate"):
        assert report["test"][key] == pytest.approx(single["test"][key], abs=1e-5, nan_ok=True), key


def _predictions(ids: list[str], lesion: torch.Tensor, class_probs: torch.Tensor, truth: torch.Tensor):
    return Predictions(ids, torch.tensor([0, 1])[: len(ids)], class_probs, lesion, truth)


def test_tune_picks_the_setting_that_removes_specks():
    truth = torch.zeros(2, 20, 20, dtype=torch.bool)
    truth[1, 5:15, 5:15] = True  # image 0: normal, image 1: a lesion
    lesion = torch.zeros(2, 20, 20)
    lesion[1, 5:15, 5:15] = 0.9
    lesion[:, 0:2, 0:2] = 0.55  # a faint speck on both images
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]])
    grid = OmegaConf.create(
        {
            "threshold": [0.5, 0.6],
            "normal_gate": [None],
            "min_area": [0.0],
            "max_components": [None],
            "rescue": [None],
        }
    )
    threshold, postprocess, table = tune(_predictions(["n", "b"], lesion, probs, truth), grid)
    assert threshold == 0.6 and not postprocess.enabled
    assert table["all_image_dice"].max() == pytest.approx(1.0)
    # at threshold 0.5, gating the confident normal empties its speck
    grid = OmegaConf.create(
        {
            "threshold": [0.5],
            "normal_gate": [None, 0.7],
            "min_area": [0.0],
            "max_components": [None],
            "rescue": [None],
        }
    )
    assert tune(_predictions(["n", "b"], lesion, probs, truth), grid)[1].normal_gate == 0.7


def test_tune_rescues_faint_lesions_and_scores_them_as_score_does():
    """A lesion the network sees only faintly (peak 0.3, under every threshold) is left empty unless
    rescue fills it; the normal image the classifier calls normal is never filled. The tuned figure is
    the one score() gives under the chosen settings."""
    truth = torch.zeros(3, 20, 20, dtype=torch.bool)
    truth[1, 5:15, 5:15] = truth[2, 2:8, 2:8] = True  # image 0: normal; images 1-2: lesions
    lesion = torch.full((3, 20, 20), 0.01)
    lesion[1, 5:15, 5:15] = 0.3  # faint but in the right place
    lesion[1, 8:12, 8:12] = 0.35
    lesion[2, 2:8, 2:8] = 0.9  # seen clearly
    lesion[0, 10:12, 10:12] = 0.2  # faint noise on the normal image
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])
    pred = Predictions(["n", "b", "m"], torch.tensor([0, 1, 2]), probs, lesion, truth)
    grid = OmegaConf.create(
        {
            "threshold": [0.5],
            "normal_gate": [None],
            "min_area": [0.0],
            "max_components": [None],
            "rescue": [None, 0.5],
        }
    )
    threshold, postprocess, table = tune(pred, grid)
    assert postprocess.rescue == 0.5 and len(table) == 2
    assert table["all_image_dice"].tolist() == pytest.approx([2 / 3, 1.0])  # image 1: Dice 0, then 1
    outputs = score(pred, threshold, postprocess, {"dice": 1.0})[1][0]
    assert torch.equal(outputs["pp_mask"], truth)  # the normal image stays empty: p(normal) 0.8
    assert not outputs["pred_mask"][1].any()


def test_average_aligns_members_by_image_id():
    truth = torch.zeros(2, 4, 4, dtype=torch.bool)
    a = _predictions(["x", "y"], torch.zeros(2, 4, 4), torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), truth)
    b = Predictions(
        ["y", "x"],
        torch.tensor([1, 0]),
        torch.tensor([[0, 0, 1.0], [0, 1.0, 0]]),
        torch.stack([torch.ones(4, 4), torch.zeros(4, 4)]),
        truth,
    )
    mean = average([a, b])
    assert torch.allclose(mean.class_probs, torch.tensor([[0.5, 0.5, 0], [0, 0.5, 0.5]]))
    assert mean.lesion_probs[0].max() == 0 and mean.lesion_probs[1].min() == 0.5
    with pytest.raises(ValueError, match="different images"):
        average([a, _predictions(["x", "z"], a.lesion_probs, a.class_probs, truth)])


def test_pool_means_each_images_predictions_and_refuses_misaligned_masks():
    truth = torch.zeros(3, 4, 4, dtype=torch.bool)
    truth[1, :2] = True
    probs = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    fold_a = Predictions(["x", "y"], torch.tensor([0, 1]), probs[:2], torch.zeros(2, 4, 4), truth[:2])
    fold_b = Predictions(["z"], torch.tensor([2]), probs[2:], torch.zeros(1, 4, 4), truth[2:])
    order = [1, 2, 0]
    other_cv = Predictions(
        ["y", "z", "x"], torch.tensor(order), probs[[2, 0, 1]], torch.ones(3, 4, 4), truth[order]
    )
    pooled = pool([fold_a, fold_b, other_cv])
    assert pooled.ids == ["x", "y", "z"] and pooled.labels.tolist() == [0, 1, 2]
    assert torch.equal(pooled.true_masks, truth)
    assert torch.allclose(pooled.class_probs, torch.tensor([[0.5, 0.5, 0], [0, 0.5, 0.5], [0.5, 0, 0.5]]))
    assert torch.allclose(pooled.lesion_probs, torch.full((3, 4, 4), 0.5))
    assert pooled.n_members.tolist() == [2, 2, 2]
    assert pool([fold_a, fold_b, fold_a]).n_members.tolist() == [2, 2, 1]  # a CV without its fold 1
    shifted = Predictions(["y"], torch.tensor([1]), probs[1:2], torch.zeros(1, 4, 4), truth[1:2].roll(1, 1))
    with pytest.raises(ValueError, match="preprocess the images"):
        pool([fold_a, shifted])


def test_runs_without_finished_jobs_is_a_clear_error(tmp_path):
    (tmp_path / "sweep" / "0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no finished jobs"):
        member_checkpoints(tmp_path / "sweep")
