"""Train and test the multi-task model: ``python -m busi_mtl.train [overrides]``.

Composes ``conf/train.yaml``, instantiates the datamodule, module, callbacks, loggers and trainer, fits,
then scores the best checkpoint on test and writes ``metrics.json`` to the run directory (with the val
metrics that checkpoint was chosen for). Returns the monitored value of the best checkpoint so Hydra
sweepers can optimise it. Safe under DDP: only global rank 0 writes files. ``ckpt_path=...`` or
``resume=true`` (with ``hydra.run.dir`` set to the run) continues an interrupted run; ``resume=true`` on a
multirun (same command, same ``hydra.sweep.dir``) leaves its finished jobs alone and continues the rest.
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from lightning_utilities.core.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.loggers import TensorBoardLogger

from busi_mtl.metrics import collect_stage
from busi_mtl.models.factory import build_model
from busi_mtl.models.module import MultiTaskModule, read_checkpoint
from busi_mtl.utils.paths import CONFIG_DIR
from busi_mtl.utils.run import (
    instantiate_callbacks,
    instantiate_loggers,
    print_config,
    print_metrics,
    save_run_info,
    set_threads,
    task_wrapper,
    write_json,
)

log = logging.getLogger(__name__)

#: The run's own config, unresolved, written when it starts: what ``resume=true`` checks against.
RUN_CONFIG = "run_config.yaml"
#: The run's own Hydra overrides, kept beside it: Hydra rewrites ``.hydra/`` at every launch.
RUN_OVERRIDES = "run_overrides.yaml"
#: Top-level keys a resumed run may change: the resume switches, where files live and the CPU thread count
#: (the machine's, like the default of one thread per core), not what is trained.
RESUME_MAY_CHANGE = ("resume", "ckpt_path", "paths", "num_threads")
#: Lightning's SLURM pre-emption checkpoints in the run directory, which it resumes from on SLURM.
HPC_CHECKPOINTS = "hpc_ckpt_*.ckpt"


def build_module(cfg: DictConfig) -> MultiTaskModule:
    """The LightningModule from the model/loss/optimizer/scheduler groups, as plain dicts."""
    plain = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    net = plain(cfg.model)
    return MultiTaskModule(
        net={k: v for k, v in net.items() if k not in ("compile", "channels_last")},
        loss=plain(cfg.loss),
        optimizer=plain(cfg.optimizer),
        scheduler=plain(cfg.scheduler),
        monitor=cfg.monitor.metric,
        threshold=cfg.threshold,
        score_weights=plain(cfg.monitor.score_weights),
        compile=net.get("compile", False),
        channels_last=net.get("channels_last", False),
        seed=cfg.seed,
        postprocess=plain(cfg.postprocess),
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


def best_checkpoint_summary(trainer: pl.Trainer) -> dict:
    """Monitored value, epoch and val metrics of the best checkpoint (val metrics are stored inside it)."""
    checkpoint = trainer.checkpoint_callback
    path = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    if path is None:
        return {"best_ckpt": None, "best_val": None}
    saved = read_checkpoint(path)
    score = checkpoint.best_model_score
    return {
        "best_ckpt": path,
        "best_val": float(score) if score is not None else None,
        "best_epoch": saved["epoch"],
        "val": saved.get("busi_mtl", {}).get("val_metrics"),
    }


def resume_checkpoint(cfg: DictConfig, out: Path) -> str | None:
    """``ckpt_path`` if given; with ``resume=true`` the newest of this run directory's ``last.ckpt`` and
    Lightning's SLURM ``hpc_ckpt_*.ckpt`` (None, i.e. a fresh start, when there is neither)."""
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    if not cfg.get("resume"):
        return None
    candidates = [p for p in [out / "checkpoints" / "last.ckpt", *out.glob(HPC_CHECKPOINTS)] if p.is_file()]
    if not candidates:
        log.info("resume=true: no checkpoint in %s yet; starting from scratch.", out)
        return None
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    log.info("resume=true: continuing from %s", newest)
    return str(newest)


def check_resumable(ckpt_path: str, module: MultiTaskModule) -> None:
    """Refuse a checkpoint of another architecture with a readable diff, not a state_dict traceback.

    A model key added since the checkpoint was written (absent from its saved ``net``) is taken at
    :func:`build_model`'s default, the value that checkpoint's network was in effect built with."""
    saved = read_checkpoint(ckpt_path).get("hyper_parameters", {}).get("net")
    if saved is None:
        raise ValueError(f"ckpt_path={ckpt_path}: not a busi-mtl training checkpoint.")
    defaults = {
        name: list(param.default) if isinstance(param.default, tuple) else param.default  # as saved
        for name, param in inspect.signature(build_model).parameters.items()
        if param.default is not inspect.Parameter.empty
    }
    saved = {**defaults, **saved}
    current = {**defaults, **module.hparams.net}
    differing = sorted(
        k for k in set(saved) | set(current) if k != "encoder_weights" and saved.get(k) != current.get(k)
    )
    if differing:
        detail = ", ".join(
            f"model.{k}: checkpoint {saved.get(k)!r} vs this run {current.get(k)!r}" for k in differing
        )
        raise ValueError(
            f"ckpt_path={ckpt_path} was trained with another model ({detail}). Resume with the same model config."
        )


def _flatten(node: object, prefix: str = "") -> dict[str, object]:
    """Nested dicts as one ``{"a.b.c": value}`` dict (lists and empty dicts are values)."""
    if isinstance(node, dict) and node:
        return {key: value for k, v in node.items() for key, value in _flatten(v, f"{prefix}{k}.").items()}
    return {prefix[:-1]: node}


def _trained_settings(cfg: DictConfig) -> dict[str, object]:
    """The config as flat keys, unresolved (so independent of where the run lives), minus
    :data:`RESUME_MAY_CHANGE`."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    return _flatten({k: v for k, v in plain.items() if k not in RESUME_MAY_CHANGE})


def _composed_today(out: Path) -> dict[str, object]:
    """The run's own overrides composed from today's config files, as :func:`_trained_settings`: the value
    a key added to the configs since the run started takes for it ({} when that cannot be composed)."""
    if not (out / RUN_OVERRIDES).is_file():
        return {}
    overrides = [str(o) for o in OmegaConf.load(out / RUN_OVERRIDES)]
    try:
        if GlobalHydra.instance().is_initialized():  # inside the @hydra.main app
            return _trained_settings(hydra.compose(config_name="train", overrides=overrides))
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            return _trained_settings(hydra.compose(config_name="train", overrides=overrides))
    except (HydraException, OmegaConfBaseException) as err:
        log.warning("resume=true: the run's overrides no longer compose (%s).", err)
        return {}


#: A warning about the run directory, logged once: by rank 0, not again by each process Lightning's ddp
#: relaunches into the directory rank 0 has just started.
_warn_rank_zero = rank_zero_only(log.warning)


def check_resume(cfg: DictConfig, out: Path) -> None:
    """Refuse ``resume=true`` with a config other than the one the run in ``out`` started with, naming the
    differing keys: continuing a run under new settings would give numbers that belong to neither."""
    record = out / RUN_CONFIG
    if not record.is_file():
        if (out / "metrics.json").is_file() or (out / "checkpoints" / "last.ckpt").is_file():
            _warn_rank_zero(
                "resume=true: %s has no %s (older run), so its config cannot be checked.", out, RUN_CONFIG
            )
        return
    saved, current = _trained_settings(OmegaConf.load(record)), _trained_settings(cfg)
    unset = "<unset>"
    differing = sorted(
        k for k in saved.keys() | current.keys() if saved.get(k, unset) != current.get(k, unset)
    )
    if added := [k for k in differing if k not in saved]:
        today = _composed_today(out)
        neutral = [k for k in added if k in today and today[k] == current[k]]
        if neutral:
            log.info(
                "resume=true: %s not in %s (added since the run started); taken at the value the run's own "
                "overrides give today.",
                ", ".join(neutral),
                record,
            )
            differing = [k for k in differing if k not in neutral]
    if differing:
        _restore_hydra_record(out)
        detail = "; ".join(
            f"{k}: run {saved.get(k, unset)!r}, now {current.get(k, unset)!r}" for k in differing
        )
        raise ValueError(
            f"resume=true: {out} was started with another config ({detail}). Resume with the run's own "
            f"overrides (see {record}), or pass ckpt_path= to continue from its checkpoint on purpose."
        )


def _keep_run_record(cfg: DictConfig, out: Path) -> None:
    """Write :data:`RUN_CONFIG` and :data:`RUN_OVERRIDES` when a run starts (rank 0; the caller checks); a
    resumed run keeps its own, a fresh run into an old run's directory replaces the old one's."""
    if cfg.get("resume") and (out / RUN_CONFIG).is_file():
        return
    OmegaConf.save(cfg, out / RUN_CONFIG, resolve=False)
    if (out / ".hydra" / "overrides.yaml").is_file():
        shutil.copyfile(out / ".hydra" / "overrides.yaml", out / RUN_OVERRIDES)


@rank_zero_only
def _restore_hydra_record(out: Path) -> None:
    """Hydra has already written a refused command's config into ``.hydra/``; put the run's own back, so
    the run is still summarised under the settings it was trained with."""
    for source, target in ((RUN_CONFIG, "config.yaml"), (RUN_OVERRIDES, "overrides.yaml")):
        if (out / source).is_file() and (out / ".hydra").is_dir():
            shutil.copyfile(out / source, out / ".hydra" / target)


#: What a run leaves that says how it ended, and where an earlier run's copy is set aside.
_OUTCOME = {
    "error.txt": "error.previous.txt",
    "metrics.json": "metrics.previous.json",
    "checkpoints/last.ckpt": "checkpoints/last.previous.ckpt",
}


@rank_zero_only
def _set_aside(moves: dict[Path, Path]) -> None:
    """Rename an earlier attempt's outcome files (see :func:`train`), so that an old ``error.txt`` does not
    mark this run failed and an old ``metrics.json`` or checkpoint is never taken for this run's. Rank 0
    only: a DDP process Lightning relaunches into the directory rank 0 has just started leaves it alone."""
    for source, target in moves.items():
        if source.is_file():
            source.replace(target)
            log.info("%s: the earlier %s is now %s.", source.parent, source.name, target.name)


def train(cfg: DictConfig) -> dict:
    """Fit and test (see :func:`fit_and_test`). With ``resume=true`` the config is first checked against
    the run's own, and a run that has finished (``metrics.json``, no ``error.txt``) is not run again: its
    metrics are returned, so a resumed multirun continues only its unfinished jobs."""
    out = Path(cfg.paths.output_dir)
    if cfg.get("resume"):
        check_resume(cfg, out)
        if (out / "metrics.json").is_file() and not (out / "error.txt").is_file():
            log.info("resume=true: %s has finished (metrics.json); not run again.", out)
            return json.loads((out / "metrics.json").read_text())
        _set_aside({out / "error.txt": out / _OUTCOME["error.txt"]})
    else:  # a fresh start; Lightning would resume from an old hpc_ckpt_N.ckpt on SLURM, so it goes aside too
        moves = {out / name: out / previous for name, previous in _OUTCOME.items()}
        moves |= {ckpt: ckpt.with_name(f"previous_{ckpt.name}") for ckpt in out.glob(HPC_CHECKPOINTS)}
        given = Path(cfg.ckpt_path).resolve() if cfg.get("ckpt_path") else None  # may be one of them
        moves = {
            source: target
            for source, target in moves.items()
            if source.is_file() and source.resolve() != given
        }
        if moves or (out / RUN_CONFIG).is_file():
            _warn_rank_zero(
                "%s holds an earlier run; this one starts from scratch and renames that run's outcome files "
                "(*previous*); resume=true would have continued it.",
                out,
            )
        _set_aside(moves)
    print_config(cfg, out / "config_tree.log")  # after the checks: a refused command leaves the run's own
    return fit_and_test(cfg)


@task_wrapper
def fit_and_test(cfg: DictConfig) -> dict:
    """Fit, test the best checkpoint, write ``metrics.json`` (rank 0); returns the metrics."""
    out = Path(cfg.paths.output_dir)
    set_threads(cfg.get("num_threads"))
    pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = resume_checkpoint(cfg, out)
    data_cfg = cfg.data
    if ckpt_path and not cfg.data.get("split_file") and (out / "split.csv").is_file():
        data_cfg = OmegaConf.merge(cfg.data, {"split_file": str(out / "split.csv")})  # the run's own split
    datamodule: pl.LightningDataModule = hydra.utils.instantiate(data_cfg)
    module = build_module(cfg)
    if ckpt_path:
        check_resumable(ckpt_path, module)
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=instantiate_callbacks(cfg.get("callbacks")), logger=loggers or False
    )
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        save_run_info(out)
        _keep_run_record(cfg, out)
    if cfg.train:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    metrics: dict = {"monitor": cfg.monitor.metric, **best_checkpoint_summary(trainer)}
    metrics.update(epochs_trained=trainer.current_epoch, global_step=trainer.global_step)
    if metrics["best_ckpt"] is None and cfg.train:
        metrics["val"] = collect_stage(trainer.callback_metrics, "val") or None
    if cfg.test:
        if metrics["best_ckpt"] is None:
            log.warning("No checkpoint was saved (callbacks off or fast_dev_run); testing the final weights.")
        trainer.test(module, datamodule=datamodule, ckpt_path=metrics["best_ckpt"])
        metrics["test"] = collect_stage(trainer.callback_metrics, "test")

    if trainer.is_global_zero:
        write_json(out / "metrics.json", metrics)
        log_final_hyperparameters(loggers, cfg, metrics)
        stages = {s: metrics[s] for s in ("val", "test") if metrics.get(s)}
        print_metrics(stages, title=f"Best checkpoint ({metrics['best_ckpt']})")
        log.info("Run directory: %s", out)
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg).get("best_val")


if __name__ == "__main__":
    main()
