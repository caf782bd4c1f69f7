"""What every entry point does around its job: instantiate from config, record provenance, report."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import platform
import subprocess
import sys
import traceback
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import hydra
import torch
from lightning_utilities.core.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import Callback
from pytorch_lightning.loggers import Logger
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from busi_mtl.utils.paths import CONFIG_DIR, PACKAGE_DIR

log = logging.getLogger(__name__)

PACKAGES = (
    "busi-mtl",
    "torch",
    "torchvision",
    "pytorch-lightning",
    "segmentation-models-pytorch",
    "timm",
    "torchmetrics",
    "albumentations",
    "opencv-python-headless",
    "numpy",
    "scikit-learn",
    "hydra-core",
    "omegaconf",
)


def instantiate_list(cfg: DictConfig | None, kind: type) -> list:
    """Instantiate every ``_target_`` entry of a config group (callbacks or loggers), checking the type."""
    objects = []
    for name, entry in (cfg or {}).items():
        if isinstance(entry, DictConfig) and "_target_" in entry:
            obj = hydra.utils.instantiate(entry)
            if not isinstance(obj, kind):
                raise TypeError(f"{name}: {entry._target_} is not a {kind.__name__}")
            objects.append(obj)
    return objects


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    return instantiate_list(cfg, Callback)


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    return instantiate_list(cfg, Logger)


def tree_digests(package_dir: Path = PACKAGE_DIR, config_dir: Path = CONFIG_DIR) -> dict[str, str]:
    """SHA-1 of every module of the package and every config file, keyed ``busi_mtl/...`` and ``conf/...``."""
    files = {f"{package_dir.name}/{p.relative_to(package_dir)}": p for p in package_dir.rglob("*.py")}
    files |= {f"conf/{p.relative_to(config_dir)}": p for p in config_dir.rglob("*.yaml")}
    return {name: hashlib.sha1(path.read_bytes()).hexdigest() for name, path in sorted(files.items())}


def changed_files(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """Names edited, added or removed between two :func:`tree_digests`."""
    return sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))


#: The code and configs as this process imported them. A multirun composes each job's config from the files on
#: disk when the job starts but runs the code loaded at the start, so an edit mid-sweep splits the two.
LOADED_TREE: dict[str, str] = tree_digests()


def changed_since_start() -> list[str]:
    """Package modules and config files edited, added or removed since this process imported the package."""
    return changed_files(LOADED_TREE, tree_digests())


@functools.cache
def git_commit() -> dict[str, Any]:
    """Commit of the source tree the package runs from, and whether it had uncommitted changes, as at the first
    call (about when the code was loaded: later edits show in :func:`changed_since_start`, not here)."""
    source = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(dirty)}


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when there is one, else the CPU; anything else is passed to torch."""
    return torch.device(name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu")


def run_info() -> dict[str, Any]:
    """Package versions, Python, platform, accelerator and git commit: what a number depends on."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "command": sys.argv,
        "packages": versions,
        "git": git_commit(),
        "changed_since_start": changed_since_start(),
    }


# torch's own thread count at start-up (one per core unless OMP_NUM_THREADS says otherwise), restored by
# num_threads=null so that a multirun job with null does not inherit an earlier job's count.
DEFAULT_THREADS = torch.get_num_threads()


def set_threads(num_threads: int | None) -> None:
    """Fix torch's CPU threads for this process (``num_threads`` in the train config; None gives torch's
    start-up default, one per core, back). CPU results are not bit-identical across thread counts, so two
    runs compared on a CPU should share it; :func:`run_info` records it."""
    if num_threads is None:
        torch.set_num_threads(DEFAULT_THREADS)
        return
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads={num_threads!r} must be a positive integer or null.")
    torch.set_num_threads(num_threads)


@rank_zero_only
def print_config(cfg: DictConfig, save_to: Path | None = None) -> None:
    """The composed config as a rich tree (one branch per group), also saved as text in the run dir."""
    tree = Tree("config", guide_style="dim")
    for key, value in cfg.items():
        branch = tree.add(str(key))
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch.add(text.rstrip())
    console = Console()
    console.print(tree)
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        with save_to.open("w") as fh:
            Console(file=fh, width=120).print(tree)


@rank_zero_only
def print_metrics(results: Mapping[str, Mapping[str, Any]], title: str = "Results") -> None:
    """One row per metric, one column per stage (val/test): the run's final numbers, readable."""
    stages = [s for s in results if isinstance(results[s], Mapping)]
    names = sorted({k for s in stages for k, v in results[s].items() if isinstance(v, (int, float))})
    table = Table(title=title)
    table.add_column("metric")
    for stage in stages:
        table.add_column(stage, justify="right")
    for name in names:
        cells = []
        for stage in stages:
            value = results[stage].get(name)
            cells.append(
                "" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
            )
        table.add_row(name, *cells)
    Console().print(table)


def json_safe(obj: Any) -> Any:
    """NaN/inf as null (strict JSON), recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: Path, payload: Mapping) -> None:
    path.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False))


def save_run_info(out: Path) -> None:
    """Write :func:`run_info` to ``out/run_info.json``, warning first when the code or configs were edited since
    this process started (a job's config is composed from the files on disk, its code is what was loaded)."""
    info = run_info()
    if info["changed_since_start"]:
        log.warning(
            "Changed since this process started: %s. This job's config was composed from the files on disk, "
            "but it runs the code loaded at the start (run long sweeps from a checkout you do not edit, "
            "e.g. a git worktree); the list is kept in run_info.json.",
            ", ".join(info["changed_since_start"]),
        )
    write_json(out / "run_info.json", info)


def task_wrapper(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Record a failure in the run dir (``error.txt``) before re-raising, so a failed job of a
    multirun is visible as failed and never mistaken for a finished one."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except BaseException as err:
            out = Path(cfg.paths.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "error.txt").write_text("".join(traceback.format_exception(err)))
            log.error("%s failed: %s (traceback in %s)", cfg.get("task_name", "task"), err, out / "error.txt")
            raise

    return wrapped
