"""Callbacks: the EMA weights are the ones validated, checkpointed and tested; the model summary counts FLOPs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EMAWeightAveraging, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from busi_mtl.callbacks import EMAWeights, ModelSummaryWithFlops
from busi_mtl.models.module import load_module


class Regression(pl.LightningModule):
    """A linear model whose validation loss depends on every weight, recording the weights it is scored with."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.scored_with: dict[str, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))
        self.scored_with = {k: v.clone() for k, v in self.state_dict().items()}

    def test_step(self, batch, batch_idx):
        self.scored_with = {k: v.clone() for k, v in self.state_dict().items()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


QUIET = dict(
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
    accelerator="cpu",
)


def loader(seed: int) -> DataLoader:
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 1), batch_size=8)


def fit(ema: EMAWeightAveraging, tmp_path) -> tuple[pl.Trainer, Regression, dict]:
    pl.seed_everything(0)
    module = Regression()
    # mode "max": the "best" checkpoint is an early epoch, so its average differs from the final one.
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", mode="max", save_last=True)
    trainer = pl.Trainer(max_epochs=4, callbacks=[ema, checkpoint], **QUIET)
    trainer.fit(module, loader(0), loader(1))
    saved = torch.load(checkpoint.best_model_path, weights_only=False)
    assert saved["epoch"] < trainer.current_epoch - 1
    # The checkpoint holds the average; the raw weights of the same step differ from it.
    assert not torch.equal(saved["state_dict"]["layer.weight"], saved["current_model_state"]["layer.weight"])
    return trainer, module, saved


def test_best_checkpoint_is_tested_and_validated_with_its_averaged_weights(tmp_path):
    trainer, module, saved = fit(EMAWeights(decay=0.9), tmp_path)
    best_score = float(trainer.checkpoint_callback.best_model_score)

    trainer.test(module, loader(1), ckpt_path="best", verbose=False)
    torch.testing.assert_close(module.scored_with["layer.weight"], saved["state_dict"]["layer.weight"])

    (result,) = trainer.validate(module, loader(1), ckpt_path="best", verbose=False)
    torch.testing.assert_close(module.scored_with["layer.weight"], saved["state_dict"]["layer.weight"])
    assert result["val_loss"] == pytest.approx(best_score)  # the score the checkpoint was selected on


def test_lightning_ema_alone_tests_the_raw_weights(tmp_path):
    """Why EMAWeights exists: with Lightning's callback the test scores another network than the one chosen."""
    trainer, module, saved = fit(EMAWeightAveraging(decay=0.9), tmp_path)
    trainer.test(module, loader(1), ckpt_path="best", verbose=False)
    torch.testing.assert_close(
        module.scored_with["layer.weight"], saved["current_model_state"]["layer.weight"]
    )


class Snapshot(pl.Callback):
    """The raw and averaged weights as training (re)starts."""

    def on_train_epoch_start(self, trainer, pl_module):
        ema = next(c for c in trainer.callbacks if isinstance(c, EMAWeights))
        self.raw = pl_module.layer.weight.detach().clone()
        self.average = ema._average_model.module.layer.weight.detach().clone()


def test_resumed_fit_restores_both_the_raw_and_the_averaged_weights(tmp_path):
    fit(EMAWeights(decay=0.9), tmp_path)
    last = tmp_path / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    snapshot = Snapshot()
    callbacks = [EMAWeights(decay=0.9), snapshot]
    trainer = pl.Trainer(
        max_epochs=saved["epoch"] + 2, callbacks=callbacks, enable_checkpointing=False, **QUIET
    )
    trainer.fit(Regression(), loader(0), loader(1), ckpt_path=last)
    torch.testing.assert_close(snapshot.raw, saved["current_model_state"]["layer.weight"])
    torch.testing.assert_close(snapshot.average, saved["state_dict"]["layer.weight"])


def test_model_summary_counts_the_flops_of_one_image_at_the_data_size(trained_run):
    """Lightning's summary prints "Total FLOPs: 0" without an example input; ours runs one image."""
    run, _ = trained_run
    module = load_module(run / "checkpoints" / "last.ckpt")
    module._forward = [torch.compile(module.net)]  # a compiled forward must not be what is counted
    trainer = SimpleNamespace(datamodule=SimpleNamespace(hparams={"image_size": 64}), strategy=None)
    summaries = [ModelSummaryWithFlops()._summary(trainer, module) for _ in range(2)]
    flops = [s.total_flops for s in summaries]
    assert flops[0] > 0 and flops[0] == flops[1]
    assert summaries[0].in_sizes[0] == [1, 1, 64, 64]
    assert module.example_input_array is None and module._forward[0] is not module.net
    bigger = SimpleNamespace(datamodule=SimpleNamespace(hparams={"image_size": 128}), strategy=None)
    assert ModelSummaryWithFlops()._summary(bigger, module).total_flops == pytest.approx(
        4 * flops[0], rel=0.05
    )
    # net.seg runs only through its encoder, decoder and head: its row sums theirs instead of showing 0
    rows = ModelSummaryWithFlops(max_depth=2)._summary(trainer, module).flop_counts
    per_row = {name: sum(counts.values()) for name, counts in rows.items()}
    assert per_row["net.seg"] > 0 and per_row["net.head"] > 0
    assert per_row["net.seg"] + per_row["net.head"] == per_row["net"] == flops[0]
