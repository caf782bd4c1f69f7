"""Compare two cross-validations fold by fold, or two evaluations image by image:
``python -m busi_mtl.compare CANDIDATE REFERENCE``.

**Two CVs** (multirun directories). Two CVs of different settings on the same folds are paired samples:
fold 3 of one and fold 3 of the other were scored on the same held-out images, so the per-fold
differences carry the comparison, not the two means with their overlapping stds. For each metric this
reports both means, the mean difference (candidate - reference), in how many folds the candidate is
higher / equal / lower, and the Nadeau-Bengio corrected resampled t-test (Nadeau & Bengio 2003) with its
95% interval. The plain paired t-test is too optimistic for CV folds, whose training sets overlap; the
correction inflates the variance of the mean difference from ``1/k`` to ``1/k + n_test/n_train`` (2.25
times for 5 folds). Five folds give little power either way: read the p-value as a guide, and a second
seed as the better evidence. The test and interval are given for the held-out-fold metrics (``val/``)
only: every fold model is scored on the same test split, so differences there show training variation,
not how another sample of images would come out, and a p-value would claim more than that. The two
directories must hold one configuration each, with the same folds: every pair's ``split.csv`` (which
image is in train / val / test) is compared, and a mismatch is an error rather than a silently unpaired
comparison. A CV run as several multiruns is compared through one folder of links to its job
directories (symbolic links are followed).

**Two evaluations** (``busi_mtl.evaluate`` or ``busi_mtl.ensemble`` run directories, each with
``per_image.csv``) of the same images: the difference of each headline metric with a paired 95% bootstrap
interval, both evaluations scored on the same draws of near-duplicate groups
(:func:`busi_mtl.bootstrap.paired_intervals`), far narrower than two separate ``ci95`` intervals. It
answers "is model A better than model B on images like these", for the two fixed models (two
checkpoints, an ensemble against one member, a post-processing against none): it covers which images
were drawn, not how a retraining would come out, so it does not say that one *setting* beats another
(compare CVs for that).

Writes ``compare.csv`` and ``compare.md`` into ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markdown import Markdown
from scipy import stats

from busi_mtl.bootstrap import paired_intervals, table_metrics
from busi_mtl.summarize import collect_runs

DEFAULT_METRICS = (
    "val/score",
    "val/dice",
    "val/pp_dice",
    "val/f1",
    "val/normal_empty_rate",
    "val/pp_normal_empty_rate",
    "test/dice",
    "test/f1",
    "test/pp_normal_empty_rate",
)
FOLD_KEY = "data.fold"
#: The per-image metrics two evaluations are compared on (see busi_mtl.bootstrap).
EVALUATION_METRICS = (
    "score",
    "dice",
    "pp_dice",
    "native_dice",
    "native_pp_dice",
    "normal_empty_rate",
    "pp_normal_empty_rate",
    "acc",
    "f1",
    "auroc",
)


def fold_runs(cv_dir: str | Path) -> pd.DataFrame:
    """The finished jobs of one CV, indexed by fold; an error for failed, duplicate or missing folds."""
    runs = collect_runs(cv_dir)
    if FOLD_KEY not in runs.columns:
        raise ValueError(f"{cv_dir}: no '{FOLD_KEY}' override in the jobs; is this a cross-validation?")
    unfinished = runs.loc[runs["status"] != "finished", "job"].tolist()
    if unfinished:
        raise ValueError(f"{cv_dir}: jobs {unfinished} did not finish; compare complete CVs only.")
    duplicated = runs[FOLD_KEY][runs[FOLD_KEY].duplicated()].tolist()
    if duplicated:
        raise ValueError(
            f"{cv_dir}: folds {sorted(set(duplicated))} appear more than once; the directory must hold "
            "one configuration (summarise a sweep with busi_mtl.summarize instead)."
        )
    runs["dir"] = [str(Path(cv_dir) / job) for job in runs["job"]]
    return runs.set_index(FOLD_KEY).sort_index()


def _split(job_dir: str | Path) -> pd.Series:
    path = Path(job_dir) / "split.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the pairing cannot be checked without each run's split.")
    return pd.read_csv(path).set_index("id")["split"].sort_index()


def check_same_splits(candidate: pd.DataFrame, reference: pd.DataFrame) -> float:
    """Raise unless both CVs have the same folds; return the mean held-out / training size ratio."""
    if list(candidate.index) != list(reference.index):
        raise ValueError(
            f"The CVs cover different folds: {list(candidate.index)} against {list(reference.index)}."
        )
    ratios = []
    for fold in candidate.index:
        ours, theirs = _split(candidate.at[fold, "dir"]), _split(reference.at[fold, "dir"])
        if not ours.equals(theirs):
            raise ValueError(
                f"Fold {fold}: {candidate.at[fold, 'dir']} and {reference.at[fold, 'dir']} split the images "
                "differently (split.csv differs: another data.root, data.split_seed, data.num_folds or "
                "data.test_fraction?); a paired comparison needs the same folds."
            )
        counts = ours.value_counts()
        ratios.append(counts.get("val", 0) / counts.get("train", 1))
    return sum(ratios) / len(ratios)


def corrected_ttest(differences: Sequence[float], test_train_ratio: float) -> tuple[float, float, float]:
    """Nadeau-Bengio corrected resampled t-test: (two-sided p, 95% interval low, high) of the mean."""
    k = len(differences)
    if k < 2:
        return math.nan, math.nan, math.nan
    mean = sum(differences) / k
    variance = sum((d - mean) ** 2 for d in differences) / (k - 1)
    se = math.sqrt((1 / k + test_train_ratio) * variance)
    if se == 0:  # every fold moved by the same amount
        return (1.0 if mean == 0 else 0.0), mean, mean
    half = stats.t.ppf(0.975, k - 1) * se
    p = 2 * stats.t.sf(abs(mean / se), k - 1)
    return float(p), mean - half, mean + half


def compare(
    candidate_dir: str | Path,
    reference_dir: str | Path,
    metrics: Sequence[str] = DEFAULT_METRICS,
    tolerance: float = 0.0005,
) -> pd.DataFrame:
    """One row per metric: means, mean difference, higher / equal / lower folds, corrected p and CI."""
    candidate, reference = fold_runs(candidate_dir), fold_runs(reference_dir)
    ratio = check_same_splits(candidate, reference)
    rows = []
    for metric in metrics:
        if metric not in candidate.columns or metric not in reference.columns:
            continue
        differences = (candidate[metric] - reference[metric]).astype(float).tolist()
        held_out = metric.startswith("val/")
        p, low, high = corrected_ttest(differences, ratio) if held_out else (math.nan,) * 3
        rows.append(
            {
                "metric": metric,
                "reference": reference[metric].mean(),
                "candidate": candidate[metric].mean(),
                "difference": sum(differences) / len(differences),
                "higher": sum(d > tolerance for d in differences),
                "equal": sum(abs(d) <= tolerance for d in differences),
                "lower": sum(d < -tolerance for d in differences),
                "ci_low": low,
                "ci_high": high,
                "p_corrected": p,
                "per_fold": " / ".join(f"{d:+.3f}" for d in differences),
            }
        )
    if not rows:
        raise ValueError(f"None of the metrics {list(metrics)} is in both CVs.")
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    """The comparison as a Markdown table (3 decimals, p with 2 significant digits, n/a without a test)."""
    header = (
        "| metric | reference | candidate | difference (95% CI) | higher / equal / lower | p | per fold |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for row in table.itertuples():
        tested = not math.isnan(row.p_corrected)
        interval = f" ({row.ci_low:+.3f} to {row.ci_high:+.3f})" if tested else ""
        p = f"{row.p_corrected:.2g}" if tested else "n/a"
        lines.append(
            f"| {row.metric} | {row.reference:.3f} | {row.candidate:.3f} | {row.difference:+.3f}{interval} | "
            f"{row.higher} / {row.equal} / {row.lower} | {p} | {row.per_fold} |"
        )
    return "\n".join(lines) + "\n"


def read_evaluation(eval_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """An evaluation's per-image table (indexed and sorted by id) and its metrics.json."""
    table_path, metrics_path = Path(eval_dir) / "per_image.csv", Path(eval_dir) / "metrics.json"
    for path in (table_path, metrics_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing; is {eval_dir} a busi_mtl.evaluate or busi_mtl.ensemble run directory?"
            )
    table = pd.read_csv(table_path)
    if "dup_group" not in table.columns:
        raise ValueError(
            f"{table_path}: no dup_group column (written by an older busi_mtl); evaluate the checkpoint "
            "again, as images are resampled by their near-duplicate group."
        )
    return table.set_index("id").sort_index(), json.loads(metrics_path.read_text())


def compare_evaluations(
    candidate_dir: str | Path,
    reference_dir: str | Path,
    metrics: Sequence[str] = EVALUATION_METRICS,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict]:
    """One row per metric (both values, the difference and its paired 95% bootstrap interval), and how
    the draws were made; the evaluations must cover the same images with the same classes and groups.
    ``score`` is compared only when both weigh it alike."""
    ours, our_report = read_evaluation(candidate_dir)
    theirs, their_report = read_evaluation(reference_dir)
    if not ours.index.equals(theirs.index):
        only = ours.index.symmetric_difference(theirs.index)
        raise ValueError(
            f"{candidate_dir} and {reference_dir} evaluated different images ({len(only)} in one only, "
            f"e.g. {list(only[:3])}); a paired comparison needs the same split of the same data."
        )
    if not ours["class"].equals(theirs["class"]):
        raise ValueError(f"{candidate_dir} and {reference_dir} give the same images different classes.")
    if not (pd.factorize(ours["dup_group"])[0] == pd.factorize(theirs["dup_group"])[0]).all():
        raise ValueError(
            f"{candidate_dir} and {reference_dir} group the images' near-duplicates differently "
            "(another data.dup_threshold?); the draws must resample the same groups."
        )
    weights = our_report.get("score_weights")
    weights = weights if weights == their_report.get("score_weights") else None
    groups = ours["dup_group"].to_numpy()
    intervals = paired_intervals(ours, theirs, groups, resamples, seed, weights)
    candidate, reference = table_metrics(ours, weights), table_metrics(theirs, weights)
    rows = [
        {
            "metric": metric,
            "reference": reference[metric],
            "candidate": candidate[metric],
            "difference": candidate[metric] - reference[metric],
            "ci_low": intervals[metric][0],
            "ci_high": intervals[metric][1],
        }
        for metric in metrics
        if metric in candidate
        and metric in reference
        and math.isfinite(candidate[metric] - reference[metric])
    ]
    if not rows:
        raise ValueError(f"None of the metrics {list(metrics)} is defined in both evaluations.")
    drawn = {"images": len(ours), "groups": len(set(groups)), "resamples": resamples, "seed": seed}
    return pd.DataFrame(rows), drawn


def evaluations_markdown(table: pd.DataFrame, drawn: dict) -> str:
    """The image-level comparison as a Markdown table, with how its intervals were drawn."""
    lines = ["| metric | reference | candidate | difference (paired 95% CI) |", "|---|---|---|---|"]
    for row in table.itertuples():
        lines.append(
            f"| {row.metric} | {row.reference:.3f} | {row.candidate:.3f} | "
            f"{row.difference:+.3f} ({row.ci_low:+.3f} to {row.ci_high:+.3f}) |"
        )
    lines.append(
        f"\n{drawn['images']} images in {drawn['groups']} near-duplicate groups, {drawn['resamples']} "
        f"paired resamples of the groups (seed {drawn['seed']}); the interval covers which images were "
        "drawn, for these two fixed models, not retraining."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidate", type=Path, help="the CV multirun or evaluation directory of the new one")
    parser.add_argument(
        "reference", type=Path, help="the CV multirun or evaluation directory it is weighed against"
    )
    parser.add_argument(
        "--metrics", nargs="+", default=None, help="stage/name columns (CVs), names (evaluations)"
    )
    parser.add_argument(
        "--tolerance", type=float, default=0.0005, help="CVs: a fold difference within this counts as equal"
    )
    parser.add_argument("--resamples", type=int, default=1000, help="evaluations: bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="evaluations: bootstrap seed")
    parser.add_argument("--out", type=Path, default=None, help="write compare.csv and compare.md here")
    args = parser.parse_args(argv)
    evaluations = [(d / "per_image.csv").is_file() for d in (args.candidate, args.reference)]
    if evaluations[0] != evaluations[1]:
        raise SystemExit("Give two CV multirun directories or two evaluation directories, not one of each.")
    if all(evaluations):
        metrics = args.metrics or list(EVALUATION_METRICS)
        table, drawn = compare_evaluations(args.candidate, args.reference, metrics, args.resamples, args.seed)
        markdown, pairing = evaluations_markdown(table, drawn), "paired by image"
    else:
        table = compare(args.candidate, args.reference, args.metrics or list(DEFAULT_METRICS), args.tolerance)
        markdown, pairing = to_markdown(table), "paired by fold"
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "compare.csv", index=False)
        (args.out / "compare.md").write_text(markdown)
    console = Console()
    console.print(f"{args.candidate} (candidate) against {args.reference} (reference), {pairing}")
    console.print(Markdown(markdown))


if __name__ == "__main__":
    main()
