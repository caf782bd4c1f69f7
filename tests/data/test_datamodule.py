"""BUSIDataModule: batches, saved and reused splits, k-fold, class weights, sampler, workers, real BUSI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch.utils.data import DataLoader

from busi_mtl.data.datamodule import BUSIDataModule, worker_init
from busi_mtl.data.synthetic import generate_busi

from conftest import copy_case


def _datamodule(root, tmp_path, **kwargs) -> BUSIDataModule:
    defaults = {
        "image_size": 64,
        "cache_dir": str(tmp_path / "cache"),
        "output_dir": str(tmp_path / "run"),
        "batch_size": 4,
        "num_workers": 0,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
    }
    dm = BUSIDataModule(root=str(root), **{**defaults, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_batches_have_the_documented_shapes(synthetic_busi, tmp_path):
    dm = _datamodule(synthetic_busi, tmp_path)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= 0 and batch["image"].max() <= 1
    assert batch["mask"].shape == (4, 1, 64, 64) and set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    assert batch["label"].dtype == torch.long and batch["label"].shape == (4,)
    assert len(batch["id"]) == 4 and all(isinstance(i, str) for i in batch["id"])
    val = next(iter(dm.val_dataloader()))
    for i, image_id in enumerate(val["id"]):
        assert (val["mask"][i].sum() > 0) == (not image_id.startswith("normal"))


def test_split_is_saved_and_reusable(synthetic_busi, tmp_path):
    dm = _datamodule(synthetic_busi, tmp_path)
    saved = pd.read_csv(tmp_path / "run" / "split.csv")
    assert list(saved.columns) == ["id", "class", "label", "group", "split", "fold"]
    assert len(saved) == 36 and set(saved["split"]) == {"train", "val", "test"}
    reused = _datamodule(
        synthetic_busi,
        tmp_path,
        split_file=str(tmp_path / "run" / "split.csv"),
        output_dir=str(tmp_path / "r2"),
    )
    for name in ("train", "val", "test"):
        assert [dm.arrays.ids[i] for i in dm.datasets[name].indices] == [
            reused.arrays.ids[i] for i in reused.datasets[name].indices
        ]


def test_splits_are_disjoint_and_cover_everything(synthetic_busi, tmp_path):
    dm = _datamodule(synthetic_busi, tmp_path)
    parts = [set(dm.datasets[n].indices) for n in ("train", "val", "test")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert set().union(*parts) == set(range(36))
    table = dm.split_table
    assert table.groupby("group")["split"].nunique().max() == 1


def test_kfold_through_the_datamodule(synthetic_busi, tmp_path):
    seen_val = []
    for fold in range(3):
        dm = _datamodule(
            synthetic_busi, tmp_path, num_folds=3, fold=fold, output_dir=str(tmp_path / f"f{fold}")
        )
        seen_val.append(set(dm.datasets["val"].indices))
        test = set(dm.datasets["test"].indices)
    assert not (seen_val[0] & seen_val[1]) and not (seen_val[1] & seen_val[2])
    assert set().union(*seen_val) == set(range(36)) - test


def test_group_duplicates_switch(make_busi, tmp_path, caplog):
    root = make_busi((4, 5, 5))
    copy_case(root, "benign", 1, 2)  # benign (2) becomes a copy of benign (1)
    grouped = _datamodule(root, tmp_path, image_size=32).split_table.set_index("id")
    assert grouped.loc["benign (1)", "group"] == grouped.loc["benign (2)", "group"]
    assert grouped["group"].nunique() == 13
    assert "near-duplicate in the train split" not in caplog.text
    leaky = _datamodule(root, tmp_path, image_size=32, group_duplicates=False).split_table.set_index("id")
    assert leaky["group"].nunique() == 14
    assert "split one by one" in caplog.text
    split = grouped.reset_index()
    split["split"] = "train"
    split.loc[split["id"] == "benign (2)", "split"] = "test"
    split[["id", "class", "split"]].to_csv(tmp_path / "leaky.csv", index=False)  # no group column
    loaded = _datamodule(root, tmp_path, image_size=32, split_file=str(tmp_path / "leaky.csv")).split_table
    assert loaded.set_index("id")["group"].equals(grouped["group"])  # saved with the audit's groups
    expected = (
        "1 test image(s) have a near-duplicate in the train split (e.g. benign (2), a copy of benign (1))"
    )
    assert expected in caplog.text


def test_class_weights_and_pixel_statistics_come_from_train_only(synthetic_busi, tmp_path):
    dm = _datamodule(synthetic_busi, tmp_path, val_fraction=0.2, test_fraction=0.2)
    train = dm.datasets["train"]
    labels = train.labels[train.indices]
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    counts = np.bincount(labels, minlength=3)
    np.testing.assert_allclose(expected, len(labels) / (3 * counts))  # the formula, by hand
    np.testing.assert_allclose(dm.class_weights.numpy(), expected, rtol=1e-6)
    pixels = dm.arrays.images[np.sort(train.indices)].astype(np.float64) / 255
    assert dm.pixel_mean == pytest.approx(pixels.mean(), rel=1e-6)
    assert dm.pixel_std == pytest.approx(pixels.std(), rel=1e-4)


def test_balanced_sampler_balances_and_disables_loss_weights(tmp_path):
    root = generate_busi(
        tmp_path / "imbalanced", per_class={"normal": 6, "benign": 24, "malignant": 10}, seed=1
    )
    dm = _datamodule(
        root, tmp_path, balanced_sampler=True, val_fraction=0.0, test_fraction=0.0, image_size=32
    )
    assert torch.equal(dm.class_weights, torch.ones(3))
    drawn = []
    for epoch in range(15):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)  # Lightning does this before every epoch
        drawn += [b["label"] for b in loader]
    drawn = torch.cat(drawn)
    shares = torch.bincount(drawn, minlength=3).float() / len(drawn)
    assert (shares - 1 / 3).abs().max() < 0.08  # unbalanced would be 0.15 / 0.6 / 0.25


def test_augment_switch(synthetic_busi, tmp_path):
    plain = _datamodule(synthetic_busi, tmp_path, augment=False)
    assert plain.datasets["train"].transform is None
    sample = plain.datasets["train"][0]
    cached = torch.from_numpy(np.array(plain.arrays.images[plain.datasets["train"].indices[0]])).float() / 255
    torch.testing.assert_close(sample["image"][0], cached)
    augmented = _datamodule(synthetic_busi, tmp_path, augment=True, aug_strength=2.0)
    assert augmented.datasets["train"].transform is not None
    assert augmented.datasets["val"].transform is None and augmented.datasets["test"].transform is None


def _epoch_images(dm: BUSIDataModule, epoch: int, workers: int) -> tuple[list[str], torch.Tensor]:
    loader = dm.train_dataloader()
    loader = DataLoader(
        loader.dataset, batch_size=4, sampler=loader.sampler, num_workers=workers, worker_init_fn=worker_init
    )
    loader.sampler.set_epoch(epoch)
    batches = list(loader)
    return [i for b in batches for i in b["id"]], torch.cat([b["image"] for b in batches])


def test_batches_depend_on_seed_and_epoch_only(synthetic_busi, tmp_path):
    """Order and augmentation are functions of (seed, epoch): the same with 0 or 2 workers, different
    between epochs. This is what makes a resumed run identical to an uninterrupted one."""
    dm = _datamodule(synthetic_busi, tmp_path)
    ids0, images0 = _epoch_images(dm, epoch=3, workers=0)
    ids2, images2 = _epoch_images(dm, epoch=3, workers=2)
    assert ids0 == ids2
    torch.testing.assert_close(images0, images2)
    ids_next, images_next = _epoch_images(dm, epoch=4, workers=0)
    assert ids_next != ids0 and not torch.equal(images_next, images0)
    keys = list(iter(dm.train_dataloader().sampler))
    assert all(isinstance(k, tuple) and k[1] == 0 for k in keys) and sorted(k[0] for k in keys) == list(
        range(len(keys))
    )


def test_missing_mask_skip_policy(make_busi, tmp_path):
    root = make_busi((4, 5, 5))
    (root / "benign" / "benign (1)_mask.png").unlink()
    with pytest.raises(Exception, match="without a mask"):
        _datamodule(root, tmp_path, val_fraction=0.0, test_fraction=0.0, image_size=32)
    dm = _datamodule(
        root, tmp_path, val_fraction=0.0, test_fraction=0.0, image_size=32, on_missing_mask="skip"
    )
    assert len(dm.manifest) == 13


def test_image_size_validation(synthetic_busi, tmp_path):
    with pytest.raises(ValueError, match="multiple of 32"):
        BUSIDataModule(root=str(synthetic_busi), image_size=100)


def test_synthetic_set_is_generated_on_first_use(tmp_path):
    root = tmp_path / "gen"
    dm = _datamodule(
        root, tmp_path, synthetic={"per_class": 5, "seed": 0}, val_fraction=0.0, test_fraction=0.0
    )
    assert (root / "benign" / "benign (5).png").exists() and len(dm.manifest) == 15


@pytest.mark.real_data
def test_real_busi_split_keeps_duplicate_groups_together(real_busi, tmp_path):
    dm = BUSIDataModule(
        root=str(real_busi), image_size=32, cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path)
    )
    dm.setup("fit")
    table = dm.split_table.set_index("id")
    assert table.groupby("group")["split"].nunique().max() == 1
    assert table.loc["benign (433)", "split"] == table.loc["malignant (145)", "split"]
    shares = pd.crosstab(table["split"], table["class"], normalize="index")
    assert (shares.max() - shares.min()).max() < 0.06
    assert len(table) == 780
