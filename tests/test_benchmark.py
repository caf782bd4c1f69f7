"""The benchmark runs end to end (tiny sizes) and reports every measurement and ratio."""

from __future__ import annotations

import json

import torch

from busi_mtl.benchmark import default_per_class, main


def test_benchmark_reports_all_measurements(tmp_path):
    out = tmp_path / "bench.json"
    tiny = ["--image-size", "64", "--encoder", "resnet18", "--decoder-channels", "16", "16", "16", "16", "16"]
    tiny += ["--batch-size", "4", "--steps", "2", "--warmup", "1", "--epochs", "2", "--per-class", "6"]
    results = main([*tiny, "--workers", "0", "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    for key in ("raw", "lightning", "dataloader", "epoch", "inference"):
        assert saved[key]["images_per_s"] > 0, key
    assert saved["flops_forward_per_image"] > 1e8
    assert saved["inference"]["latency_ms"] > 0 and len(saved["epoch"]["epoch_s"]) == 2
    assert set(results["ratios"]) == {
        "lightning/raw (target >= 0.95)",
        "dataloader/raw (target >= 3)",
        "epoch/raw (target >= 0.90)",
    }


def test_gpu_default_set_is_large_enough_to_time_throughput():
    assert default_per_class(torch.device("cpu")) == 30
    assert default_per_class(torch.device("cuda")) == 300  # 540 train images: 33 batches of 16 per epoch
