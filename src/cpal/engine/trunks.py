"""Where the trunk of a later network (IRN's, the segmentation network's) starts from.

`pretrained`: an ImageNet ResNet file, through the shared weights loader (key checks,
pixel-label leak warnings). `cam`: the trunk of this run's finished CAM network, which was
trained on image labels only, so a chain started from it is still weakly supervised: the
start for data without an ImageNet-like domain (the built-in demo). `scratch`: none.
The returned record goes into the network's training fingerprint, so that a checkpoint
is never resumed on top of another start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cpal.config import Config, StageTrainConfig
from cpal.data.datasets import LabelledDataset
from cpal.data.source import dataset_scale
from cpal.data.transforms import PairTransform, scaled_range
from cpal.data.voc import VOCLayout
from cpal.engine.identity import fingerprint_digest, load_final_checkpoint, resume_point
from cpal.engine.paths import RunPaths
from cpal.errors import CheckpointError, ConfigError
from cpal.io import read_json
from cpal.log import get_logger

_log = get_logger(__name__)


def check_trunk(config: Config, source: str, pretrained: str | None, key: str,
                arch: str, width: float) -> None:
    """Raise ConfigError when a trunk source cannot work for a network of `arch` x `width`."""
    if source == "pretrained" and pretrained is None:
        raise ConfigError(
            f"'{key}.pretrained': the {key} trunk starts from ImageNet weights ({key}.trunk: "
            f"pretrained) but no file is given; pass {key}.pretrained=/path/resnet.pth, or "
            f"{key}.trunk=cam to start from this run's CAM network")
    if source == "cam" and (arch, width) != (config.model.arch, config.model.width):
        raise ConfigError(
            f"'{key}.trunk': cam starts from the CAM network's trunk ({config.model.arch} x"
            f"{config.model.width:g}), not {arch} x{width:g}; set {key}.arch and width to "
            "match, or use pretrained weights")


def trunk_record(config: Config, source: str, pretrained: str | None) -> dict[str, Any]:
    """What a trunk starts from, without loading it (for the fingerprint of a network
    whose checkpoint is read back): the file's name, or the CAM checkpoint's name and
    training fingerprint (from its marker alone)."""
    if source == "scratch":
        return {"trunk": "scratch"}
    if source == "pretrained":
        name = None if pretrained is None else Path(pretrained).name
        return {"trunk": "pretrained", "file": name}
    latest, _ = resume_point(RunPaths(config.output_path).checkpoints)
    if latest is None:
        raise CheckpointError(f"{RunPaths(config.output_path).checkpoints}: no checkpoint of the "
                              "CAM network, whose trunk starts this network; run `cpal train`")
    meta = read_json(latest).get("meta", {})
    return {"trunk": "cam", "checkpoint": latest.name,
            "training_fingerprint": fingerprint_digest(meta.get("fingerprint"))}


def init_trunk(trunk: nn.Module, config: Config, source: str, pretrained: str | None,
               allow_leak: bool, key: str) -> dict[str, Any]:
    """Initialise `trunk` from `source`; returns `trunk_record` of that start."""
    if source == "scratch":
        return trunk_record(config, source, pretrained)
    if source == "pretrained":
        if pretrained is None:
            raise ConfigError(f"'{key}.pretrained': no ImageNet file given")
        from cpal.models.weights import load_backbone_weights

        report = load_backbone_weights(trunk, pretrained, allow_leak=allow_leak)
        _log.info("%s trunk: %s", key, report.summary())
        return trunk_record(config, source, pretrained)
    path, ckpt = load_final_checkpoint(config)
    prefix = "backbone."
    state = {k[len(prefix):]: v for k, v in ckpt.model.items() if k.startswith(prefix)}
    try:
        trunk.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: its trunk does not fit the {key} network "
                              f"({' '.join(str(exc).split())[:200]})") from exc
    _log.info("%s trunk: the CAM network's (%s)", key, path.name)
    return trunk_record(config, source, pretrained)


@dataclass(frozen=True)
class StageTraining:
    """What a network trained after the CAM network starts from: its trunk's record (for
    the fingerprint), its training samples and the steps of one epoch over them."""

    trunk: dict[str, Any]
    dataset: LabelledDataset
    steps_per_epoch: int
    image_scale: float


def prepare_stage_training(
    config: Config, layout: VOCLayout, net: nn.Module, device: torch.device, *, key: str,
    trunk: str, pretrained: str | None, allow_leak: bool, schedule: StageTrainConfig,
    ids: Sequence[str], label_dir: Path, dataset_type: type[LabelledDataset] = LabelledDataset,
) -> StageTraining:
    """The set-up IRN, AMN and the segmentation network share: the trunk initialised,
    the network on `device` (NHWC when asked), the labelled images of `label_dir` with
    the stage's crop, flip and scale range (times the dataset's scale), checked up front."""
    record = init_trunk(net.backbone, config, trunk, pretrained, allow_leak, key)
    net.to(device)
    if schedule.channels_last:
        net.to(memory_format=torch.channels_last)
    scale = dataset_scale(config.data, layout)
    transform = PairTransform(schedule.crop_size, scaled_range(schedule.scale_range, scale),
                              schedule.hflip)
    dataset = dataset_type(layout, ids, label_dir, transform, config.seed)
    dataset.check()
    steps = len(dataset) // schedule.batch_size
    if steps == 0:
        raise ConfigError(f"'{key}.train.batch_size': {schedule.batch_size} exceeds the "
                          f"{len(dataset)} images of split '{config.labels.split}'")
    return StageTraining(record, dataset, steps, scale)
