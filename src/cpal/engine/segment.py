"""The segmentation stage: a fully supervised network trained on the final pseudo masks,
and its predictions.

Training (`train_segmentation`, `cpal segment`): `segment.network` (DeepLab-v2 by default,
deeplab-pytorch's recipe) on OUT/labels/<labels.split>/ with 255 ignored, through the
shared trainer (`SegmentationTask`): exact resume, DDP, accumulation, precision. It reads
the pipeline's pseudo masks only, never a GT mask.

Predictions (`predict_splits`, `cpal segment-eval`): every split of `segment.splits` at
`segment.infer`'s scales (+ flip, + CRF), as palette PNGs under OUT/segmentation/<split>/
(resumable); scored where the split has GT masks, and written in the VOC evaluation
server's layout where it has none (VOC test).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cpal.config import Config
from cpal.data.datasets import InferenceDataset, LabelledDataset, SameSizeBatchSampler
from cpal.data.images import load_rgb
from cpal.data.source import dataset_scale, open_dataset
from cpal.data.voc import VOCLayout
from cpal.engine import distributed
from cpal.engine.hooks import HookBase
from cpal.engine.identity import (
    changed_keys,
    fingerprint_digest,
    load_finished_checkpoint,
    resume_point,
    stage_fingerprint,
)
from cpal.engine.label_dirs import LabelFolder, publish, require_folder
from cpal.engine.output_dir import claim_output_dir_everywhere
from cpal.engine.paths import RunPaths
from cpal.engine.runtime import autocast, check_precision, setup
from cpal.engine.trainer import fit
from cpal.engine.trunks import check_trunk, prepare_stage_training, trunk_record
from cpal.errors import CheckpointError, ConfigError
from cpal.evaluation.scoring import Provenance, evaluate_labels, no_masks_note
from cpal.log import Progress, get_logger
from cpal.models.fusion import inference_copy
from cpal.models.segmenter import SegmentationNet, build_segmenter, sgd_param_groups
from cpal.refine.crf import PRESETS, CRFParams, refine_probabilities
from cpal.refine.workers import map_images
from cpal.segmentation.inference import multi_scale_logits, predict_labels
from cpal.segmentation.losses import segmentation_loss

__all__ = ["SegmentationTask", "build_segmentation_net", "predict_splits", "train_segmentation"]

_log = get_logger(__name__)
# Keys of the segment section that shape training (the predictions' do not).
_TRAINING_KEYS = ("network", "arch", "width", "output_stride", "msc_scales", "frozen_bn",
                  "trunk", "pretrained", "train")
TEST_IMAGE_LABELS = "none at test time (the training labels' classes were gated by GT image labels)"


class SegmentationTask:
    """The segmentation network on pseudo masks: the ignore-aware cross entropy of every
    MSC output, weighted by the micro-batch's share of the global batch."""

    def __init__(self, net: SegmentationNet, dataset: LabelledDataset, batch_size: int,
                 channels_last: bool, device: torch.device) -> None:
        self.net, self.dataset, self.device = net, dataset, device
        self.batch_size, self.channels_last = batch_size, channels_last

    def loss(self, model: nn.Module, item: dict[str, Any], batch: Sequence[int]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        share = len(item["label"]) / self.batch_size
        images = item["image"].to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = item["label"].to(self.device, non_blocking=True)
        loss = segmentation_loss(model(images, return_all=True), labels) * share
        return loss, {"ce": loss.detach()}


def build_segmentation_net(config: Config, num_classes: int) -> SegmentationNet:
    seg = config.segment
    if seg.network is None:
        raise ConfigError("'segment.network': no segmentation network configured (null); "
                          "set segment.network=deeplab_v2 (or deeplab_v3plus)")
    net, _ = build_segmenter(seg.network, num_classes, arch=seg.arch, width=seg.width,
                             output_stride=seg.output_stride,
                             msc_scales=tuple(seg.msc_scales), frozen_bn=seg.frozen_bn)
    return net


def segmentation_fingerprint(config: Config, labels_record: dict[str, Any],
                             trunk: dict[str, Any]) -> dict[str, Any]:
    fields = {k: v for k, v in asdict(config.segment).items() if k in _TRAINING_KEYS}
    return stage_fingerprint(config, fields, labels=fingerprint_digest(labels_record),
                             trunk=trunk)


def _labels_record(config: Config, layout: VOCLayout) -> tuple[list[str], dict[str, Any]]:
    split = config.labels.split
    ids = layout.split_ids(split)
    return ids, require_folder(RunPaths(config.output_path).labels(split), ids,
                               "pseudo masks", "cpal labels")


def check_segmentation(config: Config) -> None:
    """What training will need, before any training (`cpal run`'s pre-flight)."""
    seg = config.segment
    check_trunk(config, seg.trunk, seg.pretrained, "segment", seg.arch, seg.width)


@distributed.collective
def train_segmentation(config: Config, *, progress: bool = True,
                       hooks: Sequence[HookBase] = ()) -> Path:
    """Train (or resume) the segmentation network on OUT/labels/<labels.split>/; returns
    the final checkpoint's marker. `hooks` run after the standard ones."""
    device = setup(config)
    claim_output_dir_everywhere(config)
    seg, t = config.segment, config.segment.train
    check_segmentation(config)
    check_precision(config, device, "segment.train.precision", t.precision)
    with distributed.main_first():
        layout = open_dataset(config.data)
    ids, record = _labels_record(config, layout)
    net = build_segmentation_net(config, layout.num_classes)
    stage = prepare_stage_training(
        config, layout, net, device, key="segment", trunk=seg.trunk, pretrained=seg.pretrained,
        allow_leak=seg.pretrained_allow_leak, schedule=t, ids=ids,
        label_dir=RunPaths(config.output_path).labels(config.labels.split))
    optimizer = torch.optim.SGD(sgd_param_groups(net, t.lr, t.weight_decay), lr=t.lr,
                                momentum=t.momentum)
    fingerprint = segmentation_fingerprint(config, record, stage.trunk)
    task = SegmentationTask(net, stage.dataset, t.batch_size, t.channels_last, device)
    return fit(task, optimizer, schedule=t, seed=config.seed,
               num_workers=config.data.num_workers, device=device,
               paths=RunPaths(RunPaths(config.output_path).segmentation),
               fingerprint=fingerprint, steps_per_epoch=stage.steps_per_epoch,
               meta={"class_names": list(layout.class_names), "image_scale": stage.image_scale},
               hooks=hooks, progress=progress)


# ---------------------------------------------------------------------------------------
# Predictions


@dataclass(frozen=True)
class CRFPrediction:
    """One image's test-time CRF, as a worker receives it."""

    image: Path
    probabilities: np.ndarray
    params: CRFParams


def crf_prediction(job: CRFPrediction) -> np.ndarray:
    label = refine_probabilities(load_rgb(job.image), job.probabilities, job.params)
    return label.astype(np.uint8)


def load_segmentation_net(config: Config, layout: VOCLayout, device: torch.device
                          ) -> tuple[nn.Module, Path, dict[str, Any], dict[str, Any]]:
    """The finished segmentation network of this config as an inference copy, its
    checkpoint, the record of its training labels and its fingerprint."""
    seg = config.segment
    _, record = _labels_record(config, layout)
    fingerprint = segmentation_fingerprint(config, record,
                                           trunk_record(config, seg.trunk, seg.pretrained))
    path, ckpt = load_finished_checkpoint(
        RunPaths(config.output_path).segmentation / "checkpoints", fingerprint, "cpal segment")
    net = build_segmentation_net(config, layout.num_classes)
    net.load_state_dict(ckpt.model)
    net = inference_copy(net.to(device), channels_last=seg.infer.channels_last)
    return net, path, record, fingerprint


def trained_segmentation_net(config: Config, device: torch.device
                             ) -> tuple[nn.Module, Path, list[str], float] | None:
    """The newest finished segmentation network under OUT/segmentation/ (None when none
    was trained) and its class names, for images outside the dataset (`cpal predict`):
    its architecture and schedule must be this config's (its training labels are not
    compared, so the dataset need not be at hand)."""
    directory = RunPaths(config.output_path).segmentation / "checkpoints"
    latest, damaged = resume_point(directory)
    if latest is None and not damaged:
        return None
    fields = {k: v for k, v in asdict(config.segment).items() if k in _TRAINING_KEYS}
    expected = stage_fingerprint(config, fields)["section"]
    path, ckpt = load_finished_checkpoint(directory, None, "cpal segment", (latest, damaged))
    stored = ckpt.meta.get("fingerprint", {}).get("section", {})
    if stored != expected:
        raise CheckpointError(f"{path}: made with other settings "
                              f"({', '.join(changed_keys(stored, expected))}); predict with the "
                              "config it was trained with")
    net = build_segmentation_net(config, len(ckpt.meta["class_names"]))
    net.load_state_dict(ckpt.model)
    net = inference_copy(net.to(device), channels_last=config.segment.infer.channels_last)
    return net, path, list(ckpt.meta["class_names"]), float(ckpt.meta.get("image_scale", 1.0))


def segment_images(net: nn.Module, images: torch.Tensor, config: Config,
                   image_scale: float = 1.0) -> torch.Tensor:
    """(B, K, H, W) float32 logits at `segment.infer`'s scales (times the dataset's
    `image_scale`, as the network was trained) and flip."""
    inf = config.segment.infer
    if inf.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    scales = [s * image_scale for s in inf.scales]
    with autocast(images.device, config.segment.train.precision):
        return multi_scale_logits(net, images, scales=scales, flip=inf.flip)


def inference_text(config: Config, image_scale: float = 1.0) -> str:
    inf = config.segment.infer
    text = "scales " + ",".join(f"{s * image_scale:.3g}" for s in inf.scales)
    text += " + flip" if inf.flip else ""
    return text + (f", CRF {inf.crf}" if inf.crf else "")


def predict_splits(config: Config, *, progress: bool = True) -> dict[str, Any]:
    """Predict every split of `segment.splits` (skipping finished images) and score the
    ones with GT masks; returns metrics.json's `segmentation` entry."""
    device = setup(config)
    seg = config.segment
    layout = open_dataset(config.data)
    net, checkpoint, labels_record, fingerprint = load_segmentation_net(config, layout, device)
    labels = Provenance.from_dict(labels_record["provenance"])
    source = (f"segmentation:{seg.network} {seg.arch} x{seg.width:g} (trunk {seg.trunk}) "
              f"trained on {labels.source}")
    scale = dataset_scale(config.data, layout)
    provenance = Provenance(source, inference_text(config, scale), labels.threshold,
                            labels.refinement)
    paths = RunPaths(config.output_path)
    result: dict[str, Any] = {"checkpoint": checkpoint.name, "splits": {}}
    for split in seg.splits:
        ids = layout.split_ids(split)
        folder = LabelFolder(paths.predictions(split), {
            "kind": "segmentation", "checkpoint": checkpoint.name,
            "network": fingerprint_digest(fingerprint), "infer": asdict(seg.infer),
            "image_scale": scale, "provenance": provenance.to_dict()})
        folder.claim()
        _predict(net, layout, folder, folder.pending(ids), config, device, progress, split,
                 scale)
        entry: dict[str, Any] = {"dir": str(folder.directory), "num_images": len(ids)}
        if layout.has_masks(ids):
            scored = evaluate_labels(layout, split, ids, folder.directory, provenance,
                                     image_labels=TEST_IMAGE_LABELS).to_dict()
            entry.update(scored)
            if "miou" not in result:
                result.update({k: v for k, v in scored.items() if k != "dir"})
                result["split"] = split
        else:
            server = publish(folder, paths.server_results(split), ids)
            entry.update(skipped=no_masks_note(layout, ids), server=str(server.directory))
            _log.info("segment %s: no GT masks; VOC server layout in %s (tar the results/ "
                      "folder to submit)", split, paths.segmentation / "results")
        result["splits"][split] = entry
    return result


def _predict(net: nn.Module, layout: VOCLayout, folder: LabelFolder, ids: Sequence[str],
             config: Config, device: torch.device, progress: bool, split: str,
             scale: float) -> None:
    if not ids:
        return
    inf = config.segment.infer
    dataset = InferenceDataset(layout, ids, labels=False)
    loader = DataLoader(dataset, batch_sampler=SameSizeBatchSampler(dataset.sizes(),
                                                                    inf.batch_size),
                        num_workers=config.data.num_workers)
    bar = Progress(len(ids), f"segment {split}", enabled=progress)
    params = None if inf.crf is None else PRESETS[inf.crf]
    for batch in loader:
        logits = segment_images(net, batch["image"].to(device), config, scale)
        if params is None:
            labels = list(predict_labels(logits).cpu().numpy())
        else:
            probs = torch.softmax(logits, dim=1).cpu().numpy()
            jobs = [CRFPrediction(layout.image_path(i), p, params)
                    for i, p in zip(batch["id"], probs, strict=True)]
            labels = list(map_images(crf_prediction, jobs, workers=config.refine.workers,
                                     threads=config.refine.threads))
        for image_id, label in zip(batch["id"], labels, strict=True):
            folder.write(image_id, label)
        bar.update(len(labels))
    bar.close()
