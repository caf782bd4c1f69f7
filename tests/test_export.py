"""Export: ONNX and TorchScript models give PyTorch's outputs; output paths are confined."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest
import torch

from busi_mtl.export import export_model
from busi_mtl.models.module import load_module


@pytest.fixture(scope="module")
def reference(trained_run):
    run, _ = trained_run
    ckpt = run / "checkpoints" / "last.ckpt"
    net = load_module(ckpt).net
    images = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))  # batch 3 != export's 2
    with torch.no_grad():
        masks, logits = net(images)
    return ckpt, images, masks.numpy(), logits.numpy()


def test_onnx_matches_pytorch(reference, tmp_path):
    ckpt, images, masks, logits = reference
    path = export_model(ckpt, "onnx", tmp_path)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_masks, onnx_logits = session.run(None, {"image": images.numpy()})
    np.testing.assert_allclose(onnx_masks, masks, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(onnx_logits, logits, atol=1e-4, rtol=1e-4)
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["classes"] == ["normal", "benign", "malignant"] and card["preprocessing"]["image_size"] == 64
    assert card["outputs"] == ["mask_logits", "class_logits"]


def test_torchscript_matches_pytorch(reference, tmp_path):
    ckpt, images, masks, logits = reference
    path = export_model(ckpt, "torchscript", tmp_path, name="busi")
    assert path.name == "busi.pt"
    scripted = torch.jit.load(str(path))
    with torch.no_grad():
        ts_masks, ts_logits = scripted(images)
    np.testing.assert_allclose(ts_masks.numpy(), masks, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ts_logits.numpy(), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("fmt", "name", "message"),
    [
        ("tflite", "m", "format='tflite'"),
        ("onnx", "../m", "plain file name"),
        ("onnx", ".hidden", "plain file name"),
    ],
)
def test_bad_arguments(reference, tmp_path, fmt, name, message):
    with pytest.raises(ValueError, match=message):
        export_model(reference[0], fmt, tmp_path, name=name)
