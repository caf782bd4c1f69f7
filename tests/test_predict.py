"""Prediction on new images: any size and format, masks at original resolution, bad files skipped,
preprocessing identical to training, TTA, output paths confined to the output folder."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from busi_mtl.data.synthetic import render_case
from busi_mtl.evaluate import evaluate
from busi_mtl.predict import Predictor, inside, predict_folder, safe_names

from conftest import compose_config, write_png


@pytest.fixture(scope="module")
def predictor(trained_run) -> Predictor:
    run, _ = trained_run
    return Predictor.from_checkpoint(run / "checkpoints" / "last.ckpt", device="cpu")


def test_folder_of_mixed_images(predictor, tmp_path):
    source = tmp_path / "in"
    gray, _ = render_case("benign", np.random.default_rng(0), 333, 517)
    write_png(source / "odd size.png", gray)
    cv2.imwrite(str(source / "colour.jpg"), np.dstack([gray] * 3))
    write_png(source / "sixteen.png", gray.astype(np.uint16) * 257)
    (source / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (source / "empty.png").write_bytes(b"")
    write_png(source / "odd size_mask.png", np.zeros_like(gray))  # BUSI mask beside its image: skipped
    out = tmp_path / "out"
    table = predict_folder(predictor, source, out, batch_size=2).set_index("file")
    assert len(table) == 5
    errors = table["error"].fillna("")
    assert set(errors[errors != ""].index) == {str(source / "broken.png"), str(source / "empty.png")}
    for name in ("odd size", "colour", "sixteen"):
        row = table.loc[str(next(source.glob(f"{name}.*")))]
        mask = cv2.imread(str(out / row["mask"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (333, 517) and set(np.unique(mask)) <= {0, 255}
        assert int(row["lesion_area_px"]) == int((mask > 0).sum())
        assert row[["p_normal", "p_benign", "p_malignant"]].sum() == pytest.approx(1, abs=1e-5)
        assert (out / "overlays" / f"{name}_overlay.png").is_file()
    pd.testing.assert_series_equal(  # gray and RGB copies of one image give one prediction
        table.loc[str(source / "odd size.png"), ["p_benign", "p_malignant"]],
        table.loc[str(source / "colour.jpg"), ["p_benign", "p_malignant"]],
        check_names=False,
        atol=0.02,
    )


def test_preprocessing_matches_training(trained_run, tmp_path):
    """Predicting the raw files gives the same class probabilities as evaluating the cached dataset."""
    run, _ = trained_run
    ckpt = run / "checkpoints" / "last.ckpt"
    evaluate(compose_config("eval", [f"ckpt_path={ckpt}", "trainer.accelerator=cpu"], tmp_path / "eval"))
    expected = pd.read_csv(tmp_path / "eval" / "run" / "per_image.csv").set_index("id")
    root = next((run.parent / "data" / "synthetic_busi").iterdir())
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    assert predictor.preprocessing.image_size == 64
    for image_id in expected.index[:4]:
        cls = image_id.split(" (")[0]
        image = cv2.imread(str(root / cls / f"{image_id}.png"), cv2.IMREAD_GRAYSCALE)
        _, probs = predictor([image])
        np.testing.assert_allclose(
            probs[0], expected.loc[image_id, ["p_normal", "p_benign", "p_malignant"]], atol=1e-5
        )


def test_tta_averages_the_flipped_prediction(predictor):
    image, _ = render_case("malignant", np.random.default_rng(1), 300, 400)
    plain_maps, plain = predictor([image])
    flipped_maps, flipped = predictor([np.ascontiguousarray(image[:, ::-1])])
    predictor.tta = True
    try:
        tta_maps, tta = predictor([image])
    finally:
        predictor.tta = False
    np.testing.assert_allclose(tta, (plain + flipped) / 2, atol=1e-5)
    np.testing.assert_allclose(tta_maps[0], (plain_maps[0] + flipped_maps[0][:, ::-1]) / 2, atol=1e-4)


def test_output_names_stay_inside(tmp_path):
    assert safe_names([tmp_path / "a.png", tmp_path / "a.jpg", tmp_path / "..png"]) == ["a", "a_1", "image"]
    assert safe_names([tmp_path / "x\\..\\y.png"])[0] == "x_.._y"
    with pytest.raises(ValueError, match="outside the output folder"):
        inside(tmp_path / "out", tmp_path / "out" / ".." / "escape.png")
    assert inside(tmp_path / "out", tmp_path / "out" / "masks" / "a.png").name == "a.png"


def test_single_file_cli(trained_run, tmp_path):
    run, _ = trained_run
    image, _ = render_case("normal", np.random.default_rng(2), 200, 260)
    path = write_png(tmp_path / "scan.png", image)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "busi_mtl.predict",
            f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
            f"input={path}",
            f"output={tmp_path / 'out'}",
            "tta=true",
            f"hydra.run.dir={tmp_path / 'log'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert len(table) == 1 and table.loc[0, "height"] == 200 and table.loc[0, "width"] == 260


def test_nothing_readable_is_an_error(predictor, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"nope")
    with pytest.raises(RuntimeError, match="none of the 1 files could be read"):
        predict_folder(predictor, tmp_path / "in", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        predict_folder(predictor, tmp_path / "missing", tmp_path / "out")


def test_card_free_checkpoint_is_refused(tmp_path, trained_run):
    run, _ = trained_run
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    del ckpt["datamodule_hyper_parameters"]
    torch.save(ckpt, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="no preprocessing settings"):
        Predictor.from_checkpoint(tmp_path / "bare.ckpt")
