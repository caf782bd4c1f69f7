"""Train and test the multi-task model: ``python -m busi_mtl.train [overrides]``.

Composes ``conf/train.yaml``, instantiates the datamodule, module, callbacks, loggers and trainer, fits,
then scores the best checkpoint on val and test and writes ``metrics.json`` to the run directory.
Returns the monitored value of the best checkpoint so Hydra sweepers can optimise it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger

from busi_mtl.models.module import MultiTaskModule
from busi_mtl.utils.paths import CONFIG_DIR
from busi_mtl.utils.run import (
    instantiate_callbacks,
    instantiate_loggers,
    print_config,
    print_metrics,
    run_info,
    task_wrapper,
    write_json,
)

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig) -> MultiTaskModule:
    """The LightningModule from the model/loss/optimizer/scheduler groups, as plain dicts."""
    plain = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    return MultiTaskModule(
        net=plain(cfg.model),
        loss=plain(cfg.loss),
        optimizer=plain(cfg.optimizer),
        scheduler=plain(cfg.scheduler),
        monitor=cfg.monitor.metric,
        threshold=cfg.threshold,
    )


def log_final_hyperparameters(loggers: list, cfg: DictConfig, metrics: dict) -> None:
    """The run config with its final val/test numbers: TensorBoard's HParams tab compares runs by these."""
    params = OmegaConf.to_container(cfg, resolve=True)
    final = {
        f"final/{stage}/{k}": v
        for stage in ("val", "test")
        for k, v in (metrics.get(stage) or {}).items()
        if isinstance(v, float)
    }
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics=final)
        else:
            logger.log_hyperparams(params)
            logger.log_metrics(final, step=metrics["global_step"])
        logger.save()


@task_wrapper
def train(cfg: DictConfig) -> dict:
    """Fit, evaluate the best checkpoint, and write ``metrics.json``; returns its content."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run_info.json", run_info())
    pl.seed_everything(cfg.seed, workers=True)

    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    module = build_module(cfg)
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=instantiate_callbacks(cfg.get("callbacks")), logger=loggers or False
    )
    if cfg.train:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    metrics: dict = {
        "monitor": cfg.monitor.metric,
        "best_val": float(checkpoint.best_model_score)
        if best_path and checkpoint.best_model_score is not None
        else None,
        "best_ckpt": best_path,
        "epochs_trained": trainer.current_epoch,
        "global_step": trainer.global_step,
    }
    if best_path:
        saved = torch.load(best_path, map_location="cpu", weights_only=True)
        metrics["best_epoch"] = saved["epoch"]
        metrics["val"] = saved.get("busi_mtl", {}).get("val_metrics")
    elif "val" in module.results:
        metrics["val"] = module.results["val"]
    if cfg.test:
        if best_path is None:
            log.warning("No checkpoint was saved (callbacks off or fast_dev_run); testing the final weights.")
        trainer.test(module, datamodule=datamodule, ckpt_path=best_path)
        metrics["test"] = module.results.get("test")

    write_json(out / "metrics.json", metrics)
    log_final_hyperparameters(loggers, cfg, metrics)
    print_metrics(
        {s: metrics[s] for s in ("val", "test") if metrics.get(s)}, title=f"Best checkpoint ({best_path})"
    )
    log.info("Run directory: %s", out)
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    print_config(cfg, Path(cfg.paths.output_dir) / "config_tree.log")
    metrics = train(cfg)
    return metrics.get("best_val")


if __name__ == "__main__":
    main()
