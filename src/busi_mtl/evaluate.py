"""Evaluate a checkpoint: ``python -m busi_mtl.evaluate ckpt_path=... [split=test|val|all] [data.root=...]``.

Preprocessing comes from the checkpoint (its saved datamodule settings), never from a second copy of
the config; only where the data is and how it is split can be overridden. Writes to the run directory:
``metrics.json``, ``per_image.csv`` (id, class, predicted class, probabilities, Dice, IoU, areas),
``confusion_matrix.png``, ``roc.png`` (per class), ``dice_distribution.png`` (per class),
``gallery.png`` (examples of every class) and ``worst_cases.png`` (lowest Dice, confident errors,
false-positive normals).

Metrics are computed at the network's resolution (the ``image_size`` square, true masks area-resized
and thresholded at 0.5), as in training; with ``native=true`` (the default) the ``native_*`` metrics
also score the masks at each image's own size, as :mod:`busi_mtl.predict` writes them, against the
mask files themselves. ``metrics.json`` also holds ``ci95``, 95% intervals of the headline metrics from
a bootstrap over near-duplicate groups (:mod:`busi_mtl.bootstrap`; ``bootstrap=0`` skips it).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import hydra
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import RichProgressBar
from sklearn.metrics import roc_auc_score

from busi_mtl.bootstrap import bootstrap_intervals
from busi_mtl.callbacks import pick_gallery_indices
from busi_mtl.data import BENIGN, CLASSES, MALIGNANT, NORMAL
from busi_mtl.data.busi import load_mask
from busi_mtl.data.datamodule import BUSIDataModule
from busi_mtl.metrics import SegmentationMetrics, classification_metrics, confusion_matrix, per_image_scores
from busi_mtl.models.module import load_module, read_checkpoint
from busi_mtl.postprocess import PostProcess, full_size_masks
from busi_mtl.utils.paths import CONFIG_DIR
from busi_mtl.utils.run import print_metrics, save_run_info, task_wrapper, write_json
from busi_mtl.visualize import class_lines, confusion_figure, dice_figure, draw_overlay, roc_figure, tile

log = logging.getLogger(__name__)


def datamodule_from_checkpoint(ckpt: dict, overrides: dict, split: str, output_dir: Path) -> BUSIDataModule:
    """The checkpoint's own data settings, with where-and-how-split overrides; no augmentation; set up,
    so that every split's dataloader is ready.

    Unless ``data.split_file`` is given, the training run's saved ``split.csv`` is reused when it is still
    there, so the test set is exactly the one the run held out (and a changed dataset is an error).
    """
    if "datamodule_hyper_parameters" not in ckpt:
        raise ValueError("checkpoint has no data settings inside; was it written by busi_mtl.train?")
    hparams = dict(ckpt["datamodule_hyper_parameters"])
    run_split = Path(hparams.get("output_dir") or "") / "split.csv"
    if run_split.is_file() and split != "all":
        hparams["split_file"] = str(run_split)
    hparams.update({k: v for k, v in overrides.items() if v is not None})
    if split == "all":  # no split is made: every image is evaluated
        hparams.update(split_file=None, val_fraction=0.0, test_fraction=0.0, num_folds=None)
    hparams.update(augment=False, balanced_sampler=False, output_dir=str(output_dir))
    datamodule = BUSIDataModule(**hparams)
    datamodule.prepare_data()
    datamodule.setup("test")
    return datamodule


def native_scores(
    outputs: list[dict], datamodule: BUSIDataModule, threshold: float, postprocess: PostProcess
) -> tuple[dict[str, float], pd.DataFrame]:
    """The segmentation metrics at each image's own size (``native_*``; ``native_pp_*`` when
    ``postprocess`` is enabled) and the per-image ``native_dice`` / ``native_pp_dice``, in outputs order;
    the image sizes, mask files and geometry come from the datamodule that produced the outputs.

    Each lesion probability map goes through :func:`busi_mtl.postprocess.full_size_masks`, as in
    :mod:`busi_mtl.predict` (resized back, thresholded and post-processed there), and is scored against
    the union of the image's mask files, so a lesion too small to survive the resize still counts.
    Images are scored one at a time: full-size masks are not kept.
    """
    rows, keep_aspect = datamodule.manifest.set_index("id"), datamodule.preprocessing.keep_aspect
    seg, pp, per_image = SegmentationMetrics(), SegmentationMetrics(), []
    for o in outputs:
        for k, image_id in enumerate(o["id"]):
            row = rows.loc[image_id]
            height, width = int(row["height"]), int(row["width"])
            raw, pp_mask = full_size_masks(
                o["lesion_prob"][k].numpy(),
                height,
                width,
                keep_aspect,
                threshold,
                postprocess,
                o["probs"][k].numpy(),
            )
            mask, processed = torch.from_numpy(raw)[None, None], torch.from_numpy(pp_mask)[None, None]
            true = torch.from_numpy(load_mask(row["mask_paths"], (height, width)).astype(bool))[None, None]
            label = o["label"][k : k + 1]
            seg.update(mask, true, label)
            pp.update(processed, true, label)
            per_image.append(
                {
                    "native_dice": float(per_image_scores(mask, true)[0][0]),
                    "native_pp_dice": float(per_image_scores(processed, true)[0][0]),
                }
            )
    values = {f"native_{k}": float(v) for k, v in seg.compute().items()}
    if postprocess.enabled:
        values |= {f"native_pp_{k}": float(v) for k, v in pp.compute().items() if not k.startswith("n_")}
    return values, pd.DataFrame(per_image, columns=["native_dice", "native_pp_dice"])


def per_image_table(outputs: list[dict]) -> pd.DataFrame:
    """One row per image: id, true/predicted class, probabilities, Dice, IoU, predicted lesion pixels."""
    probs = torch.cat([o["probs"] for o in outputs])
    preds, masks = torch.cat([o["pred_mask"] for o in outputs]), torch.cat([o["true_mask"] for o in outputs])
    dice, iou = per_image_scores(preds, masks)
    pp = torch.cat([o["pp_mask"] for o in outputs])
    pp_dice, _ = per_image_scores(pp, masks)
    labels = torch.cat([o["label"] for o in outputs]).numpy()
    table = pd.DataFrame(
        {
            "id": [i for o in outputs for i in o["id"]],
            "class": [CLASSES[k] for k in labels],
            "pred_class": [CLASSES[k] for k in probs.argmax(1).numpy()],
            **{f"p_{c}": probs[:, k].numpy() for k, c in enumerate(CLASSES)},
            "dice": dice.numpy(),
            "iou": iou.numpy(),
            "pred_lesion_px": preds.flatten(1).sum(1).numpy(),
            "pp_dice": pp_dice.numpy(),
            "pp_lesion_px": pp.flatten(1).sum(1).numpy(),
            "true_lesion_px": masks.flatten(1).sum(1).numpy(),
        }
    )
    return table


def benign_vs_malignant(outputs: list[dict]) -> dict[str, float]:
    """The malignancy decision on lesion images alone (as external sets without normals need):
    ``p = p_malignant / (p_benign + p_malignant)``; accuracy at 0.5 and ROC AUC."""
    probs = torch.cat([o["probs"] for o in outputs]).numpy()
    labels = torch.cat([o["label"] for o in outputs]).numpy()
    lesion = labels != NORMAL
    if not lesion.any():
        return {}
    p_malignant = probs[lesion, MALIGNANT] / (probs[lesion, BENIGN] + probs[lesion, MALIGNANT])
    is_malignant = labels[lesion] == MALIGNANT
    both = 0 < is_malignant.sum() < len(is_malignant)
    return {
        "bm_acc": float(((p_malignant >= 0.5) == is_malignant).mean()),
        "bm_auroc": float(roc_auc_score(is_malignant, p_malignant)) if both else float("nan"),
    }


def aggregate(outputs: list[dict], score_weights: dict[str, float], postprocessed: bool) -> dict:
    """The same metric definitions as training (busi_mtl.metrics) over all predicted images; ``pp_*``
    from the outputs' post-processed masks when ``postprocessed``; ``score`` as the monitor weighs it."""
    seg, pp, cls = SegmentationMetrics(), SegmentationMetrics(), classification_metrics(len(CLASSES))
    cm = confusion_matrix(len(CLASSES))
    for o in outputs:
        seg.update(o["pred_mask"], o["true_mask"], o["label"])
        pp.update(o["pp_mask"], o["true_mask"], o["label"])
        cls.update(o["probs"], o["label"])
        cm.update(o["probs"], o["label"])
    values = {k: float(v) for k, v in {**seg.compute(), **cls.compute()}.items()}
    if postprocessed:
        values.update({f"pp_{k}": float(v) for k, v in pp.compute().items() if not k.startswith("n_")})
    values["score"] = sum(w * values[k] for k, w in score_weights.items())
    values.update(benign_vs_malignant(outputs))
    values["confusion_matrix"] = cm.compute().long().tolist()
    return values


def image_groups(ids: pd.Series, datamodule: BUSIDataModule) -> np.ndarray:
    """The audit's near-duplicate group of each image (per_image.csv's ``dup_group``), even where the
    run's split ignored them (``data.group_duplicates=false``)."""
    position = pd.Series(range(len(datamodule.manifest)), index=datamodule.manifest["id"])
    return datamodule.duplicate_groups[position.loc[ids].to_numpy()]


def confidence_intervals(table: pd.DataFrame, resamples: int, seed: int, score_weights: dict) -> dict:
    """``ci95`` (see :mod:`busi_mtl.bootstrap`) and how it was drawn, for metrics.json: the table's images
    resampled by their near-duplicate group (its ``dup_group`` column)."""
    groups = table["dup_group"].to_numpy()
    return {
        "ci95": bootstrap_intervals(table, groups, resamples, seed, score_weights),
        "bootstrap": {
            "resamples": resamples,
            "seed": seed,
            "unit": "near-duplicate group",
            "groups": len(np.unique(groups)),
        },
    }


def interval_columns(metrics: dict) -> dict[str, dict[str, float]]:
    """The interval bounds as two extra columns for :func:`print_metrics` (none without ``ci95``)."""
    intervals = metrics.get("ci95", {})
    return (
        {
            "95% from": {k: lo for k, (lo, _) in intervals.items()},
            "95% to": {k: hi for k, (_, hi) in intervals.items()},
        }
        if intervals
        else {}
    )


def worst_cases(table: pd.DataFrame, count: int) -> list[int]:
    """Rows to inspect first: lesion images with the lowest Dice, then confident misclassifications,
    then normal images with the largest predicted lesion, interleaved so each kind is shown."""
    lesion = table[table["class"] != "normal"].sort_values("dice").index.tolist()
    wrong = table[table["class"] != table["pred_class"]]
    wrong_conf = wrong[[f"p_{c}" for c in CLASSES]].max(axis=1).sort_values(ascending=False).index.tolist()
    normals = table[(table["class"] == "normal") & (table["pred_lesion_px"] > 0)]
    false_pos = normals.sort_values("pred_lesion_px", ascending=False).index.tolist()
    queues, picked = [lesion, wrong_conf, false_pos], []
    while len(picked) < count and any(queues):
        for queue in queues:  # round robin, skipping rows already shown
            while queue and queue[0] in picked:
                queue.pop(0)
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


def gallery(dataset, table: pd.DataFrame, preds: np.ndarray, positions: list[int]) -> np.ndarray:
    """Overlays: true (green) / predicted (red) contours, true -> predicted class, probabilities, Dice."""
    tiles = []
    for k in positions:
        sample, row = dataset[k], table.iloc[k]
        probs = [row[f"p_{c}"] for c in CLASSES]
        lines = class_lines(row["class"], row["pred_class"], probs, CLASSES)
        lines.append(f"{row['id']}" + (f"  Dice {row['dice']:.2f}" if pd.notna(row["dice"]) else ""))
        tiles.append(draw_overlay(sample["image"][0].numpy(), preds[k], sample["mask"][0].numpy(), lines))
    return tile(tiles, columns=4)


def save_figure(figure: Figure, path: Path) -> None:
    figure.savefig(path)
    plt.close(figure)


@task_wrapper
def evaluate(cfg: DictConfig) -> dict:
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = Path(cfg.ckpt_path).expanduser()
    if cfg.split not in ("train", "val", "test", "all"):
        raise ValueError(f"split={cfg.split!r}: choose test, val, train or all.")
    ckpt = read_checkpoint(ckpt_path)
    module = load_module(ckpt)
    if cfg.threshold is not None:
        module.hparams.threshold = float(cfg.threshold)
    overrides_pp = {k: v for k, v in OmegaConf.to_container(cfg.postprocess).items() if v is not None}
    if overrides_pp:
        module.postprocess = PostProcess(**{**asdict(module.postprocess), **overrides_pp})
    overrides = OmegaConf.to_container(cfg.data, resolve=True)
    datamodule = datamodule_from_checkpoint(ckpt, overrides, cfg.split, out)
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[RichProgressBar()])
    outputs = trainer.predict(module, dataloaders=datamodule.dataloader(cfg.split))
    table = per_image_table(outputs)
    metrics = {
        "ckpt_path": str(ckpt_path),
        "split": cfg.split,
        "n_images": len(table),
        cfg.split: aggregate(outputs, module.score_weights, module.postprocess.enabled),
    }
    if cfg.native:
        values, native = native_scores(outputs, datamodule, module.hparams.threshold, module.postprocess)
        metrics[cfg.split] |= values
        table = pd.concat([table, native], axis=1)
    table["dup_group"] = image_groups(table["id"], datamodule)
    metrics["score_weights"] = module.score_weights
    if cfg.bootstrap:
        metrics.update(confidence_intervals(table, cfg.bootstrap, cfg.seed, module.score_weights))
    table.to_csv(out / "per_image.csv", index=False)
    write_json(out / "metrics.json", metrics)
    save_run_info(out)
    values = metrics[cfg.split]
    save_figure(
        confusion_figure(np.array(values["confusion_matrix"]), CLASSES, f"{cfg.split} confusion matrix"),
        out / "confusion_matrix.png",
    )
    labels = table["class"].map(CLASSES.index).to_numpy()
    save_figure(
        roc_figure(labels, table[[f"p_{c}" for c in CLASSES]].to_numpy(), CLASSES, f"{cfg.split} ROC"),
        out / "roc.png",
    )
    save_figure(dice_figure(table, f"{cfg.split}: per-image lesion Dice"), out / "dice_distribution.png")
    preds = torch.cat([o["pred_mask"] for o in outputs]).numpy()
    dataset = datamodule.datasets[cfg.split]
    examples = pick_gallery_indices(dataset.labels[dataset.indices], cfg.gallery_size)
    plt.imsave(out / "gallery.png", gallery(dataset, table, preds, examples))
    plt.imsave(out / "worst_cases.png", gallery(dataset, table, preds, worst_cases(table, cfg.gallery_size)))
    print_metrics(
        {cfg.split: metrics[cfg.split], **interval_columns(metrics)}, title=f"{ckpt_path.name} on {cfg.split}"
    )
    log.info("Evaluation written to %s", out)
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
