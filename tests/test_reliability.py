"""Reliability: killed runs resume (exactly, in deterministic mode), seeds reproduce, bad input fails
early with one clear error and leaves nothing that looks like a finished run, NaN losses stop training."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from lightning_utilities.core.rank_zero import rank_zero_only
from omegaconf import OmegaConf, open_dict
from pytorch_lightning.plugins.environments import SLURMEnvironment

from busi_mtl.data.busi import BUSIDataError
from busi_mtl.losses import MultiTaskLoss
from busi_mtl.train import build_module, check_resumable, check_resume, resume_checkpoint, train
from busi_mtl.utils import run as run_utils

from conftest import TINY_TRAIN, compose_config, write_png

RUN = [o for o in TINY_TRAIN if not o.startswith("callbacks.")] + [
    "callbacks.progress_bar=null",
    "trainer.max_epochs=4",
    "trainer.deterministic=true",
    "data.synthetic.per_class=12",
]
#: The same, on a folder given as data.root instead of the generated synthetic set.
ON_FOLDER = [o for o in RUN if not o.startswith("data.synthetic")] + ["data=busi"]


def _start(workdir: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "busi_mtl.train",
        *RUN,
        f"paths.root_dir={workdir}",
        f"hydra.run.dir={run_dir}",
    ]
    return subprocess.Popen([*command, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]


def _kill_after_first_checkpoint(process: subprocess.Popen, run_dir: Path, sig: signal.Signals) -> None:
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    os.kill(process.pid, sig)
    process.wait(timeout=120)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    _finish(_start(workdir, workdir / "run"))
    return workdir / "run"


def test_sigkill_then_resume_ends_with_the_same_weights(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    _kill_after_first_checkpoint(_start(tmp_path, run_dir), run_dir, signal.SIGKILL)
    assert not (run_dir / "metrics.json").exists()  # a killed run never looks finished
    interrupted_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"]
    assert interrupted_at < 3

    _finish(_start(tmp_path, run_dir, "resume=true"))
    resumed, reference = (
        json.loads((run_dir / "metrics.json").read_text()),
        json.loads((uninterrupted / "metrics.json").read_text()),
    )
    assert resumed["epochs_trained"] == reference["epochs_trained"] == 4
    assert resumed["test"] == reference["test"] and resumed["val"] == reference["val"]
    final, expected = (
        _weights(run_dir / "checkpoints" / "last.ckpt"),
        _weights(uninterrupted / "checkpoints" / "last.ckpt"),
    )
    for key, value in expected.items():
        assert torch.equal(final[key], value), key


def test_sigterm_mid_epoch_records_the_stop_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    _kill_after_first_checkpoint(_start(tmp_path, run_dir), run_dir, signal.SIGTERM)
    assert not (run_dir / "metrics.json").exists()
    assert "SIGTERM" in (run_dir / "error.txt").read_text()
    _finish(_start(tmp_path, run_dir, "resume=true"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 4 and metrics["test"]["dice"] is not None
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 3
    # finished now, so no longer marked failed; the old failure is kept aside
    assert not (run_dir / "error.txt").exists()
    assert "SIGTERM" in (run_dir / "error.previous.txt").read_text()


def test_resume_leaves_a_finished_run_alone_and_refuses_another_config(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    finished = (run_dir / "metrics.json").read_text()
    last = (run_dir / "checkpoints" / "last.ckpt").stat().st_mtime_ns

    assert train(compose_config("train", [*RUN, "resume=true"], tmp_path)) == json.loads(finished)
    assert (run_dir / "metrics.json").read_text() == finished  # neither trained nor tested again
    check_resume(compose_config("train", [*RUN, "resume=true", "num_threads=3"], tmp_path), run_dir)
    assert (run_dir / "checkpoints" / "last.ckpt").stat().st_mtime_ns == last

    tree = (run_dir / "config_tree.log").read_text()
    hydra_record = {
        name: (run_dir / ".hydra" / name).read_text() for name in ("config.yaml", "overrides.yaml")
    }
    for name in hydra_record:  # what Hydra writes for the refused command before the run starts
        (run_dir / ".hydra" / name).write_text("[optimizer.lr=0.01]\n")
    changed = compose_config("train", [*RUN, "resume=true", "optimizer.lr=0.01", "data.fold=1"], tmp_path)
    with pytest.raises(ValueError, match=r"another config \(data\.fold: run 0, now 1; optimizer\.lr: run"):
        train(changed)
    assert not (run_dir / "error.txt").exists()  # a refused command does not mark the run failed
    assert (run_dir / "config_tree.log").read_text() == tree
    for name, text in hydra_record.items():  # and its .hydra/ record is the run's own again
        assert (run_dir / ".hydra" / name).read_text() == text, name


def test_resume_accepts_a_config_key_added_since_at_its_default(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    record = OmegaConf.load(run_dir / "run_config.yaml")
    del record.loss["normal_dice_weight"]  # as if the run predated the key
    OmegaConf.save(record, run_dir / "run_config.yaml")
    finished = json.loads((run_dir / "metrics.json").read_text())

    changed = compose_config("train", [*RUN, "resume=true", "loss.normal_dice_weight=0.5"], tmp_path)
    with pytest.raises(ValueError, match=r"loss\.normal_dice_weight: run '<unset>', now 0\.5"):
        check_resume(changed, run_dir)  # set to anything but its default, it is another config
    assert train(compose_config("train", [*RUN, "resume=true"], tmp_path)) == finished
    _finish(_start(tmp_path, run_dir, "resume=true"))  # and inside the Hydra app, as a user runs it
    assert json.loads((run_dir / "metrics.json").read_text()) == finished


def test_resume_without_checkpoint_starts_fresh_and_explicit_path_works(uninterrupted, tmp_path):
    cfg = compose_config("train", [*RUN, "trainer.max_epochs=1", "resume=true"], tmp_path)
    assert train(cfg)["epochs_trained"] == 1
    cfg = compose_config(
        "train", [*RUN, f"ckpt_path={uninterrupted / 'checkpoints' / 'last.ckpt'}"], tmp_path / "b"
    )
    metrics = train(cfg)  # already at max_epochs: nothing left to train, tested again
    assert metrics["epochs_trained"] == 4 and metrics["test"]["dice"] is not None


def test_a_fresh_run_into_an_old_runs_directory_sets_its_outcome_aside(uninterrupted, tmp_path, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "error.txt").write_text("an earlier attempt failed")
    (run_dir / "hpc_ckpt_1.ckpt").write_text("an earlier SLURM pre-emption checkpoint")
    old_metrics = (run_dir / "metrics.json").read_text()
    with caplog.at_level("WARNING", logger="busi_mtl.train"):
        metrics = train(compose_config("train", [*RUN, "trainer.max_epochs=1"], tmp_path))
    assert "holds an earlier run" in caplog.text
    assert metrics["epochs_trained"] == 1  # from scratch, not from the old last.ckpt
    assert not (run_dir / "error.txt").exists()  # so summaries count this run as finished
    assert (run_dir / "error.previous.txt").read_text() == "an earlier attempt failed"
    assert (run_dir / "metrics.previous.json").read_text() == old_metrics
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert (run_dir / "checkpoints" / "last.previous.ckpt").is_file()
    assert not (run_dir / "hpc_ckpt_1.ckpt").exists() and (run_dir / "previous_hpc_ckpt_1.ckpt").is_file()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    assert "max_epochs: 1" in (run_dir / "run_config.yaml").read_text()  # the record is this run's now


def test_a_ddp_process_relaunched_into_rank_0s_directory_leaves_it_alone(
    uninterrupted, tmp_path, caplog, monkeypatch
):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "error.txt").write_text("rank 0's business")
    monkeypatch.setattr(rank_zero_only, "rank", 1)  # what Lightning's relaunched DDP processes run as
    with caplog.at_level("WARNING", logger="busi_mtl.train"):
        train(compose_config("train", [*RUN, "train=false", "test=false"], tmp_path))
    assert "holds an earlier run" not in caplog.text
    assert (run_dir / "error.txt").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not list(run_dir.rglob("*previous*"))


def test_resume_of_a_run_without_a_config_record_warns_that_it_cannot_check(tmp_path, caplog):
    cfg = compose_config("train", [*RUN, "resume=true"], tmp_path)
    (tmp_path / "run").mkdir()
    check_resume(cfg, tmp_path / "run")  # a new run: nothing to check, nothing to say
    assert not caplog.records
    (tmp_path / "run" / "metrics.json").write_text("{}")  # a run from before run_config.yaml
    check_resume(cfg, tmp_path / "run")
    assert "cannot be checked" in caplog.text


def test_only_rank_0_warns_that_an_older_run_cannot_be_checked(tmp_path, caplog, monkeypatch):
    cfg = compose_config("train", [*RUN, "resume=true"], tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    check_resume(cfg, tmp_path / "run")
    assert "cannot be checked" not in caplog.text


def test_same_seed_same_numbers_in_deterministic_mode(tmp_path):
    overrides = [*RUN, "trainer.max_epochs=2"]
    first = train(compose_config("train", overrides, tmp_path / "a"))
    second = train(compose_config("train", overrides, tmp_path / "b"))
    assert first["val"] == second["val"] and first["test"] == second["test"]
    other = train(compose_config("train", [*overrides, "seed=7"], tmp_path / "c"))
    assert other["val"] != first["val"]


def test_every_run_dir_records_what_it_depends_on(uninterrupted):
    for name in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "split.csv",
        "run_info.json",
        "run_config.yaml",
    ):
        assert (uninterrupted / name).is_file(), name
    info = json.loads((uninterrupted / "run_info.json").read_text())
    assert {"torch", "pytorch-lightning", "segmentation-models-pytorch"} <= set(info["packages"])
    assert "commit" in info["git"] and info["command"]
    assert info["changed_since_start"] == []


def test_tree_digests_name_every_edited_added_and_removed_file(tmp_path):
    package, conf = tmp_path / "busi_mtl", tmp_path / "conf"
    for path in (package / "a.py", package / "sub" / "b.py", conf / "train.yaml", conf / "loss" / "x.yaml"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(path.name)
    before = run_utils.tree_digests(package, conf)
    assert set(before) == {"busi_mtl/a.py", "busi_mtl/sub/b.py", "conf/train.yaml", "conf/loss/x.yaml"}
    (package / "sub" / "b.py").write_text("edited")
    (conf / "loss" / "x.yaml").unlink()
    (conf / "loss" / "y.yaml").write_text("new")
    (package / "notes.txt").write_text("neither code nor config")
    after = run_utils.tree_digests(package, conf)
    assert run_utils.changed_files(before, after) == [
        "busi_mtl/sub/b.py",
        "conf/loss/x.yaml",
        "conf/loss/y.yaml",
    ]


def test_a_job_started_after_an_edit_warns_and_records_it(tmp_path, monkeypatch, caplog):
    # As if conf/train.yaml had been edited after this process imported the package (e.g. mid-multirun).
    monkeypatch.setitem(run_utils.LOADED_TREE, "conf/train.yaml", "0" * 40)
    cfg = compose_config("train", [*RUN, "train=false", "test=false"], tmp_path)
    with caplog.at_level("WARNING", logger="busi_mtl.utils.run"):
        train(cfg)
    assert "Changed since this process started: conf/train.yaml" in caplog.text
    info = json.loads((Path(cfg.paths.output_dir) / "run_info.json").read_text())
    assert info["changed_since_start"] == ["conf/train.yaml"]


def test_resuming_another_architecture_is_refused(uninterrupted, tmp_path):
    ckpt = uninterrupted / "checkpoints" / "last.ckpt"
    cfg = compose_config("train", [*RUN, f"ckpt_path={ckpt}", "model.encoder_name=resnet34"], tmp_path)
    with pytest.raises(
        ValueError, match=r"another model \(model\.encoder_name: checkpoint 'resnet18' vs this run 'resnet34'"
    ):
        train(cfg)
    assert (tmp_path / "run" / "error.txt").is_file() and not (tmp_path / "run" / "metrics.json").exists()


def test_a_model_key_added_since_the_checkpoint_takes_its_default(uninterrupted, tmp_path):
    # A checkpoint written before model.drop_path_rate / mask_pooling existed lacks those keys.
    ckpt = torch.load(uninterrupted / "checkpoints" / "last.ckpt", weights_only=True)
    for key in ("drop_path_rate", "mask_pooling"):
        del ckpt["hyper_parameters"]["net"][key]
    older = tmp_path / "older.ckpt"
    torch.save(ckpt, older)
    check_resumable(str(older), build_module(compose_config("train", RUN, tmp_path)))  # at the defaults
    pooled = build_module(compose_config("train", [*RUN, "model.mask_pooling=true"], tmp_path))
    with pytest.raises(ValueError, match=r"model\.mask_pooling: checkpoint False vs this run True"):
        check_resumable(str(older), pooled)


def test_nan_loss_stops_before_checkpointing(tmp_path, monkeypatch):
    original = MultiTaskLoss.forward
    calls = {"n": 0}

    def poisoned(self, *args):
        out = original(self, *args)
        calls["n"] += 1
        if self.training and calls["n"] > 14:  # well into the second epoch (about 5 steps per epoch)
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(MultiTaskLoss, "forward", poisoned)
    cfg = compose_config("train", [*RUN, "callbacks.finite_loss.check_every_n_steps=100"], tmp_path)
    with pytest.raises(FloatingPointError, match=r"NaN or inf.*lower optimizer\.lr"):
        train(cfg)
    run = tmp_path / "run"
    assert not (run / "metrics.json").exists() and "FloatingPointError" in (run / "error.txt").read_text()
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_bf16_autocast_trains_on_cpu(tmp_path):
    metrics = train(
        compose_config("train", [*RUN, "trainer.max_epochs=1", "trainer.precision=bf16-mixed"], tmp_path)
    )
    assert np.isfinite(metrics["test"]["pixel_acc"]) and np.isfinite(metrics["val"]["loss"])


# --- bad input: one clear error naming the file (or key) and the fix; no finished-looking run dir ---


def _missing_root(root: Path) -> Path:
    return root / "nope"


def _empty_root(root: Path) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def _no_normal_folder(root: Path) -> Path:
    shutil.rmtree(root / "normal")
    return root


def _truncated(root: Path) -> Path:
    path = root / "benign" / "benign (2).png"
    path.write_bytes(path.read_bytes()[:300])
    return root


def _zero_bytes(root: Path) -> Path:
    (root / "benign" / "benign (2).png").write_bytes(b"")
    return root


def _not_an_image(root: Path) -> Path:
    (root / "malignant" / "malignant (1).png").write_text("<html/>")
    return root


def _mask_of_another_shape(root: Path) -> Path:
    write_png(root / "benign" / "benign (1)_mask.png", np.full((50, 300), 255, np.uint8))
    return root


def _soft_mask(root: Path) -> Path:
    path = root / "benign" / "benign (1)_mask.png"
    write_png(path, cv2.GaussianBlur(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (9, 9), 3))
    return root


def _no_mask(root: Path) -> Path:
    (root / "benign" / "benign (3)_mask.png").unlink()
    return root


def _sixteen_bit(root: Path) -> Path:
    write_png(root / "benign" / "benign (4).png", np.full((40, 40), 3000, np.uint16))
    return root


BREAKAGES = {
    "missing root": (_missing_root, "does not exist"),
    "empty root": (_empty_root, r"class folder\(s\)"),
    "class folder missing": (_no_normal_folder, r"\['normal'\] missing"),
    "truncated png": (_truncated, r"benign \(2\)\.png: cannot be decoded"),
    "zero-byte file": (_zero_bytes, r"benign \(2\)\.png: file is empty"),
    "not an image": (_not_an_image, r"malignant \(1\)\.png: not a PNG file"),
    "mask of another shape": (_mask_of_another_shape, r"benign \(1\)_mask\.png.*different aspect ratio"),
    "mask values": (_soft_mask, r"benign \(1\)_mask\.png: mask has values.*besides 0/1/255"),
    "image without mask": (_no_mask, r"benign \(3\)\.png: benign image without a mask"),
    "16-bit png": (_sixteen_bit, r"benign \(4\)\.png: 16-bit PNG"),
}


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_bad_data_fails_early_and_clearly(case, synthetic_busi, tmp_path):
    break_it, message = BREAKAGES[case]
    root = break_it(Path(shutil.copytree(synthetic_busi, tmp_path / "busi")))
    cfg = compose_config("train", [*ON_FOLDER, f"data.root={root}"], tmp_path)
    with pytest.raises(BUSIDataError, match=message):
        train(cfg)
    run = tmp_path / "run"
    assert (run / "error.txt").is_file() and not (run / "metrics.json").exists()
    assert not (run / "checkpoints").exists()


def test_corrupt_split_file(synthetic_busi, tmp_path):
    split = tmp_path / "split.csv"
    split.write_text("id,class,split\nbenign (999),benign,train\n")
    cfg = compose_config(
        "train", [*ON_FOLDER, f"data.root={synthetic_busi}", f"data.split_file={split}"], tmp_path
    )
    with pytest.raises(BUSIDataError, match=r"split_file=.*not in the dataset.*benign \(999\)"):
        train(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.image_size=100"], r"data\.image_size=100 must be a positive multiple of 32"),
        (["loss.alpha=0", "loss.beta=0"], r"loss\.alpha.*loss\.beta"),
    ],
)
def test_bad_settings(overrides, message, tmp_path):
    with pytest.raises(Exception, match=message):
        train(compose_config("train", [*RUN, *overrides], tmp_path))
    assert (tmp_path / "run" / "error.txt").is_file()


def test_unknown_config_key_or_option(tmp_path):
    with pytest.raises(ConfigCompositionException, match=r"trainer\.max_epoch"):
        compose_config("train", ["trainer.max_epoch=3"], tmp_path)
    with pytest.raises(ConfigCompositionException, match=r"Could not find 'model/segformer'"):
        compose_config("train", ["model=segformer"], tmp_path)


def test_slurm_requeue_is_wired(monkeypatch, tmp_path):
    """On SLURM, Lightning's SLURMEnvironment requeues on SIGUSR1 after saving hpc_ckpt_N.ckpt, and
    resume=true picks the newest of that and last.ckpt."""
    for key, value in {
        "SLURM_JOB_ID": "42",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "busi",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }.items():
        monkeypatch.setenv(key, value)
    cfg = compose_config("train", [*RUN, "trainer.accelerator=cpu"], tmp_path)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    env = trainer._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue
    with open_dict(cfg):
        cfg.resume = True
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"old")
    time.sleep(0.01)
    (out / "hpc_ckpt_1.ckpt").write_bytes(b"new")
    assert resume_checkpoint(cfg, out) == str(out / "hpc_ckpt_1.ckpt")


def test_no_unsafe_torch_load_in_the_package():
    """Every torch.load in the package passes weights_only=True."""
    source = Path(__file__).resolve().parents[1] / "src" / "busi_mtl"
    for path in source.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}:{number}"
