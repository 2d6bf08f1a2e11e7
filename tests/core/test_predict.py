"""`cpal predict` and `cpal.predict.Predictor` on new images: the segmentation network
when the run has one, else the CAM network with the image labels it predicts; outputs
per image, resumable; unreadable files named in one line each, exit status 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpal.cli import main
from cpal.config import load_config
from cpal.data.images import load_rgb
from cpal.pipeline import stage_infer, stage_labels, stage_segment, stage_train
from cpal.predict import Predictor
from tests.helpers import chain_overrides, tiny_overrides


@pytest.fixture(scope="module")
def trained(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides of a run with a CAM network, pseudo masks and a segmentation network."""
    out = tmp_path_factory.mktemp("predict") / "run"
    overrides = [*tiny_overrides(tiny_dataset, out), *chain_overrides("none")]
    cfg = load_config(None, overrides)
    stage_train(cfg, progress=False)
    stage_infer(cfg, progress=False)
    stage_labels(cfg, progress=False)
    stage_segment(cfg, progress=False)
    return overrides


@pytest.fixture
def images(tiny_dataset: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "new"
    folder.mkdir()
    for name in ("val_00001", "val_00002", "val_00003"):
        shutil.copy(tiny_dataset / "JPEGImages" / f"{name}.png", folder / f"{name}.png")
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / ".hidden").write_text("ignored\n")
    return folder


def _predict(capsys, trained, images: Path, out: Path, *extra: str) -> tuple[int, dict, str]:
    config = images.parent / "c.yaml"
    config.write_text("{}\n")
    code = main(["predict", str(config), *trained, *extra, "--no-progress",
                 "--images", str(images), "--out", str(out)])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_folder_with_bad_files(trained, images, tmp_path, capsys):
    out = tmp_path / "out"
    code, result, err = _predict(capsys, trained, images, out)
    assert code == 2 and result["written"] == 3 and result["kept"] == 0
    assert result["network"].startswith("segmentation network (")
    errors = [line for line in err.splitlines() if line.startswith("cpal: error: ")]
    assert len(errors) == 2 and "Traceback" not in err
    assert any(str(images / "notes.txt") in line for line in errors)
    assert any(str(images / "broken.jpg") in line for line in errors)
    for stem in ("val_00001", "val_00002", "val_00003"):
        assert (out / f"{stem}.png").is_file() and (out / f"{stem}_overlay.png").is_file()
        assert json.loads((out / f"{stem}.json").read_text())["source"] == "segmentation"
    # Resumable: finished images are kept, a damaged output is redone.
    damaged = out / "val_00002_overlay.png"
    damaged.write_bytes(damaged.read_bytes()[:50])
    code, result, _ = _predict(capsys, trained, images, out)
    assert (code, result["written"], result["kept"]) == (2, 1, 2)
    for bad in ("notes.txt", "broken.jpg"):
        (images / bad).unlink()
    code, result, err = _predict(capsys, trained, images, out)
    assert (code, result["written"], result["kept"]) == (0, 0, 3) and "error" not in err


def test_cam_network_says_which_classes(trained, images, tmp_path, capsys):
    out = tmp_path / "out"
    _, result, _ = _predict(capsys, trained, images, out, "predict.source=cam")
    assert "classes with sigmoid score > 0.5" in result["network"]
    record = json.loads((out / "val_00001.json").read_text())
    assert record["source"] == "cam"
    predicted = sorted(name for name, p in record["scores"].items() if p > 0.5)
    labels = np.asarray(Image.open(out / "val_00001.png"))
    # Every class in the label map is a predicted one.
    assert set(record["classes"]) <= set(predicted)
    assert labels.shape == (64, 64)


def test_python_call_on_one_array(trained, tiny_dataset):
    cfg = load_config(None, [*trained, "predict.max_long_side=32"])
    image = load_rgb(tiny_dataset / "JPEGImages" / "val_00004.png")
    for source in ("segmentation", "cam"):
        predictor = Predictor(cfg, source=source)
        labels = predictor.predict(image)
        assert labels.shape == image.shape[:2] and labels.dtype == np.uint8
        assert labels.max() < len(predictor.class_names)
    with pytest.raises(ValueError, match="uint8 RGB"):
        predictor.predict(image.astype(np.float32))
