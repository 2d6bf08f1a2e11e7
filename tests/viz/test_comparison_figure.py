"""cam_vs_pacam_<split>.png: the context column (training images behind the selected
context prototypes), from a trained tiny run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import cpal.viz.comparison as comparison
from cpal.config import load_config
from cpal.data.source import open_dataset
from cpal.data.transforms import normalize
from cpal.engine.identity import load_final_checkpoint
from cpal.engine.infer import load_trained_model
from cpal.pipeline import stage_train
from cpal.viz.figures import OverlayRow
from tests.helpers import tiny_overrides

# empty_region=cam: a tiny net's seeds can miss a class, and an unseeded class gets no
# context; the CAM fallback gives every present class a prototype to select context for.
PROTO = ["bank.size=16", "bank.clusters=3", "bank.recluster_every=2",
         "awareness.top_k=2", "prototype.empty_region=cam"]


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "run"
    cfg = load_config(None, [*tiny_overrides(tiny_dataset, out), *PROTO, "method=cpal"])
    stage_train(cfg, progress=False)
    layout = open_dataset(cfg.data)
    rows = []
    for image_id in layout.split_ids("train")[:2]:
        gt = layout.load_mask(image_id)
        rows.append(OverlayRow(image_id=image_id, image=layout.load_image(image_id), gt=gt,
                               heat=np.zeros(gt.shape), pseudo=np.where(gt == 255, 0, gt)))
    return cfg, layout, rows


def _with_sources(monkeypatch, n_train: int) -> None:
    """Stand-in for training with sample ids: entry (c, slot) came from image c + slot."""
    real = load_trained_model

    def load(*args, **kwargs):
        model = real(*args, **kwargs)
        bank = model.cpal.bank
        k, size = bank.sources.shape
        bank.sources.copy_((torch.arange(k)[:, None] + torch.arange(size)[None]) % n_train)
        return model

    monkeypatch.setattr(comparison, "load_trained_model", load)


def test_comparison_figure_has_context_column(trained, monkeypatch, tmp_path) -> None:
    cfg, layout, rows = trained
    train_ids = layout.split_ids("train")
    _with_sources(monkeypatch, len(train_ids))
    target = tmp_path / "cam_vs_pacam_train.png"
    comparison.comparison_figure(cfg, layout, rows, target)
    with Image.open(target) as image:
        image.load()
        # image | GT | CAM | PACAM | pseudo label | context: six 3-inch columns at 100 dpi
        assert image.width == 6 * 300

    model = load_trained_model(
        load_final_checkpoint(cfg)[1], cfg, layout.num_foreground, torch.device("cpu")
    )
    row = rows[0]
    image = normalize(row.image)[None]
    labels = torch.from_numpy(layout.image_labels([row.image_id]))
    present = torch.nonzero(labels[0] > 0.5).flatten()
    panel = comparison.context_panel(model, layout, train_ids, image, labels, row, present)
    areas = {int(c) + 1: int((row.pseudo == int(c) + 1).sum()) for c in present}
    assert panel.label == layout.class_names[max(areas, key=areas.get)]
    assert 1 <= len(panel.thumbnails) <= 2  # top_k = 2
    weights = [float(caption.split()[1]) for caption, _ in panel.thumbnails]
    assert abs(sum(weights) - 1.0) < 0.02
    for caption, thumb in panel.thumbnails:
        image_id = caption.split("\n")[1]
        assert image_id in train_ids
        assert thumb is not None and thumb.shape == layout.load_image(image_id).shape


def test_context_without_sources_is_marked_unknown(trained) -> None:
    cfg, layout, rows = trained
    model = load_trained_model(
        load_final_checkpoint(cfg)[1], cfg, layout.num_foreground, torch.device("cpu")
    )
    model.cpal.bank.sources.fill_(-1)
    row = rows[0]
    labels = torch.from_numpy(layout.image_labels([row.image_id]))
    present = torch.nonzero(labels[0] > 0.5).flatten()
    panel = comparison.context_panel(model, layout, layout.split_ids("train"),
                                    normalize(row.image)[None], labels, row, present)
    assert panel.thumbnails and all(
        thumb is None and caption.endswith("source unknown") for caption, thumb in panel.thumbnails
    )
