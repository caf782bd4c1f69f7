"""The training entry point: every config option composes, the CLI runs, a tiny run leaves a complete run dir."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from busi_mtl.train import build_module
from busi_mtl.utils.paths import CONFIG_DIR
from busi_mtl.utils.run import DEFAULT_THREADS, set_threads

from conftest import TINY_TRAIN, compose_config

GROUPS = ["data", "model", "loss", "optimizer", "scheduler", "trainer", "callbacks", "logger", "experiment"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONFIG_DIR / g).glob("*.yaml"))]
METRIC_KEYS = {"dice", "iou", "miou", "dice_micro", "pixel_acc", "normal_empty_rate", "acc", "precision"}
METRIC_KEYS |= {"recall", "f1", "auroc", "score", "confusion_matrix"}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_option_composes_and_resolves(group, option, tmp_path):
    cfg = compose_config("train", [f"{group}={option}", "data.root=/data/busi"], tmp_path)
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert container["model"]["arch"] in ("unet", "unetplusplus", "fpn", "deeplabv3plus")
    if group in ("model", "loss", "optimizer", "scheduler"):
        build_module(cfg)  # the module accepts every option of the groups it is built from


def test_busi_gpu_keeps_the_settings_its_readme_figures_came_from(tmp_path):
    recipe, gpu = (
        compose_config("train", [f"experiment={e}", "data.root=/x"], tmp_path) for e in ("busi", "busi_gpu")
    )
    assert (recipe.loss.dice_reduction, recipe.loss.focal_weight) == ("image", 3.0)
    # busi_gpu's CVs ran with the pooled Dice busi used until 2026-12-02, so it must not follow busi's loss.
    assert (gpu.loss.dice_reduction, gpu.loss.focal_weight) == ("batch", 1.0)
    assert (gpu.data.image_size, recipe.data.image_size) == (256, 160)
    assert OmegaConf.merge(recipe.model, {"channels_last": True}) == gpu.model


def test_eval_and_audit_configs_compose(tmp_path):
    assert compose_config("eval", ["ckpt_path=x.ckpt"], tmp_path).split == "test"
    assert compose_config("audit", ["data.root=/x"], tmp_path).data.dup_threshold == 64


def test_trainer_and_callbacks_instantiate(tmp_path):
    cfg = compose_config("train", ["experiment=demo"], tmp_path)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    assert trainer.checkpoint_callback.monitor == "val/score"
    assert [c.filename for c in trainer.checkpoint_callbacks] == ["epoch_{epoch:03d}", "last"]


def test_tiny_training_run_leaves_a_complete_run_dir(trained_run):
    run, metrics = trained_run
    for name in ("metrics.json", "split.csv", "run_info.json", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "csv" / "metrics.csv").is_file()
    assert not (run / "error.txt").exists()
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["epochs_trained"] == 2 and saved["monitor"] == "val/score"
    assert METRIC_KEYS.issubset(saved["val"]) and METRIC_KEYS.issubset(saved["test"])
    assert {"pp_dice", "pp_normal_empty_rate"} <= set(saved["test"])  # post-processing is on in this run
    assert saved["best_val"] == pytest.approx(saved["val"]["score"])
    assert torch.load(saved["best_ckpt"], weights_only=True)["epoch"] == saved["best_epoch"]
    split = pd.read_csv(run / "split.csv")
    n_test = (split["split"] == "test").sum()
    assert metrics["test"]["n_lesion_images"] + metrics["test"]["n_normal_images"] == n_test
    info = json.loads((run / "run_info.json").read_text())
    assert info["packages"]["torch"] and "commit" in info["git"]
    assert info["cpu_threads"] == 1  # num_threads=1 in the run's config


def test_null_num_threads_restores_the_default_after_an_earlier_job():
    """A multirun runs its jobs in one process: a job with num_threads=null after one with another count must
    not inherit it."""
    set_threads(DEFAULT_THREADS + 1)
    set_threads(None)
    assert torch.get_num_threads() == DEFAULT_THREADS


@pytest.mark.parametrize("bad", [0, -2, 1.5, "4", True])
def test_num_threads_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="num_threads"):
        set_threads(bad)


def test_csv_log_has_every_loss_term_and_metric(trained_run):
    run, _ = trained_run
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in (
        "train/loss_step",
        "train/seg_epoch",
        "train/cls_epoch",
        "train/dice_epoch",
        "train/bce_epoch",
    ):
        assert key in header, key
    for key in ("val/loss", "val/dice", "val/f1", "val/auroc", "val/score", "lr-Adam"):
        assert key in header, key


def test_last_checkpoint_is_the_final_epoch(trained_run):
    run, _ = trained_run
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1


def test_cli_fast_dev_run(tmp_path):
    overrides = [o for o in TINY_TRAIN if not o.startswith("callbacks.")]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "busi_mtl.train",
            *overrides,
            "+trainer.fast_dev_run=1",
            f"paths.root_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["best_ckpt"] is None and METRIC_KEYS.issubset(saved["test"])
    assert all(isinstance(v, (float, list)) or v is None for v in saved["test"].values())
    assert not math.isnan(saved["test"]["pixel_acc"])
