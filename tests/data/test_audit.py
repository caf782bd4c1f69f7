"""The dataset audit: per-image checks, near-duplicate hashing and grouping, the CLI, the real BUSI."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest

from busi_mtl.data.audit import audit_dataset, dhash, duplicate_groups, hamming_matrix, summarize
from busi_mtl.data.synthetic import render_case

from conftest import copy_case, lesion_image, write_png


def test_dhash_tolerates_recompression_and_small_shifts_but_not_other_scans():
    image, _ = render_case("benign", np.random.default_rng(1), 450, 500)
    jpeg = cv2.imdecode(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 60])[1], cv2.IMREAD_GRAYSCALE)
    shifted = np.roll(image, 5, axis=1)
    cropped = cv2.resize(image[10:-10, 12:-12], (500, 450))
    other, _ = render_case("benign", np.random.default_rng(2), 450, 500)
    distances = hamming_matrix(np.array([dhash(im) for im in (image, jpeg, shifted, cropped, other)]))
    assert distances[0, 1] <= 16 and distances[0, 2] <= 64 and distances[0, 3] <= 64
    assert distances[0, 4] > 64


def test_duplicate_groups_link_chains():
    bits = np.zeros((4, 16), bool)
    bits[1, :3] = True  # 3 bits from 0
    bits[2, :6] = True  # 3 bits from 1, 6 from 0
    bits[3, 8:] = True  # far from all
    groups = duplicate_groups(bits, threshold=3)
    assert groups[0] == groups[1] == groups[2] != groups[3]
    assert len(set(duplicate_groups(bits, threshold=2))) == 4


def test_audit_flags_each_problem(make_busi):
    root = make_busi((3, 3, 3))
    _, mask = lesion_image(seed=7)
    write_png(root / "benign" / "benign (1)_mask.png", np.zeros_like(mask))  # empty mask, lesion class
    write_png(root / "normal" / "normal (1)_mask.png", mask * 255)  # lesion drawn on a normal image
    write_png(root / "benign" / "benign (2)_mask_1.png", mask * 255)  # second mask
    write_png(
        root / "malignant" / "malignant (1)_mask.png",
        cv2.resize(mask * 255, (64, 48), interpolation=cv2.INTER_NEAREST),
    )  # size mismatch
    (root / "malignant" / "malignant (2)_mask.png").unlink()  # missing
    dup = cv2.imread(str(root / "benign" / "benign (3).png"), cv2.IMREAD_GRAYSCALE)
    write_png(root / "malignant" / "malignant (4).png", dup)  # the same scan filed under two classes
    write_png(root / "malignant" / "malignant (4)_mask.png", mask * 255)

    report, groups = audit_dataset(root)
    flagged = {
        flag: set(report.loc[report[flag], "id"]) for flag in report.columns if report[flag].dtype == bool
    }
    assert flagged["empty_mask_lesion"] == {"benign (1)"}
    assert flagged["nonempty_mask_normal"] == {"normal (1)"}
    assert flagged["multi_mask"] == {"benign (2)"}
    assert flagged["mask_size_mismatch"] == {"malignant (1)"}
    assert flagged["missing_mask"] == {"malignant (2)"}
    assert {"benign (3)", "malignant (4)"} <= flagged["cross_class_duplicate"]
    row = report.set_index("id").loc["malignant (4)"]
    assert row["nearest_id"] == "benign (3)" and row["nearest_distance"] == 0
    summary = summarize(report, groups)
    assert summary["images"] == 10 and summary["cross_class_groups"] >= 1 and summary["missing_mask"] == 1


def test_audit_cli_writes_report_and_checks_a_split_file(make_busi, tmp_path):
    root = make_busi((2, 2, 2))
    copy_case(root, "benign", 1, 2)  # benign (2) becomes a copy of benign (1)
    ids = [f"{c} ({n})" for c in ("normal", "benign", "malignant") for n in (1, 2)]
    split = pd.DataFrame(
        {
            "id": ids,
            "class": [i.split()[0] for i in ids],
            "split": ["train", "test", "train", "test", "val", "train"],
        }
    )
    split.to_csv(tmp_path / "published_split.csv", index=False)
    out = tmp_path / "audit_run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "busi_mtl.data.audit",
            f"data.root={root}",
            f"split_file={tmp_path / 'published_split.csv'}",
            f"hydra.run.dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "BUSI audit" in result.stdout
    summary = json.loads((out / "audit_summary.json").read_text())
    assert summary["per_class"] == {"normal": 2, "benign": 2, "malignant": 2}
    assert (out / "audit.csv").read_text().startswith("id,class")
    assert (out / "duplicates.csv").exists()
    assert summary["split_leaks_test"] == 1 and summary["split_leaks_val"] == 0
    leaks = pd.read_csv(out / "split_leaks.csv")
    assert leaks[["id", "train_copies"]].values.tolist() == [["benign (2)", "benign (1)"]]


@pytest.mark.real_data
def test_real_busi_audit_finds_cross_class_duplicates(real_busi):
    report, groups = audit_dataset(real_busi)
    by_id = report.set_index("id")
    assert by_id.loc["benign (433)", "dup_group"] == by_id.loc["malignant (145)", "dup_group"]
    summary = summarize(report, groups)
    assert summary["multi_mask"] == 17 and summary["mask_files"] == 798
    assert summary["cross_class_groups"] >= 5
    assert summary["missing_mask"] == summary["empty_mask_lesion"] == summary["nonempty_mask_normal"] == 0
    assert 100 <= summary["duplicate_groups"] <= 200
