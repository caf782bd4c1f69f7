"""Experiments at scale: multiruns that survive a failing job, Optuna studies that resume, DDP on CPU,
and the cluster launcher config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from busi_mtl.summarize import collect_runs, write_summary

from conftest import TINY_TRAIN, compose_config

QUIET = [o for o in TINY_TRAIN if not o.startswith("callbacks.")] + ["callbacks.progress_bar=null"]


def _train_cli(
    tmp_path: Path, *overrides: str, multirun: bool = False, sweep: str = "sweep"
) -> subprocess.CompletedProcess:
    where = f"hydra.sweep.dir={tmp_path / sweep}" if multirun else f"hydra.run.dir={tmp_path / 'run'}"
    command = [sys.executable, "-m", "busi_mtl.train", *(["-m"] if multirun else []), *QUIET]
    command += [f"paths.root_dir={tmp_path}", where, *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def test_multirun_keeps_results_of_good_jobs_when_one_fails(tmp_path):
    result = _train_cli(tmp_path, "loss.alpha=0.3,-1,0.7", "trainer.max_epochs=1", multirun=True)
    assert result.returncode != 0  # the failure is reported ...
    sweep = tmp_path / "sweep"
    for job in ("0", "2"):  # ... after every job ran
        assert json.loads((sweep / job / "metrics.json").read_text())["test"]["dice"] is not None
        assert (sweep / job / "split.csv").is_file() and (sweep / job / "tensorboard").is_dir()
    assert "loss.alpha" in (sweep / "1" / "error.txt").read_text()
    assert not (sweep / "1" / "metrics.json").exists()

    summary = write_summary(sweep, metrics=["val/dice", "test/dice"]).set_index("loss.alpha")
    assert summary.loc[0.3, "val/dice count"] == 1 and summary.loc[-1.0, "failed"] == 1
    assert (sweep / "summary.md").is_file() and (sweep / "summary_loss.alpha.png").is_file()


def test_cross_validation_experiment_runs_every_fold(tmp_path):
    result = _train_cli(
        tmp_path,
        "experiment=cv",  # replaces experiment=demo: its data and model choices are given here instead
        "data=synthetic",
        "model.encoder_name=resnet18",
        "data.num_folds=2",
        "data.fold=range(0,2)",
        "trainer.max_epochs=1",
        "test=false",
        multirun=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    splits = [pd.read_csv(sweep / str(k) / "split.csv") for k in range(2)]
    vals = [set(s.loc[s["split"] == "val", "id"]) for s in splits]
    assert not vals[0] & vals[1]
    assert vals[0] | vals[1] == set(splits[0].loc[splits[0]["split"] != "test", "id"])
    runs = collect_runs(sweep)
    assert runs["data.fold"].tolist() == [0, 1] and (runs["status"] == "finished").all()


def test_an_interrupted_multirun_resumes_only_its_unfinished_jobs(tmp_path):
    sweep_args = ("loss.alpha=0.3,0.7", "trainer.max_epochs=1")
    assert _train_cli(tmp_path, *sweep_args, multirun=True).returncode == 0
    sweep = tmp_path / "sweep"
    done = (sweep / "0" / "metrics.json").read_text()
    # job 1 failed part-way: no metrics.json, an error.txt
    (sweep / "1" / "metrics.json").unlink()
    (sweep / "1" / "error.txt").write_text("Traceback\nRuntimeError: killed\n")
    assert collect_runs(sweep)["status"].tolist() == ["finished", "failed"]

    result = _train_cli(tmp_path, *sweep_args, "resume=true", multirun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (sweep / "0" / "metrics.json").read_text() == done  # left alone
    assert "has finished (metrics.json); not run again" in (sweep / "0" / "train.log").read_text()
    assert json.loads((sweep / "1" / "metrics.json").read_text())["test"]["dice"] is not None
    assert collect_runs(sweep)["status"].tolist() == ["finished", "finished"]


def test_optuna_study_is_stored_and_resumes(tmp_path):
    study = ["hparams_search=optuna", "hydra.sweeper.sampler.n_startup_trials=1", "trainer.max_epochs=1"]
    first = _train_cli(tmp_path, *study, "hydra.sweeper.n_trials=2", multirun=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "sweep" / "optimization_results.yaml").is_file()
    second = _train_cli(tmp_path, *study, "hydra.sweeper.n_trials=1", multirun=True, sweep="sweep2")
    assert second.returncode == 0, second.stderr[-3000:]
    stored = optuna.load_study(
        study_name="busi_mtl", storage=f"sqlite:///{tmp_path / 'outputs' / 'optuna' / 'busi_mtl.db'}"
    )
    assert len(stored.trials) == 3 and all(t.state.name == "COMPLETE" for t in stored.trials)
    assert {"optimizer.lr", "loss.alpha", "model.encoder_name"} <= set(stored.trials[0].params)
    assert not json.loads((tmp_path / "sweep" / "0" / "metrics.json").read_text()).get(
        "test"
    )  # no test peeking


def test_ddp_on_cpu_gives_the_same_metric_keys_without_double_counting(tmp_path, trained_run):
    result = _train_cli(tmp_path, "trainer=ddp_sim", "trainer.max_epochs=1", "postprocess.normal_gate=0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    _, single = trained_run
    assert set(metrics["test"]) == set(single["test"]) and set(metrics["val"]) == set(single["val"])
    split = pd.read_csv(tmp_path / "run" / "split.csv")
    for stage in ("val", "test"):
        counted = metrics[stage]["n_lesion_images"] + metrics[stage]["n_normal_images"]
        assert counted == (split["split"] == stage).sum(), stage  # every image once, none padded in twice
        assert sum(map(sum, metrics[stage]["confusion_matrix"])) == counted


def test_gpu_and_cluster_configs_compose(tmp_path):
    ddp = compose_config("train", ["trainer=ddp", "data.root=/x"], tmp_path)
    assert ddp.trainer.strategy == "ddp" and ddp.trainer.sync_batchnorm
    gpu = compose_config("train", ["trainer=gpu", "trainer.precision=bf16-mixed", "data.root=/x"], tmp_path)
    assert gpu.trainer.accelerator == "gpu" and gpu.trainer.precision == "bf16-mixed"
    assert gpu.trainer.deterministic == "warn" and ddp.trainer.deterministic == "warn"


@pytest.mark.parametrize("trainer", ["default", "cpu", "gpu", "ddp", "ddp_sim"])
def test_no_trainer_config_autotunes_cudnn_in_deterministic_mode(tmp_path, trainer):
    """Lightning only warns when both are on, and autotuning may then pick other kernels run to run."""
    cfg = compose_config("train", [f"trainer={trainer}", "trainer.deterministic=true"], tmp_path)
    assert cfg.trainer.benchmark is False


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from busi_mtl.utils.paths import CONFIG_DIR

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", ["hydra/launcher=slurm", "data.root=/x"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.signal_delay_s == 120 and launcher.max_num_timeout == 3
