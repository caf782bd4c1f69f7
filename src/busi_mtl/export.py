"""Export a trained network: ``python -m busi_mtl.export ckpt_path=... format=onnx|torchscript``.

The exported model takes images (B, 1, S, S) in [0, 1] (S = the checkpoint's ``image_size``; grayscale,
resized, optionally denoised exactly as in training) and returns ``(mask_logits (B, 1, S, S),
class_logits (B, 3))``; intensity normalisation is inside it. A JSON file beside it records the
preprocessing, class order and lesion threshold a deployment must reproduce.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from busi_mtl.data import CLASSES
from busi_mtl.data.transforms import Preprocessing
from busi_mtl.models.module import load_module, read_checkpoint
from busi_mtl.predict import inside
from busi_mtl.utils.paths import CONFIG_DIR
from busi_mtl.utils.run import task_wrapper

log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}


def export_model(ckpt_path: str | Path, fmt: str, output_dir: str | Path, name: str = "model") -> Path:
    """Write the network in ``fmt`` to ``output_dir/name.<ext>`` (never outside ``output_dir``)."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: choose one of {sorted(FORMATS)}.")
    if not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"name={name!r}: a plain file name is required (no folders, no leading dot).")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    target = inside(output_dir, output_dir / f"{name}{FORMATS[fmt]}")
    ckpt = read_checkpoint(ckpt_path)
    net = load_module(ckpt).net.eval()
    preprocessing = Preprocessing.from_hparams(ckpt.get("datamodule_hyper_parameters", {}))
    example = torch.rand(2, 1, preprocessing.image_size, preprocessing.image_size)
    with warnings.catch_warnings():  # tracer warnings about Python control flow in smp/timm code
        warnings.simplefilter("ignore")
        if fmt == "onnx":
            torch.onnx.export(
                net,
                (example,),
                str(target),
                input_names=["image"],
                output_names=["mask_logits", "class_logits"],
                dynamic_axes={
                    "image": {0: "batch"},
                    "mask_logits": {0: "batch"},
                    "class_logits": {0: "batch"},
                },
                opset_version=17,
                dynamo=False,
            )
        else:
            torch.jit.trace(net, example).save(str(target))
    card = {
        "format": fmt,
        "input": {"name": "image", "shape": ["batch", 1, preprocessing.image_size, preprocessing.image_size]},
        "input_range": "[0, 1] (uint8 / 255)",
        "outputs": ["mask_logits", "class_logits"],
        "classes": list(CLASSES),
        "threshold": ckpt["hyper_parameters"].get("threshold", 0.5),
        "preprocessing": asdict(preprocessing),
        "checkpoint": str(Path(ckpt_path).resolve()),
    }
    (target.with_suffix(".json")).write_text(json.dumps(card, indent=2))
    log.info("Exported %s to %s", ckpt_path, target)
    return target


@task_wrapper
def export(cfg: DictConfig) -> Path:
    return export_model(cfg.ckpt_path, cfg.format, cfg.output_dir, cfg.name)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
