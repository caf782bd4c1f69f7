"""MultiTaskModule: LR schedule, per-part learning rates, checkpoint round trip, train-split statistics reaching the network."""

from __future__ import annotations

import pytest
import torch

from busi_mtl.models.module import cosine_with_warmup, load_module
from busi_mtl.train import build_module

from conftest import TINY_TRAIN, compose_config


def test_cosine_with_warmup_shape():
    factor = cosine_with_warmup(warmup_steps=4, total_steps=24, min_lr_ratio=0.1)
    assert [round(factor(s), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert factor(4) == pytest.approx(1.0)
    assert factor(14) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert factor(24) == pytest.approx(0.1) and factor(100) == pytest.approx(0.1)


def test_encoder_lr_scale_gives_the_encoder_its_own_rate(tmp_path):
    cfg = compose_config("train", [*TINY_TRAIN, "scheduler=none", "optimizer.encoder_lr_scale=0.1"], tmp_path)
    module = build_module(cfg)
    encoder, rest = module.configure_optimizers()["optimizer"].param_groups
    assert (encoder["lr"], rest["lr"]) == (pytest.approx(1e-4), pytest.approx(1e-3))
    assert (encoder["name"], rest["name"]) == ("encoder", "decoder_head")  # the lr log's names
    assert {id(p) for p in encoder["params"]} == {id(p) for p in module.net.seg.encoder.parameters()}
    grouped = [id(p) for p in encoder["params"] + rest["params"]]
    assert sorted(grouped) == sorted(id(p) for p in module.parameters())  # each parameter once
    assert {id(p) for p in module.net.head.parameters()} <= {id(p) for p in rest["params"]}


def test_encoder_lr_scale_1_is_one_group(tmp_path):
    cfg = compose_config("train", [*TINY_TRAIN, "scheduler=none"], tmp_path)
    module = build_module(cfg)
    (group,) = module.configure_optimizers()["optimizer"].param_groups
    assert group["lr"] == pytest.approx(1e-3) and "name" not in group
    assert sorted(id(p) for p in group["params"]) == sorted(id(p) for p in module.parameters())


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_uncertainty_weights_are_optimised_at_any_encoder_lr_scale(tmp_path, scale):
    overrides = [
        *TINY_TRAIN,
        "scheduler=none",
        "loss.weighting=uncertainty",
        f"optimizer.encoder_lr_scale={scale}",
    ]
    module = build_module(compose_config("train", overrides, tmp_path))
    optimised = {id(p) for g in module.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert {id(module.criterion.s_seg), id(module.criterion.s_cls)} <= optimised


def test_encoder_lr_scale_must_be_positive(tmp_path):
    cfg = compose_config("train", [*TINY_TRAIN, "scheduler=none", "optimizer.encoder_lr_scale=0"], tmp_path)
    with pytest.raises(ValueError, match="encoder_lr_scale=0"):
        build_module(cfg).configure_optimizers()


def test_checkpoint_round_trip_is_exact_and_safe(trained_run):
    run, _ = trained_run
    ckpt = run / "checkpoints" / "last.ckpt"
    module = load_module(ckpt)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, saved[key], msg=key)
    assert not module.training
    masks, logits = module(torch.rand(2, 1, 64, 64))
    assert masks.shape == (2, 1, 64, 64) and logits.shape == (2, 3)


def test_train_split_statistics_are_in_the_checkpoint(trained_run):
    run, _ = trained_run
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state["net.pixel_mean"].item() != pytest.approx(0.5)  # replaced by the train split's mean
    weights = state["criterion.class_weights"]
    assert weights.shape == (3,) and not torch.allclose(weights, torch.ones(3))


def test_checkpoint_of_another_architecture_is_refused(trained_run, tmp_path):
    run, _ = trained_run
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["net"]["encoder_name"] = "resnet34"
    forged = tmp_path / "forged.ckpt"
    torch.save(ckpt, forged)
    with pytest.raises(ValueError, match="weights do not match the architecture"):
        load_module(forged)


def test_non_busi_checkpoint_is_refused(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a busi-mtl checkpoint"):
        load_module(path)
