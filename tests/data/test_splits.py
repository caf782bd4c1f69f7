"""Grouped stratified splits: proportions, disjointness (duplicate groups too), k-fold, saved split files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from busi_mtl.data.busi import BUSIDataError
from busi_mtl.data.splits import duplicate_leaks, grouped_split, make_split_table, read_split_file


@pytest.fixture
def population() -> tuple[np.ndarray, np.ndarray]:
    """780 samples with BUSI's class mix and ~150 duplicate groups of 2-4 images."""
    rng = np.random.default_rng(0)
    labels = rng.choice(3, size=780, p=[133 / 780, 437 / 780, 210 / 780])
    groups = np.arange(780)
    for start in rng.choice(770, size=150, replace=False):
        groups[start : start + rng.integers(2, 5)] = groups[start]
    return labels, groups


def _groups_disjoint(split: np.ndarray, groups: np.ndarray) -> bool:
    return pd.Series(split).groupby(groups).nunique().max() == 1


def test_split_fractions_and_stratification(population):
    labels, groups = population
    split, folds = grouped_split(labels, groups, 0.15, 0.15, seed=1)
    assert (folds == -1).all()
    sizes = pd.Series(split).value_counts(normalize=True)
    assert sizes["train"] == pytest.approx(0.70, abs=0.03)
    assert sizes["val"] == pytest.approx(0.15, abs=0.03) and sizes["test"] == pytest.approx(0.15, abs=0.03)
    overall = np.bincount(labels, minlength=3) / len(labels)
    for name in ("train", "val", "test"):
        part = np.bincount(labels[split == name], minlength=3) / (split == name).sum()
        assert np.abs(part - overall).max() < 0.04, name
    assert _groups_disjoint(split, groups)


def test_split_is_seeded(population):
    labels, groups = population
    a, _ = grouped_split(labels, groups, seed=5)
    b, _ = grouped_split(labels, groups, seed=5)
    c, _ = grouped_split(labels, groups, seed=6)
    assert (a == b).all() and (a != c).any()


def test_kfold_folds_disjoint_cover_the_rest_and_keep_test_fixed(population):
    labels, groups = population
    plain, _ = grouped_split(labels, groups, seed=2)
    vals = []
    for fold in range(5):
        split, folds = grouped_split(labels, groups, seed=2, num_folds=5, fold=fold)
        assert ((split == "test") == (plain == "test")).all()
        assert set(folds[split == "test"]) == {-1} and set(folds[split != "test"]) == set(range(5))
        assert (split[folds == fold] == "val").all() and (
            split[(folds != fold) & (folds >= 0)] == "train"
        ).all()
        assert _groups_disjoint(split, groups)
        vals.append(set(np.flatnonzero(split == "val")))
    assert sum(len(v) for v in vals) == (plain != "test").sum()
    assert set().union(*vals) == set(np.flatnonzero(plain != "test"))


@pytest.mark.parametrize(
    ("val", "test", "message"),
    [(0.5, 0.5, "together below 1"), (0.13, 0.15, "multiples of 1/n"), (-0.1, 0.1, "must be in")],
)
def test_bad_fractions(population, val, test, message):
    labels, groups = population
    with pytest.raises(ValueError, match=message):
        grouped_split(labels, groups, val, test)


def test_bad_fold(population):
    with pytest.raises(ValueError, match=r"data\.fold=5"):
        grouped_split(*population, num_folds=5, fold=5)


def _manifest(n: int = 60) -> pd.DataFrame:
    labels = np.arange(n) % 3
    classes = np.array(["normal", "benign", "malignant"])[labels]
    return pd.DataFrame(
        {"id": [f"{c} ({i})" for i, c in enumerate(classes)], "class": classes, "label": labels}
    )


def test_split_file_roundtrip_and_corruption(tmp_path):
    manifest = _manifest()
    table = make_split_table(manifest, np.arange(60), 0.15, 0.15, seed=0)
    path = tmp_path / "split.csv"
    table.to_csv(path, index=False)
    pd.testing.assert_frame_equal(read_split_file(path, manifest), table)

    # a published split without group/fold columns: groups come from the caller, folds are -1
    table[["id", "class", "split"]].iloc[::-1].to_csv(path, index=False)
    groups = np.arange(60) // 2
    loaded = read_split_file(path, manifest, groups)
    assert loaded["id"].tolist() == manifest["id"].tolist()
    assert loaded["group"].tolist() == groups.tolist() and (loaded["fold"] == -1).all()
    assert (read_split_file(path, manifest)["group"] == -1).all()

    table.iloc[[0], table.columns.get_loc("id")] = "benign (999)"
    table.to_csv(path, index=False)
    with pytest.raises(BUSIDataError, match=r"1 id\(s\) not in the dataset.*benign \(999\)"):
        read_split_file(path, manifest)

    table.drop(index=0).to_csv(path, index=False)
    with pytest.raises(BUSIDataError, match="not assigned to any split"):
        read_split_file(path, manifest)

    path.write_text("id,class\nx,y\n")
    with pytest.raises(BUSIDataError, match="missing column"):
        read_split_file(path, manifest)

    bad = make_split_table(manifest, np.arange(60), 0.15, 0.15, seed=0)
    bad.loc[0, "class"] = "benign"
    bad.to_csv(path, index=False)
    with pytest.raises(BUSIDataError, match="class differs"):
        read_split_file(path, manifest)


def test_too_small_for_the_fractions_says_what_to_change():
    labels, groups = np.repeat([0, 1, 2], 4), np.arange(12)
    with pytest.raises(ValueError, match=r"into 20 stratified parts.*data\.val_fraction=0\.2"):
        grouped_split(labels, groups, 0.15, 0.15)
    split, _ = grouped_split(np.repeat([0, 1, 2], 5), np.arange(15), 0.2, 0.2)
    assert (split == "test").sum() == 3


def test_duplicate_leaks_lists_val_and_test_images_with_a_copy_in_train():
    table = pd.DataFrame(
        {
            "id": ["a", "b", "c", "d", "e", "f"],
            "class": ["benign"] * 6,
            "split": ["train", "test", "val", "train", "test", "val"],
        }
    )
    leaks = duplicate_leaks(table, np.array([0, 0, 0, 1, 2, 2]))  # a-b-c one scan, e-f another
    assert leaks[["id", "split", "train_copies"]].values.tolist() == [["b", "test", "a"], ["c", "val", "a"]]
    assert duplicate_leaks(table, np.arange(6)).empty
