"""A run's trained network on new images (no labels, no masks): `cpal predict` and the
Python call.

The segmentation network when the run trained one (`predict.source: auto`), else the CAM
network with the image labels it predicts itself (classes whose sigmoid score exceeds
`predict.score_threshold`), its maps turned into labels by the run's background threshold.

    from cpal.config import load_config
    from cpal.predict import Predictor

    predictor = Predictor(load_config("configs/demo.yaml"))
    labels = predictor.predict(image)          # (H, W) uint8 class indices of an RGB array

`predict_folder` writes, per image of a folder, a palette PNG, an overlay picture and a
JSON of the classes found; it skips images already done (redoing damaged outputs) and
names every file it cannot read in one line, going on with the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from cpal.config import Config
from cpal.data.images import load_rgb
from cpal.data.transforms import normalize
from cpal.engine.identity import load_final_checkpoint
from cpal.engine.infer import (
    PrototypeInference,
    inference_scales,
    load_trained_model,
    localisation_maps,
)
from cpal.engine.paths import RunPaths
from cpal.engine.runtime import setup
from cpal.engine.segment import segment_images, trained_segmentation_net
from cpal.errors import CheckpointError, DatasetError
from cpal.evaluation.metrics import labels_from_maps
from cpal.io import (
    IGNORE_INDEX,
    MapRecord,
    atomic_path,
    png_complete,
    read_json,
    save_label_png,
    voc_palette,
    write_json_atomic,
)
from cpal.log import Progress, get_logger
from cpal.models.fusion import inference_copy
from cpal.refine.crf import PRESETS, refine_probabilities
from cpal.segmentation.inference import predict_labels

__all__ = ["FolderResult", "Prediction", "Predictor", "overlay", "predict_folder"]

_log = get_logger(__name__)
_OVERLAY = "_overlay.png"


@dataclass
class Prediction:
    """One image's prediction: labels (H, W) uint8 (dataset class indices), the classes
    found and, for the CAM network, the sigmoid score of every class."""

    labels: np.ndarray
    classes: list[str]
    source: str
    scores: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "classes": self.classes}
        if self.scores:
            out["scores"] = {k: round(v, 4) for k, v in self.scores.items()}
        return out


class Predictor:
    """The trained network of the run `config` describes (its output_dir), on any RGB image.

    `source` ("auto", "segmentation", "cam"; default `predict.source`) picks the network;
    auto takes the segmentation network when the run has a finished one."""

    def __init__(self, config: Config, source: str | None = None) -> None:
        self.config = config
        self.device = setup(config)
        source = source or config.predict.source
        found = None
        if source != "cam" and config.segment.network is not None:
            found = trained_segmentation_net(config, self.device)
        if source == "segmentation" and found is None:
            raise CheckpointError(
                f"{RunPaths(config.output_path).segmentation}: no trained segmentation network;"
                " run `cpal segment` (or predict.source=cam)")
        if found is not None:
            self.net, self.checkpoint, self.class_names, self.image_scale = found
            self.source = "segmentation"
            return
        self.source = "cam"
        self.checkpoint, ckpt = load_final_checkpoint(config)
        self.class_names = list(ckpt.meta["class_names"])
        model = load_trained_model(ckpt, config, len(self.class_names) - 1, self.device)
        self.net = inference_copy(model, channels_last=config.infer.channels_last)
        self.scales = inference_scales(config, float(ckpt.meta.get("image_scale", 1.0)))
        self.threshold = self._threshold()

    def _threshold(self) -> float:
        """labels.threshold, else the one the run's labels stage chose (its record)."""
        if self.config.labels.threshold is not None:
            return self.config.labels.threshold
        metrics = RunPaths(self.config.output_path).metrics
        value = read_json(metrics).get("threshold", {}).get("value") if metrics.is_file() else None
        if value is None:
            raise CheckpointError(
                f"{metrics}: no background threshold recorded; run `cpal labels` or set "
                "labels.threshold")
        return float(value)

    def describe(self) -> str:
        if self.source == "segmentation":
            return f"segmentation network ({self.checkpoint.name})"
        return (f"CAM network ({self.checkpoint.name}), classes with sigmoid score > "
                f"{self.config.predict.score_threshold:g}, background threshold "
                f"{self.threshold:g}")

    def predict(self, image: np.ndarray) -> np.ndarray:
        """(H, W) uint8 class indices of an RGB uint8 (H, W, 3) image."""
        return self.predict_details(image).labels

    @torch.inference_mode()
    def predict_details(self, image: np.ndarray) -> Prediction:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be uint8 RGB (H, W, 3), got {image.dtype} "
                             f"{image.shape}")
        height, width = image.shape[:2]
        work = _shrunk(image, self.config.predict.max_long_side)
        x = normalize(work)[None].to(self.device)
        scores: dict[str, float] = {}
        if self.source == "segmentation":
            labels = self._segment(work, x)
        else:
            labels, scores = self._cam(x)
        if labels.shape != (height, width):
            labels = np.asarray(Image.fromarray(labels).resize((width, height), Image.NEAREST))
        present = sorted(int(c) for c in np.unique(labels) if 0 < c < len(self.class_names))
        return Prediction(labels, [self.class_names[c] for c in present], self.source, scores)

    def _segment(self, image: np.ndarray, x: torch.Tensor) -> np.ndarray:
        logits = segment_images(self.net, x, self.config, self.image_scale)
        crf = self.config.segment.infer.crf
        if crf is None:
            return predict_labels(logits)[0].cpu().numpy().astype(np.uint8)
        probs = torch.softmax(logits[0], dim=0).cpu().numpy()
        return refine_probabilities(image, probs, PRESETS[crf]).astype(np.uint8)

    def _cam(self, x: torch.Tensor) -> tuple[np.ndarray, dict[str, float]]:
        c = self.config
        if c.infer.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        probs = torch.sigmoid(self.net(x).logits.float())[0]
        names = self.class_names[1:]
        scores = {name: float(p) for name, p in zip(names, probs.tolist(), strict=True)}
        labels = (probs > c.predict.score_threshold).float()[None]
        present = torch.nonzero(labels[0]).flatten()
        if not len(present):
            return np.zeros(x.shape[-2:], dtype=np.uint8), scores
        loc = localisation_maps(self.net, x, labels, self.scales, c.infer.flip, c.map_kind,
                                PrototypeInference.of(c), present_only=True)
        record = MapRecord(classes=(present + 1).cpu().numpy(),
                           maps=loc.maps[0, present].float().cpu().numpy())
        return labels_from_maps(record, self.threshold), scores


def _shrunk(image: np.ndarray, max_long_side: int | None) -> np.ndarray:
    height, width = image.shape[:2]
    if max_long_side is None or max(height, width) <= max_long_side:
        return image
    scale = max_long_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def overlay(image: np.ndarray, labels: np.ndarray, class_names: list[str], alpha: float
            ) -> Image.Image:
    """The image with each class's VOC colour blended in (background and ignore left as
    they are) and a legend strip naming the classes found."""
    palette = voc_palette()
    coloured = palette[labels].astype(np.float32)
    mask = ((labels > 0) & (labels != IGNORE_INDEX))[..., None]
    blend = np.where(mask, (1 - alpha) * image + alpha * coloured, image)
    picture = Image.fromarray(np.clip(blend, 0, 255).astype(np.uint8))
    present = [int(c) for c in np.unique(labels) if 0 < c < len(class_names)]
    if not present:
        return picture
    strip = Image.new("RGB", (picture.width, 16 * len(present) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for row, c in enumerate(present):
        y = 2 + 16 * row
        draw.rectangle([4, y + 2, 16, y + 13], fill=tuple(int(v) for v in palette[c]))
        draw.text((22, y + 1), class_names[c], fill=(0, 0, 0))
    out = Image.new("RGB", (picture.width, picture.height + strip.height), (255, 255, 255))
    out.paste(picture, (0, 0))
    out.paste(strip, (0, picture.height))
    return out


@dataclass
class FolderResult:
    """What `predict_folder` did: images predicted now, kept from an earlier call, and
    the files it could not read (one reason each)."""

    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    network: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"network": self.network, "written": len(self.written), "kept": len(self.kept),
                "failed": self.failed}


def _done(out_dir: Path, stem: str) -> bool:
    return (png_complete(out_dir / f"{stem}.png") and png_complete(out_dir / f"{stem}{_OVERLAY}")
            and (out_dir / f"{stem}.json").is_file())


def predict_folder(config: Config, images: Path, out_dir: Path, *, progress: bool = True
                   ) -> FolderResult:
    """Predict every file of `images` (not recursing; hidden files ignored) into `out_dir`:
    <stem>.png (palette labels), <stem>_overlay.png, <stem>.json (classes). A file that is
    not a readable image is reported in one line and left out."""
    images, out_dir = Path(images), Path(out_dir)
    if not images.is_dir():
        raise DatasetError(f"{images}: not a folder of images")
    if out_dir.resolve() == images.resolve():
        raise DatasetError(f"{out_dir}: the output folder must not be the image folder")
    files = sorted(p for p in images.iterdir() if p.is_file() and not p.name.startswith("."))
    result = FolderResult()
    stems: dict[str, Path] = {}
    todo = []
    for path in files:
        if path.stem in stems:
            result.failed[str(path)] = f"same name as {stems[path.stem].name}; rename one"
            continue
        stems[path.stem] = path
        if _done(out_dir, path.stem):
            result.kept.append(path.name)
        else:
            todo.append(path)
    predictor = Predictor(config) if todo else None
    result.network = predictor.describe() if predictor else "(nothing to predict)"
    if predictor is not None:
        _log.info("predict: %d images with the %s", len(todo), result.network)
    bar = Progress(len(todo), "predict", enabled=progress)
    for path in todo:
        try:
            image = load_rgb(path)
        except DatasetError as exc:
            result.failed[str(path)] = str(exc)
            bar.update()
            continue
        assert predictor is not None
        prediction = predictor.predict_details(image)
        save_label_png(out_dir / f"{path.stem}.png", prediction.labels)
        picture = overlay(image, prediction.labels, predictor.class_names,
                          config.predict.overlay_alpha)
        with atomic_path(out_dir / f"{path.stem}{_OVERLAY}") as tmp:
            picture.save(tmp, format="PNG")
        write_json_atomic(out_dir / f"{path.stem}.json",
                          {"image": path.name, **prediction.to_dict()})
        result.written.append(path.name)
        bar.update()
    bar.close()
    for name, reason in result.failed.items():
        _log.error("%s", reason if name in reason else f"{name}: {reason}")
    return result
