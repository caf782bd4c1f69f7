"""Cross-validation fold models as one ensemble, post-processing chosen out of fold:
``python -m busi_mtl.ensemble runs=outputs/multirun/<timestamp> [tta=true] [split=test|all]``.

1. Every member (each CV job's best checkpoint) predicts its own validation fold. Together these
   out-of-fold (OOF) predictions cover every non-test image once, each by a model that never trained on it.
   Several CV runs on the same images (``runs=[cv_a,cv_b]``: other seeds or settings) pool into one
   ensemble: an image's OOF prediction is then the mean over the members that held it out, one per CV.
2. The lesion threshold and the post-processing (normal gate, min_area, max_components, rescue) are chosen on the
   OOF predictions, never on the test split, to maximise per-image Dice over *all* images, where a
   normal image scores 1 when its predicted mask is empty and 0 otherwise: one objective that trades
   lesion Dice against stray lesions on normal images.
3. On the test split (or every image under ``data.root`` with ``split=all``, e.g. an external set) the
   members' lesion and class probabilities are averaged, optionally with horizontal-flip test-time
   augmentation, then thresholded and post-processed with the chosen settings.

Writes to the run directory: ``metrics.json`` (the chosen settings; the ensemble's metrics raw and
post-processed, at the network's resolution and, as ``native_*``, at each image's own size, with their
95% bootstrap intervals (``ci95``, resampling near-duplicate groups); every member's metrics under the
same settings, and their mean and std, so that the gain of ensembling shows apart from the gain of
post-processing; the OOF figures), ``oof_grid.csv`` (the objective for every setting tried),
``oof_per_image.csv`` (the out-of-fold per-image results under the chosen settings) and
``per_image.csv`` (the ensemble's per-image results).
Members must share the image size, the image geometry (``data.keep_aspect``) and the test split (folds of
one CV run do, and so do CVs that differ only in seed, model, loss or intensity preprocessing).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from busi_mtl.data import NORMAL
from busi_mtl.evaluate import (
    aggregate,
    confidence_intervals,
    datamodule_from_checkpoint,
    image_groups,
    interval_columns,
    native_scores,
    per_image_table,
)
from busi_mtl.metrics import per_image_scores
from busi_mtl.models.module import MultiTaskModule, load_module, read_checkpoint
from busi_mtl.postprocess import PostProcess, peak_region, rescue_eligible
from busi_mtl.summarize import job_dirs
from busi_mtl.utils.paths import CONFIG_DIR
from busi_mtl.utils.run import print_metrics, resolve_device, save_run_info, task_wrapper, write_json

log = logging.getLogger(__name__)

#: Metrics shown for the members' mean and std (the ensemble's metrics.json holds all of them).
MEMBER_KEYS = (
    "dice",
    "iou",
    "normal_empty_rate",
    "f1",
    "acc",
    "auroc",
    "pp_dice",
    "pp_iou",
    "pp_normal_empty_rate",
)


@dataclass
class Predictions:
    """Per-image model outputs for one set of images, in the datamodule's order."""

    ids: list[str]
    labels: torch.Tensor  # (N,) class index
    class_probs: torch.Tensor  # (N, C) softmax
    lesion_probs: torch.Tensor  # (N, H, W) sigmoid
    true_masks: torch.Tensor  # (N, H, W) bool
    n_members: torch.Tensor | None = None  # (N,) members averaged per image; set by pool()


def member_checkpoints(runs: str | Path | Sequence[str | Path]) -> list[Path]:
    """The best checkpoint of every finished job (one with metrics.json) of a multirun, or of several, in
    the order given and job order within each."""
    paths = []
    for sweep in [runs] if isinstance(runs, (str, Path)) else runs:
        sweep = Path(sweep).expanduser()
        found = [d / "metrics.json" for d in job_dirs(sweep) if (d / "metrics.json").is_file()]
        if not found:
            raise FileNotFoundError(f"runs={sweep}: no finished jobs (job directories with metrics.json).")
        paths += [Path(json.loads(f.read_text())["best_ckpt"]) for f in found]
    return paths


@torch.inference_mode()
def predict(module: MultiTaskModule, loader, tta: bool, device: torch.device) -> Predictions:
    """Lesion and class probabilities; with ``tta`` averaged with those of the horizontally flipped image."""
    ids, labels, class_probs, lesion_probs, masks = [], [], [], [], []
    for batch in loader:
        lesion, probs = module.probabilities(batch["image"].to(device), tta)
        ids += list(batch["id"])
        labels.append(batch["label"])
        class_probs.append(probs.cpu())
        lesion_probs.append(lesion[:, 0].cpu())
        masks.append(batch["mask"][:, 0].bool())
    return Predictions(
        ids, torch.cat(labels), torch.cat(class_probs), torch.cat(lesion_probs), torch.cat(masks)
    )


def pool(parts: list[Predictions]) -> Predictions:
    """Several members' predictions as one set, each image once with the mean of its predictions.

    On the test split every member predicts every image; out of fold, an image gets the mean over the members
    that held it out (one per CV when several CVs are pooled), none of which trained on it. Members that
    disagree on an image's ground truth resize or pad differently, so their maps do not line up: refused.
    """
    if len({p.lesion_probs.shape[1:] for p in parts}) > 1:
        raise ValueError("ensemble members work at different image sizes; they cannot be combined.")
    ids = list(dict.fromkeys(i for p in parts for i in p.ids))
    position = {image_id: k for k, image_id in enumerate(ids)}
    first = parts[0]
    n = len(ids)
    class_sum = torch.zeros(n, *first.class_probs.shape[1:])
    lesion_sum = torch.zeros(n, *first.lesion_probs.shape[1:])
    counts = torch.zeros(n)
    labels = torch.zeros(n, dtype=first.labels.dtype)
    truth = torch.zeros(n, *first.true_masks.shape[1:], dtype=torch.bool)
    seen = torch.zeros(n, dtype=torch.bool)
    for part in parts:
        index = torch.tensor([position[i] for i in part.ids], dtype=torch.long)
        known = seen[index]
        if (labels[index][known] != part.labels[known]).any() or (
            truth[index][known] != part.true_masks[known]
        ).any():
            raise ValueError(
                "ensemble members disagree on an image's label or mask: they preprocess the images "
                "differently (e.g. data.keep_aspect) and cannot be combined."
            )
        class_sum.index_add_(0, index, part.class_probs.float())
        lesion_sum.index_add_(0, index, part.lesion_probs.float())
        counts.index_add_(0, index, torch.ones(len(index)))
        labels[index], truth[index], seen[index] = part.labels, part.true_masks, True
    return Predictions(
        ids, labels, class_sum / counts[:, None], lesion_sum / counts[:, None, None], truth, counts.long()
    )


def average(members: list[Predictions]) -> Predictions:
    """Mean of the members' probabilities, image by image (aligned by id); all predict the same images."""
    if any(sorted(m.ids) != sorted(members[0].ids) for m in members):
        raise ValueError("ensemble members predicted different images: do they share the test split?")
    return pool(members)


def all_image_dice(masks: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-image Dice where an empty prediction of an empty truth scores 1 (a normal image left empty)."""
    dice, _ = per_image_scores(masks, truth)
    return dice.nan_to_num(1.0)


def tune(oof: Predictions, grid: DictConfig) -> tuple[float, PostProcess, pd.DataFrame]:
    """The threshold and post-processing with the highest mean all-image Dice on the OOF predictions.

    Lesion images without a ground-truth lesion (bad data) are left out; ties go to the first setting in
    grid order, so list the mildest choices first.
    """
    keep = ~((oof.labels != NORMAL) & ~oof.true_masks.flatten(1).any(1))
    truth, p_normal, probs = oof.true_masks[keep], oof.class_probs[keep, NORMAL], oof.lesion_probs[keep]
    truth_empty = ~truth.flatten(1).any(1)
    rescued = {  # the all-image Dice of each image's rescue region, for every ratio tried
        ratio: all_image_dice(
            torch.from_numpy(np.stack([peak_region(p.numpy(), ratio) for p in probs])).unsqueeze(1),
            truth.unsqueeze(1),
        )
        for ratio in grid.rescue
        if ratio is not None
    }
    rows = []
    for threshold, min_area, max_components in itertools.product(
        grid.threshold, grid.min_area, grid.max_components
    ):
        masks = (probs > threshold).unsqueeze(1)
        cleaned = PostProcess(min_area=min_area, max_components=max_components)(masks, oof.class_probs[keep])
        dice, empty = all_image_dice(cleaned, truth.unsqueeze(1)), ~cleaned.flatten(1).any(1)
        for gate in grid.normal_gate:
            gated = torch.zeros_like(empty) if gate is None else p_normal >= gate
            dice_gated = torch.where(gated, truth_empty.float(), dice)
            eligible = rescue_eligible(empty, p_normal, gate)
            for ratio in grid.rescue:
                final = dice_gated if ratio is None else torch.where(eligible, rescued[ratio], dice_gated)
                rows.append(
                    {
                        "threshold": threshold,
                        "normal_gate": gate,
                        "min_area": min_area,
                        "max_components": max_components,
                        "rescue": ratio,
                        "all_image_dice": float(final.mean()),
                    }
                )
    table = pd.DataFrame(rows)
    best = table.loc[table["all_image_dice"].idxmax()]
    chosen = PostProcess(
        normal_gate=None if pd.isna(best["normal_gate"]) else float(best["normal_gate"]),
        min_area=float(best["min_area"]),
        max_components=None if pd.isna(best["max_components"]) else int(best["max_components"]),
        rescue=None if pd.isna(best["rescue"]) else float(best["rescue"]),
    )
    return float(best["threshold"]), chosen, table


def score(
    pred: Predictions, threshold: float, postprocess: PostProcess, score_weights: dict[str, float]
) -> tuple[dict, list[dict]]:
    """Metrics (as busi_mtl.evaluate reports them) and the per-image outputs they came from."""
    masks = (pred.lesion_probs > threshold).unsqueeze(1)
    outputs = [
        {
            "id": pred.ids,
            "label": pred.labels,
            "probs": pred.class_probs,
            "lesion_prob": pred.lesion_probs,
            "pred_mask": masks[:, 0],
            "pp_mask": postprocess(masks, pred.class_probs, pred.lesion_probs.unsqueeze(1))[:, 0],
            "true_mask": pred.true_masks,
        }
    ]
    return aggregate(outputs, score_weights, postprocess.enabled), outputs


@task_wrapper
def ensemble(cfg: DictConfig) -> dict:
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.split not in ("test", "all"):
        raise ValueError(f"split={cfg.split!r}: choose test (the CV's held-out split) or all (every image).")
    runs = OmegaConf.to_container(cfg.runs) if OmegaConf.is_list(cfg.runs) else cfg.runs
    paths = [Path(p).expanduser() for p in cfg.ckpt_paths] if cfg.ckpt_paths else member_checkpoints(runs)
    device = resolve_device(cfg.device)
    overrides = OmegaConf.to_container(cfg.data, resolve=True)
    oof_parts, members = [], []
    lead = None  # the first member: its threshold and post-processing apply with tune=false
    for k, path in enumerate(paths):
        ckpt = read_checkpoint(path)
        module = load_module(ckpt, device)
        if lead is None:
            lead = module
        elif module.score_weights != lead.score_weights:
            raise ValueError(
                f"{path}: val/score weights {module.score_weights} differ from the first member's "
                f"{lead.score_weights}; the ensemble reports one score, so its members must share them."
            )
        log.info("member %d/%d: %s", k + 1, len(paths), path)
        member_out = out / f"member_{k}"
        # the run's own split holds both its validation fold and the test split; "all" needs no split
        run_data = None
        if cfg.tune or cfg.split == "test":
            run_data = datamodule_from_checkpoint(ckpt, overrides, "test", member_out)
        if cfg.tune:
            oof_parts.append(predict(module, run_data.dataloader("val"), cfg.tta, device))
            oof_data = run_data  # every member's manifest holds the same images and duplicate groups
        data = (
            run_data
            if cfg.split == "test"
            else datamodule_from_checkpoint(ckpt, overrides, "all", member_out)
        )
        members.append(predict(module, data.dataloader(cfg.split), cfg.tta, device))
    score_weights = lead.score_weights
    report: dict = {"members": [str(p) for p in paths], "split": cfg.split, "tta": cfg.tta}
    if cfg.tune:
        oof = pool(oof_parts)
        held_out = sorted(set(oof.n_members.tolist()))
        if len(held_out) > 1:
            log.warning(
                "out of fold, some images are predicted by fewer members than others (%d-%d): "
                "a CV with a failed fold?",
                held_out[0],
                held_out[-1],
            )
        threshold, postprocess, grid = tune(oof, cfg.grid)
        grid.to_csv(out / "oof_grid.csv", index=False)
        tuned, oof_outputs = score(oof, threshold, postprocess, score_weights)
        oof_table = per_image_table(oof_outputs)
        oof_table["dup_group"] = image_groups(oof_table["id"], oof_data)
        oof_table.to_csv(out / "oof_per_image.csv", index=False)
        report["oof"] = {
            "n_images": len(oof.ids),
            "members_per_image": held_out,
            "raw": score(oof, 0.5, PostProcess(), score_weights)[0],
            "tuned": tuned,
            "all_image_dice": float(grid["all_image_dice"].max()),
        }
    else:
        threshold = float(cfg.threshold if cfg.threshold is not None else lead.hparams.threshold)
        postprocess = lead.postprocess
    report["chosen"] = {"threshold": threshold, **asdict(postprocess)}
    member_scores = [score(m, threshold, postprocess, score_weights)[0] for m in members]
    combined = average(members)
    values, outputs = score(combined, threshold, postprocess, score_weights)
    table = per_image_table(outputs)
    if cfg.native:
        native_values, native = native_scores(outputs, data, threshold, postprocess)
        values |= native_values
        table = pd.concat([table, native], axis=1)
    report[cfg.split] = values
    frame = pd.DataFrame(member_scores).reindex(columns=list(MEMBER_KEYS))
    report["member_mean"], report["member_std"] = frame.mean().to_dict(), frame.std(ddof=1).to_dict()
    report["member_metrics"] = member_scores
    report["n_images"] = len(combined.ids)
    table["dup_group"] = image_groups(table["id"], data)
    report["score_weights"] = score_weights
    if cfg.bootstrap:
        report.update(confidence_intervals(table, cfg.bootstrap, cfg.seed, score_weights))
    table.to_csv(out / "per_image.csv", index=False)
    write_json(out / "metrics.json", report)
    save_run_info(out)
    shown = {
        "ensemble": {k: values.get(k) for k in MEMBER_KEYS},
        "members (mean)": report["member_mean"],
        "members (std)": report["member_std"],
        **{
            name: {k: v for k, v in bounds.items() if k in MEMBER_KEYS}
            for name, bounds in interval_columns(report).items()
        },
    }
    print_metrics(shown, title=f"{len(paths)}-member ensemble on {cfg.split} ({report['chosen']})")
    log.info("Ensemble evaluation written to %s", out)
    return report


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="ensemble")
def main(cfg: DictConfig) -> None:
    ensemble(cfg)


if __name__ == "__main__":
    main()
