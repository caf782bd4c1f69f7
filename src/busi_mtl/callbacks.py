"""Lightning callbacks: overlay galleries and confusion matrices in TensorBoard; a NaN/inf loss guard;
EMA weights that stay in force when testing the best checkpoint; a model summary that counts FLOPs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging, RichModelSummary
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.model_summary import ModelSummary

from busi_mtl.data import CLASSES
from busi_mtl.metrics import binarize, collect_stage
from busi_mtl.visualize import class_lines, confusion_figure, draw_overlay, tile


def _tensorboards(trainer: pl.Trainer) -> list[TensorBoardLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def pick_gallery_indices(labels: np.ndarray, count: int) -> list[int]:
    """Dataset positions cycling through the classes, so every class appears in a small gallery."""
    per_class = [list(np.flatnonzero(labels == c)) for c in range(len(CLASSES))]
    picked: list[int] = []
    while len(picked) < min(count, len(labels)):
        for members in per_class:
            if members and len(picked) < count:
                picked.append(int(members.pop(0)))
    return picked


class OverlayGallery(pl.Callback):
    """After each (n-th) validation epoch, log a grid of fixed val images with true (green) and
    predicted (red) lesion contours and the class probabilities; after testing, the confusion matrix.
    """

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1) -> None:
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = _tensorboards(trainer)
        datamodule = getattr(trainer, "datamodule", None)
        if (
            not loggers
            or trainer.sanity_checking
            or trainer.current_epoch % self.every_n_epochs
            or datamodule is None
            or not len(datamodule.datasets.get("val", []))
        ):
            return
        dataset = datamodule.datasets["val"]
        indices = pick_gallery_indices(dataset.labels[dataset.indices], self.num_images)
        samples = [dataset[i] for i in indices]
        images = torch.stack([s["image"] for s in samples]).to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        mask_logits, class_logits = pl_module(images)
        pl_module.train(was_training)
        preds = binarize(mask_logits, pl_module.hparams.threshold)[:, 0].cpu().numpy()
        probs = class_logits.float().softmax(dim=1).cpu().numpy()
        tiles = []
        for sample, pred, prob in zip(samples, preds, probs, strict=True):
            lines = class_lines(CLASSES[int(sample["label"])], CLASSES[int(prob.argmax())], prob, CLASSES)
            tiles.append(draw_overlay(sample["image"][0].numpy(), pred, sample["mask"][0].numpy(), lines))
        grid = tile(tiles, columns=4)
        for logger in loggers:
            logger.experiment.add_image("val/overlays", grid, trainer.global_step, dataformats="HWC")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = collect_stage(trainer.callback_metrics, "test")
        if "confusion_matrix" not in results:
            return
        figure = confusion_figure(np.array(results["confusion_matrix"]), CLASSES, "test confusion matrix")
        for logger in _tensorboards(trainer):
            logger.experiment.add_figure("test/confusion_matrix", figure, trainer.global_step)


class FiniteLossGuard(pl.Callback):
    """Stop training at a NaN/inf loss with a clear error, before any checkpoint can hold the damage.

    The check accumulates on the device every step (no host sync) and is read every
    ``check_every_n_steps`` steps and before each validation, i.e. before checkpoints are written.
    """

    def __init__(self, check_every_n_steps: int = 10) -> None:
        self.check_every_n_steps = max(1, check_every_n_steps)
        self._bad: torch.Tensor | None = None
        self._last_good_step = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        bad = ~torch.isfinite(loss.detach())
        self._bad = bad if self._bad is None else self._bad | bad
        if trainer.global_step % self.check_every_n_steps == 0:
            self._check(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check(trainer)

    def _check(self, trainer: pl.Trainer) -> None:
        if self._bad is not None and bool(self._bad):
            raise FloatingPointError(
                f"Training loss became NaN or inf between optimizer steps {self._last_good_step} and "
                f"{trainer.global_step} (epoch {trainer.current_epoch}); stopped before checkpointing it. "
                "Try a lower optimizer.lr, trainer.gradient_clip_val, trainer.precision=32-true, or check "
                "the data with `python -m busi_mtl.data.audit`."
            )
        self._bad = None
        self._last_good_step = trainer.global_step


class EMAWeights(EMAWeightAveraging):
    """Exponential moving average of the weights (and BatchNorm statistics): validation, checkpoints and
    testing all use the averaged network, the raw one only trains.

    Lightning's ``EMAWeightAveraging`` keeps its averaged model after ``fit`` and acts on it later: it
    restores the raw weights (``current_model_state``) from any checkpoint it loads, and swaps the final
    average in for every validation. So ``trainer.test(ckpt_path="best")`` would score the best epoch's raw
    network and ``trainer.validate(ckpt_path=...)`` the last epoch's average, neither of them the network
    that won checkpoint selection. Here both happen only while fitting (resuming a fit included).
    """

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_validation_epoch_end(trainer, pl_module)


def _subtree_flops(counts: dict[str, dict], key: str, module: torch.nn.Module) -> Counter:
    """FLOPs by operator for ``module``: its own entry, or its children's summed when its forward never ran."""
    if key in counts:
        return Counter(counts[key])
    total: Counter = Counter()
    for name, child in module.named_children():
        total.update(_subtree_flops(counts, f"{key}.{name}", child))
    return total


class NestedFlopsSummary(ModelSummary):
    """Lightning's summary, except that a container called only through its children (``MultiTaskNet`` runs
    ``net.seg``'s encoder, decoder and head, never ``net.seg`` itself) shows its children's FLOPs, not 0."""

    @property
    def flop_counts(self) -> dict[str, dict]:
        counts = self._flop_counter.get_flop_counts()
        root, modules = type(self._model).__name__, dict(self._model.named_modules())
        return {
            name: dict(_subtree_flops(counts, f"{root}.{name}", modules[name])) for name in self.layer_names
        }


class ModelSummaryWithFlops(RichModelSummary):
    """Rich model summary with FLOPs and layer shapes for one image at the data's size. Lightning prints
    "Total FLOPs: 0" unless the module has an example input, and the image size is a data setting."""

    def _summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ModelSummary:
        size = getattr(trainer.datamodule, "hparams", {}).get("image_size")
        if size is None or pl_module.example_input_array is not None:
            return NestedFlopsSummary(pl_module, max_depth=self._max_depth)
        # Count the plain network: a compiled one would compile for this batch of one in eval mode.
        forward, pl_module._forward = pl_module._forward, [pl_module.net]
        pl_module.example_input_array = torch.zeros(1, 1, size, size)
        try:
            return NestedFlopsSummary(pl_module, max_depth=self._max_depth)
        finally:
            pl_module._forward, pl_module.example_input_array = forward, None
