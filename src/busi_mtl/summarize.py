"""Collect a multirun into one table: ``python -m busi_mtl.summarize outputs/multirun/<timestamp>``.

Reads every job directory's ``.hydra/overrides.yaml`` and ``metrics.json`` (and ``error.txt`` for failed
jobs) and writes, next to them:

- ``runs.csv``: one row per job: its overrides, status and every val/test metric;
- ``summary.csv`` and ``summary.md``: mean, sample standard deviation (ddof=1) and count of each metric
  over the replicates (CV folds, seeds) of each configuration, failed jobs excluded and counted;
- ``summary_<parameter>.png``: metrics against each numeric swept parameter (e.g. loss.alpha).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import yaml
from rich.console import Console
from rich.markdown import Markdown

#: Overrides that only replicate a configuration; runs differing only in these are averaged.
REPLICATE_KEYS = ("data.fold", "seed")
DEFAULT_METRICS = (
    "val/dice",
    "val/f1",
    "val/acc",
    "val/normal_empty_rate",
    "test/dice",
    "test/iou",
    "test/f1",
    "test/acc",
    "test/auroc",
    "test/normal_empty_rate",
)


def _parse_override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    return key.lstrip("+~"), yaml.safe_load(value) if value else None


def read_job(job: Path) -> dict:
    """One job directory as a flat row: overrides, status, and val/test metrics as ``stage/name``."""
    row: dict = {"job": job.name}
    overrides_file = job / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        for text in yaml.safe_load(overrides_file.read_text()) or []:
            key, value = _parse_override(text)
            row[key] = str(value) if isinstance(value, (list, dict)) else value
    metrics_file = job / "metrics.json"
    if (job / "error.txt").is_file():
        row["status"] = "failed"
        lines = (job / "error.txt").read_text().strip().splitlines()
        row["error"] = lines[-1] if lines else ""
    elif metrics_file.is_file():
        row["status"] = "finished"
        metrics = json.loads(metrics_file.read_text())
        for key in ("best_val", "best_epoch", "epochs_trained"):
            row[key] = metrics.get(key)
        for stage in ("val", "test"):
            for name, value in (metrics.get(stage) or {}).items():
                if not isinstance(value, list):
                    row[f"{stage}/{name}"] = value
    else:
        row["status"] = "incomplete"
    return row


def job_dirs(sweep_dir: str | Path) -> list[Path]:
    """The job directories of a multirun (those with .hydra/ or metrics.json), in job order."""
    jobs = [
        d
        for d in Path(sweep_dir).iterdir()
        if d.is_dir()
        and not d.name.startswith(".")
        and ((d / ".hydra").is_dir() or (d / "metrics.json").is_file())
    ]
    return sorted(jobs, key=lambda d: (int(d.name) if d.name.isdigit() else float("inf"), d.name))


def collect_runs(sweep_dir: str | Path) -> pd.DataFrame:
    """Every job of a multirun (the directories job_dirs finds), in job order."""
    jobs = job_dirs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir}: no job directories (with .hydra/ or metrics.json) inside.")
    return pd.DataFrame([read_job(d) for d in jobs])


def config_keys(runs: pd.DataFrame, replicate_keys: Sequence[str] = REPLICATE_KEYS) -> list[str]:
    """Swept overrides that define a configuration: those that vary, minus the replicate keys."""
    skip = {"job", "status", "error", "best_val", "best_epoch", "epochs_trained", *replicate_keys}
    candidates = [c for c in runs.columns if "/" not in c and c not in skip]
    return [c for c in candidates if runs[c].astype(str).nunique() > 1]


def summarize(
    runs: pd.DataFrame,
    metrics: Sequence[str] = DEFAULT_METRICS,
    replicate_keys: Sequence[str] = REPLICATE_KEYS,
) -> pd.DataFrame:
    """Mean, std (ddof=1) and n of each metric per configuration over finished runs; failed jobs counted."""
    present = [m for m in metrics if m in runs.columns]
    keys = config_keys(runs, replicate_keys)
    finished = runs["status"] == "finished"
    frame = runs.assign(failed=~finished)
    frame.loc[~finished, present] = float("nan")  # a failed job contributes no numbers
    grouped = frame.groupby(keys, dropna=False, sort=True) if keys else frame.groupby(lambda _: "all")
    table = grouped[present].agg(["mean", "std", "count"])
    table.columns = [f"{metric} {stat}" for metric, stat in table.columns]
    table["failed"] = grouped["failed"].sum()
    return table.reset_index(drop=not keys)


def to_markdown(summary: pd.DataFrame, metrics: Sequence[str]) -> str:
    """``mean ± std`` cells (std over replicates; n in the last column)."""
    keys = [c for c in summary.columns if " " not in c and c not in ("failed", "index")]
    present = [m for m in metrics if f"{m} mean" in summary.columns]
    header = [*keys, *present, "n", "failed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in summary.iterrows():
        cells = [str(row[k]) for k in keys]
        for metric in present:
            mean, std = row[f"{metric} mean"], row[f"{metric} std"]
            if pd.isna(mean):
                cells.append("n/a")
            else:
                cells.append(f"{mean:.3f}" + (f" ± {std:.3f}" if pd.notna(std) else ""))
        counts = [int(row[f"{m} count"]) for m in present]
        cells += [str(max(counts) if counts else 0), str(int(row["failed"]))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_parameter(runs: pd.DataFrame, parameter: str, metrics: Sequence[str]) -> plt.Figure:
    """Each metric's mean ± std against one numeric swept parameter."""
    finished = runs[runs["status"] == "finished"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for metric in metrics:
        if metric in finished.columns:
            stats = finished.groupby(parameter)[metric].agg(["mean", "std"]).sort_index()
            ax.errorbar(
                stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3, label=metric
            )
    ax.set_xlabel(parameter)
    ax.set_ylabel("metric (mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_summary(
    sweep_dir: str | Path,
    metrics: Sequence[str] = DEFAULT_METRICS,
    replicate_keys: Sequence[str] = REPLICATE_KEYS,
    out_dir: str | Path | None = None,
) -> pd.DataFrame:
    """Write runs.csv, summary.csv, summary.md and per-parameter plots; return the summary table."""
    out = Path(out_dir or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = collect_runs(sweep_dir)
    runs.to_csv(out / "runs.csv", index=False)
    summary = summarize(runs, metrics, replicate_keys)
    summary.to_csv(out / "summary.csv", index=False)
    markdown = to_markdown(summary, metrics)
    (out / "summary.md").write_text(markdown)
    for parameter in config_keys(runs, replicate_keys):
        if pd.api.types.is_numeric_dtype(runs[parameter]):
            figure = plot_parameter(runs, parameter, [m for m in metrics if m.startswith("val/")])
            figure.savefig(out / f"summary_{parameter.replace('/', '_')}.png")
            plt.close(figure)
    console = Console()
    console.print(f"{len(runs)} jobs ({(runs['status'] == 'finished').sum()} finished) in {sweep_dir}")
    console.print(Markdown(markdown))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "sweep_dir", type=Path, help="a multirun directory, e.g. outputs/multirun/<timestamp>"
    )
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), help="stage/name columns")
    parser.add_argument(
        "--over", nargs="*", default=list(REPLICATE_KEYS), help="replicate keys averaged over"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the sweep dir)")
    args = parser.parse_args(argv)
    write_summary(args.sweep_dir, args.metrics, args.over, args.out)


if __name__ == "__main__":
    main()
