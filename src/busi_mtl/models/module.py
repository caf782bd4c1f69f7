"""MultiTaskModule: training, validation and testing of the segmentation + classification network.

Hyperparameters are plain dicts (``net``, ``loss``, ``optimizer``, ``scheduler``), saved into every
checkpoint, so a checkpoint rebuilds its own network without the run's config files.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from busi_mtl.data import CLASSES
from busi_mtl.losses import MultiTaskLoss
from busi_mtl.metrics import (
    SegmentationMetrics,
    binarize,
    classification_metrics,
    collect_stage,
    confusion_keys,
    confusion_matrix,
)
from busi_mtl.models.factory import MultiTaskNet, build_model
from busi_mtl.postprocess import PostProcess

log = logging.getLogger(__name__)

STAGES = ("val", "test")


def cosine_with_warmup(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """LR multiplier per optimizer step: linear warmup, then cosine decay to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class MultiTaskModule(pl.LightningModule):
    """Lesion segmentation + normal/benign/malignant classification with ``alpha*seg + beta*cls``."""

    def __init__(
        self,
        net: dict,
        loss: dict,
        optimizer: dict,
        scheduler: dict,
        monitor: str = "val/score",
        threshold: float = 0.5,
        score_weights: dict[str, float] | None = None,
        compile: bool = False,
        channels_last: bool = False,
        seed: int = 0,
        postprocess: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # train.py logs the whole run config once, with results
        self.net: MultiTaskNet = build_model(**net)
        self.criterion = MultiTaskLoss(**loss)
        self.postprocess = PostProcess(**(postprocess or {}))
        self.seg_metrics = nn.ModuleDict({stage: SegmentationMetrics() for stage in STAGES})
        self.pp_metrics = nn.ModuleDict({stage: SegmentationMetrics() for stage in STAGES})
        self.cls_metrics = nn.ModuleDict({stage: classification_metrics(len(CLASSES)) for stage in STAGES})
        self.confusion = nn.ModuleDict({stage: confusion_matrix(len(CLASSES)) for stage in STAGES})
        self.score_weights = score_weights or {"dice": 0.5, "f1": 0.5}
        if channels_last:  # NHWC convolutions: faster with tensor cores under AMP
            self.net = self.net.to(memory_format=torch.channels_last)
        # Compiled forward kept outside the module tree, so state_dict keys (and checkpoints) are unchanged.
        self._forward = [torch.compile(self.net)] if compile else [self.net]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self._forward[0](images)

    def probabilities(self, images: torch.Tensor, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Lesion (B, 1, H, W) and class (B, C) probabilities; with ``tta`` averaged with those of the
        horizontally flipped image (the one flip valid for B-mode scans)."""
        mask_logits, class_logits = self(images)
        lesion, classes = mask_logits.float().sigmoid(), class_logits.float().softmax(1)
        if tta:
            flip_masks, flip_classes = self(images.flip(-1))
            lesion = (lesion + flip_masks.float().sigmoid().flip(-1)) / 2
            classes = (classes + flip_classes.float().softmax(1)) / 2
        return lesion, classes

    def setup(self, stage: str) -> None:
        """Take the train split's class weights and intensity statistics from the datamodule."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and datamodule is not None:
            self.criterion.set_class_weights(datamodule.class_weights)
            self.net.set_normalization(datamodule.pixel_mean, datamodule.pixel_std)

    def on_train_epoch_start(self) -> None:
        """Reseed torch/numpy/random from (seed, epoch, rank): dropout and any other global randomness then
        depend on the epoch alone, so a run resumed at an epoch boundary continues exactly like an
        uninterrupted one (batch order and augmentation are seeded the same way by the datamodule)."""
        state = np.random.SeedSequence(
            [self.hparams.seed, self.current_epoch, self.global_rank]
        ).generate_state(1)
        seed = int(state[0])
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        mask_logits, class_logits = self(batch["image"])
        losses = self.criterion(mask_logits, class_logits, batch["mask"], batch["label"])
        self.log_dict(
            {f"train/{k}": v for k, v in losses.items()},
            on_step=True,
            on_epoch=True,
            batch_size=len(batch["label"]),
        )
        return losses["loss"]

    def _eval_step(self, batch: dict, stage: str) -> None:
        mask_logits, class_logits = self(batch["image"])
        losses = self.criterion(mask_logits, class_logits, batch["mask"], batch["label"])
        self.log_dict(
            {f"{stage}/{k}": v for k, v in losses.items()},
            on_epoch=True,
            batch_size=len(batch["label"]),
            sync_dist=True,  # epoch means over all ranks' batches; one reduction per epoch
        )
        probs = class_logits.float().softmax(dim=1)
        # bool masks: the metric's binary check needs no host sync (the datamodule guarantees {0, 1})
        preds, target = binarize(mask_logits, self.hparams.threshold), batch["mask"].bool()
        self.seg_metrics[stage].update(preds, target, batch["label"])
        if self.postprocess.enabled:
            # the lesion probabilities only for rescue: no sigmoid over every validation batch otherwise
            lesion = mask_logits.float().sigmoid() if self.postprocess.rescue is not None else None
            cleaned = self.postprocess(preds, probs, lesion)
            self.pp_metrics[stage].update(cleaned, target, batch["label"])
        self.cls_metrics[stage].update(probs, batch["label"])
        self.confusion[stage].update(probs, batch["label"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Per-image outputs on the CPU, for evaluation reports (masks at the model's resolution)."""
        mask_logits, class_logits = self(batch["image"])
        probs = class_logits.float().softmax(dim=1)
        preds, lesion = binarize(mask_logits, self.hparams.threshold), mask_logits.float().sigmoid()
        return {
            "id": list(batch["id"]),
            "label": batch["label"].cpu(),
            "probs": probs.cpu(),
            "lesion_prob": lesion[:, 0].cpu(),
            "pred_mask": preds[:, 0].cpu(),
            "pp_mask": self.postprocess(preds, probs, lesion)[:, 0].cpu(),
            "true_mask": batch["mask"][:, 0].bool().cpu(),
        }

    def _end_epoch(self, stage: str) -> None:
        """Compute (DDP-synced by torchmetrics) and log every metric, the score and the confusion cells."""
        values = {**self.seg_metrics[stage].compute(), **self.cls_metrics[stage].compute()}
        if self.postprocess.enabled:
            values.update(
                {f"pp_{k}": v for k, v in self.pp_metrics[stage].compute().items() if not k.startswith("n_")}
            )
        values = {k: torch.as_tensor(v, dtype=torch.float32, device=self.device) for k, v in values.items()}
        # One number that rewards both tasks, for checkpointing, early stopping and sweeps.
        values["score"] = sum(w * values[k] for k, w in self.score_weights.items())
        confusion = self.confusion[stage].compute().float()
        for row, keys in enumerate(confusion_keys(stage)):
            for col, key in enumerate(keys):
                values[key.removeprefix(f"{stage}/")] = confusion[row, col]
        # Values are already global (torchmetrics synced the states); sync_dist just averages equal numbers.
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, sync_dist=True)
        for metric in (
            self.seg_metrics[stage],
            self.pp_metrics[stage],
            self.cls_metrics[stage],
            self.confusion[stage],
        ):
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._end_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._end_epoch("test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store this epoch's val metrics, so the best checkpoint knows the numbers it was chosen for."""
        val = collect_stage(self.trainer.callback_metrics, "val") if self._trainer is not None else {}
        checkpoint["busi_mtl"] = {"classes": list(CLASSES), "val_metrics": val or None}

    def configure_optimizers(self) -> dict:
        opt = dict(self.hparams.optimizer)
        encoder_lr_scale = opt.pop("encoder_lr_scale", 1.0)  # absent from checkpoints before it existed
        # Partial, then called: instantiate would turn the groups' dicts into DictConfigs.
        make_optimizer = hydra.utils.instantiate(opt, _partial_=True)
        optimizer = make_optimizer(param_groups(self, opt["lr"], encoder_lr_scale))
        cfg = dict(self.hparams.scheduler)
        name = cfg.pop("name")
        if name == "none":
            return {"optimizer": optimizer}
        if name == "cosine":
            if self.trainer.max_epochs is None or self.trainer.max_epochs < 1:
                raise ValueError("scheduler=cosine needs a finite trainer.max_epochs.")
            total = int(self.trainer.estimated_stepping_batches)
            warmup = round(cfg["warmup_epochs"] * total / self.trainer.max_epochs)
            factor = cosine_with_warmup(warmup, total, cfg["min_lr_ratio"])
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        if name == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=cfg["mode"], factor=cfg["factor"], patience=cfg["patience"]
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {
                    "scheduler": scheduler,
                    "monitor": self.hparams.monitor,
                    "interval": "epoch",
                },
            }
        raise ValueError(f"scheduler.name={name!r}: choose cosine, plateau or none.")


def param_groups(module: MultiTaskModule, lr: float, encoder_lr_scale: float) -> list[dict]:
    """The encoder's parameters at ``lr * encoder_lr_scale``, everything else the module trains (the
    decoder, the head and the loss's learned weights under ``loss.weighting=uncertainty``) at ``lr``:
    a smaller step for the ImageNet-initialised encoder keeps more of what it learned from many images
    while the parts that start from random learn at the full rate.

    At scale 1 it is one group, as before the option existed: the learning-rate log keeps its name
    (``lr-Adam``) and optimizer states saved with one group still resume. Otherwise the groups are
    named, so the log shows ``lr-Adam/encoder`` and ``lr-Adam/decoder_head``.
    """
    if not encoder_lr_scale > 0:
        raise ValueError(
            f"optimizer.encoder_lr_scale={encoder_lr_scale}: must be > 0 (1 = one rate for all)."
        )
    if encoder_lr_scale == 1:
        return [{"params": list(module.parameters()), "lr": lr}]
    encoder = list(module.net.seg.encoder.parameters())
    ids = {id(p) for p in encoder}
    rest = [p for p in module.parameters() if id(p) not in ids]
    return [
        {"params": encoder, "lr": lr * encoder_lr_scale, "name": "encoder"},
        {"params": rest, "lr": lr, "name": "decoder_head"},
    ]


def read_checkpoint(ckpt_path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint's contents, unpickled safely (``weights_only=True``: tensors and plain data only)."""
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={path}: no such checkpoint file.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ValueError(f"{path}: cannot be read as a checkpoint with weights_only=True ({err}).") from err


def load_module(ckpt: str | Path | dict, map_location: str | torch.device = "cpu") -> MultiTaskModule:
    """Rebuild a trained module from a checkpoint (a path or its :func:`read_checkpoint` contents).

    Encoder weights are not fetched again (the checkpoint holds them); a checkpoint whose tensors do
    not fit the architecture it names gets an error instead of a half-loaded model.
    """
    name = ckpt if not isinstance(ckpt, dict) else "checkpoint"
    if not isinstance(ckpt, dict):
        ckpt = read_checkpoint(ckpt, map_location)
    if "net" not in ckpt.get("hyper_parameters", {}):
        raise ValueError(f"{name}: not a busi-mtl checkpoint (no model hyperparameters inside).")
    hparams = dict(ckpt["hyper_parameters"])
    hparams["net"] = {**hparams["net"], "encoder_weights": None}
    module = MultiTaskModule(**hparams)
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise ValueError(
            f"{name}: weights do not match the architecture saved with them ({hparams['net']}): {err}"
        ) from err
    return module.to(map_location).eval()
