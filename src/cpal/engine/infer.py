"""Multi-scale + flip class activation maps, one `.npz` per image, sharded and resumable.

Each forward pass takes a batch of same-size images together with their flips; maps of
every scale are upsampled to the image grid, summed, and each class divided by its
maximum (IRN's recipe). Images whose map file exists are skipped, and each file is
written atomically, so an interrupted run resumes without truncated outputs.

Sharding: shard I of N takes every N-th image of a split (`infer.shard` or
`cpal infer --shard I/N`), whatever the number of processes running it; under torchrun
rank 0 lists the shard's missing maps and deals them out to the processes, so they finish
together even when an earlier run left one process's part done. Every image is written by
exactly one process, and shards claim the folder's identity record race-free, so
independent jobs (a SLURM array) can fill one folder.
"""

from __future__ import annotations

import contextlib
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from cpal.config import Config
from cpal.data.datasets import InferenceDataset, SameSizeBatchSampler
from cpal.data.source import dataset_scale, open_dataset
from cpal.data.transforms import rescaled
from cpal.data.voc import VOCLayout
from cpal.engine import distributed
from cpal.engine.checkpoint import Checkpoint
from cpal.engine.identity import (
    MAPS_FORMAT,
    MAPS_META,
    changed_keys,
    fingerprint_digest,
    load_final_checkpoint,
    read_maps_identity,
    resume_point,
)
from cpal.engine.output_dir import claim_output_dir_everywhere
from cpal.engine.paths import RunPaths
from cpal.engine.runtime import autocast, check_precision, setup
from cpal.errors import ConfigError, warn
from cpal.io import (
    IGNORE_INDEX,
    MapRecord,
    map_file_problem,
    save_maps,
    write_json_atomic,
)
from cpal.log import Progress, get_logger
from cpal.methods import CAM_MAP, FUSED_MAP, PACAM_MAP, method_spec
from cpal.models.cam_net import (
    CAMOutput,
    LocalisationNet,
    build_network,
    network_spec,
    normalized_cam,
)
from cpal.models.fusion import inference_copy
from cpal.prototypes.module import CPALOutput
from cpal.prototypes.pooling import min_max_normalised

_NAMED = 10  # damaged files named one per line; the rest are counted
_log = get_logger(__name__)


def describe_inference(scales: Sequence[float], flip: bool) -> str:
    return "scales " + ",".join(str(float(x)) for x in scales) + (" + flip" if flip else "")


def inference_precision(config: Config) -> str:
    """`infer.precision`, or the training precision when it is null."""
    return config.infer.precision or config.train.precision


def inference_scales(config: Config, factor: float = 1.0) -> list[float]:
    """`infer.scales` times the dataset's upscaling factor that training recorded
    (`data.min_long_side`; 1 when none), so maps see images as training did."""
    return [round(float(s) * factor, 6) for s in config.infer.scales]


@dataclass(frozen=True)
class MapSource:
    """What a network's weights come from: a run's final checkpoint, or, for a method
    that does not train (CLIP-ES), its pretrained file and the settings it runs with."""

    record: dict[str, Any]
    """What the maps folder records of it (and compares before any reuse)."""
    image_scale: float = 1.0
    """The dataset's upscaling factor (`data.min_long_side`) maps are made at."""

    @classmethod
    def of_checkpoint(cls, path: Path, ckpt: Checkpoint) -> MapSource:
        return cls({"checkpoint": path.name,
                    "training_fingerprint": fingerprint_digest(ckpt.meta.get("fingerprint"))},
                   float(ckpt.meta.get("image_scale", 1.0)))

    @classmethod
    def of_weights(cls, config: Config, image_scale: float) -> MapSource:
        pretrained = config.model.pretrained
        settings = {"seed": config.seed, "model": asdict(config.model),
                    **{s: asdict(getattr(config, s)) for s in ("vit", "clip_es")}}
        return cls({"weights": Path(pretrained).name if pretrained else "random initialisation",
                    "settings_fingerprint": fingerprint_digest(settings)}, image_scale)


def maps_identity(config: Config, source: MapSource) -> dict[str, Any]:
    """What made a folder of maps: stored beside them, compared before any reuse, and
    the source of the inference text in every protocol computed from them. The same for
    every shard and process of one configuration."""
    precision = inference_precision(config)
    scales = inference_scales(config, source.image_scale)
    identity = {
        "format": MAPS_FORMAT,
        **source.record,
        "method": config.method,
        "map": config.map_kind,
        "scales": scales,
        "flip": config.infer.flip,
        "inference": describe_inference(scales, config.infer.flip),
        "precision": precision,
    }
    sections = network_spec(config).map_sections
    if sections:
        identity["map_settings"] = {s: asdict(getattr(config, s)) for s in sections}
    if config.map_kind != CAM_MAP:
        proto = PrototypeInference.of(config)
        identity["prototype_inference"] = {
            "maps": proto.maps, "flip_fusion": proto.flip_fusion,
            "seed_features": proto.seed_features,
        }
    if precision != "fp32":  # protocols name a reduced precision, fp32 goes without saying
        identity["inference"] += f", {precision}"
    return identity


def load_trained_model(ckpt: Checkpoint, config: Config, num_classes: int,
                       device: torch.device) -> LocalisationNet:
    # Weights (and the support bank) come from the checkpoint, not the ImageNet file; a
    # frozen trunk is not in checkpoints and comes from its file again.
    names = ckpt.meta.get("class_names")
    model, _ = build_network(config, num_classes, pretrained=network_spec(config).frozen_trunk,
                             class_names=names[1:] if names else None)
    model.load_state_dict(ckpt.model)
    model.to(device)
    if config.train.channels_last:
        model.to(memory_format=torch.channels_last)
    return model.eval()


@dataclass(frozen=True)
class PrototypeInference:
    """How prototype maps are made at inference (`infer.prototype_maps`,
    `infer.flip_fusion`, `prototype.infer_seed_features`); defaults are SIPE's."""

    maps: str = "sipe"
    flip_fusion: str = "embedding"
    seed_features: str = "hierarchical"

    @classmethod
    def of(cls, config: Config) -> PrototypeInference:
        return cls(config.infer.prototype_maps, config.infer.flip_fusion,
                   config.prototype.infer_seed_features)


def _flip_sum(x: Tensor, batch: int) -> Tensor:
    """An image's map plus its flip's map flipped back (SIPE's fusion of the two)."""
    return x[:batch] + x[batch:].flip(-1)


def _prototype_scale(
    model: LocalisationNet, out: CAMOutput, x: Tensor, labels: Tensor, flip: bool,
    proto: PrototypeInference,
) -> CPALOutput:
    """The prototype branch on one scale's forward of [image, flip] (or the image alone)."""
    assert model.cpal is not None
    batch = labels.shape[0]
    features, cam, image = out.features, out.cam, x
    if flip and proto.flip_fusion == "backbone":
        # The earlier choice: average backbone features and CAMs, then embed once.
        features = [(f[:batch] + f[batch:].flip(-1)) / 2 for f in features]
        cam = (cam[:batch] + cam[batch:].flip(-1)) / 2
        z = model.cpal.embed(features)
        last = features[-1]
    elif flip:
        z = _flip_sum(model.cpal.embed(features), batch)
        cam, last, image = _flip_sum(cam, batch), _flip_sum(features[-1], batch), 2 * x
    else:
        z, last = model.cpal.embed(features), features[-1]
    seed_features = z if proto.seed_features == "hierarchical" else last
    return model.cpal.prototype_maps(z, cam, labels, seed_features, image=image, last=last)


@torch.inference_mode()
def multiscale_maps(
    model: LocalisationNet, images: Tensor, scales: Sequence[float], flip: bool,
    labels: Tensor | None = None, kinds: Sequence[str] = (CAM_MAP,),
    proto: PrototypeInference = PrototypeInference(), present_only: bool = False,
) -> dict[str, Tensor]:
    """Sums over scales of relu CAMs and/or prototype maps at the input's resolution,
    (B, C, H, W) each (foreground classes; pacam adds `pacam_background` (B, 1, H, W) and,
    when the method has seeds, the one-hot `pacam_seeds` (B, C+1, H, W) of the first scale).

    Per scale the image and its flip share one forward pass. CAMs are summed over the flip
    and aligned on the stride grid (IRN). Prototype maps follow SIPE's inference: the
    embeddings and CAMs of the image and its flip are summed, seeds and prototypes are
    computed on them (against the frozen bank for context), and the raw relu-cosine map
    of each scale is resized straight to the image; the caller normalises the sum once
    (`proto.maps == "sipe"`; "per_scale" is the earlier, per-scale normalised variant).

    `present_only` (with `labels`): only each image's own classes are upsampled and
    summed, the others left 0 (what `infer` keeps are the present ones): channel by
    channel the same numbers, at a fraction of the full-resolution memory traffic.
    """
    batch, _, height, width = images.shape
    stride = model.output_stride
    # IRN aligns the CAM grid to the top-left: upsample to a multiple of the stride, crop.
    padded = (math.ceil(height / stride) * stride, math.ceil(width / stride) * stride)
    totals: dict[str, Tensor] = {}
    pick = picked = None
    picked_from = 0
    if present_only and labels is not None:
        pick, picked = _present_channels(labels.to(images.device))
        picked_from = labels.shape[1]

    def add(kind: str, value: Tensor, grid_aligned: bool) -> None:
        if pick is not None and kind in (CAM_MAP, PACAM_MAP):
            value = value.gather(1, pick[:, :, None, None].expand(-1, -1, *value.shape[-2:]))
        value = value.float()  # sums over scales in float32 whatever the network ran in
        if grid_aligned:
            value = F.interpolate(value, size=padded, mode="bilinear", align_corners=False)
            value = value[:, :, :height, :width]
        else:
            value = F.interpolate(value, size=(height, width), mode="bilinear",
                                  align_corners=False)
        totals[kind] = value if kind not in totals else totals[kind] + value

    for scale in scales:
        x = rescaled(images, scale)
        both = None if labels is None else torch.cat([labels, labels]) if flip else labels
        out = model.inference(torch.cat([x, x.flip(-1)]) if flip else x, both)
        if CAM_MAP in kinds:
            cam = out.localisation
            add(CAM_MAP, _flip_sum(cam, batch) if flip else cam,
                grid_aligned=model.align_to_stride)
        if PACAM_MAP in kinds:
            if model.cpal is None or labels is None:
                raise ValueError("PACAM needs a network with the CPAL module and image labels")
            res = _prototype_scale(model, out, x, labels, flip, proto)
            if res.seeds is not None and "pacam_seeds" not in totals:
                # The seeds the prototypes of the first scale (infer.scales[0], the image's
                # own scale in every shipped config) were pooled from.
                totals["pacam_seeds"] = F.interpolate(res.seeds.float(), size=(height, width),
                                                      mode="nearest")
            if proto.maps == "sipe":
                assert res.similarity is not None
                add(PACAM_MAP, res.similarity[:, 1:], grid_aligned=False)
                add("pacam_background", res.similarity[:, :1], grid_aligned=False)
            else:
                add(PACAM_MAP, res.pacam[:, 1:], grid_aligned=True)
                add("pacam_background", res.pacam[:, :1], grid_aligned=True)
    if pick is not None and picked is not None:  # back to (B, C, H, W), absent classes 0
        for kind in (CAM_MAP, PACAM_MAP):
            if kind in totals:
                value = totals[kind] * picked[:, :, None, None].to(totals[kind].dtype)
                full = value.new_zeros((batch, picked_from, height, width))
                totals[kind] = full.scatter_(1, pick[:, :, None, None].expand_as(value), value)
    return totals


def _present_channels(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(B, P) indices of each image's present classes, P the most any image has (at
    least 1), padded with absent ones; and (B, P) bool: which of them are present."""
    present = labels > 0
    count = max(1, int(present.sum(dim=1).max()))
    order = torch.argsort(present.to(torch.int8), dim=1, descending=True, stable=True)
    pick = order[:, :count]
    return pick, present.gather(1, pick)


def multiscale_cam(model: LocalisationNet, images: Tensor, scales: Sequence[float],
                   flip: bool) -> Tensor:
    """Sum over scales (and flips) of relu CAMs at the input's resolution: (B, C, H, W)."""
    return multiscale_maps(model, images, scales, flip)[CAM_MAP]


def normalised_maps(
    model: LocalisationNet, images: Tensor, labels: Tensor, scales: Sequence[float], flip: bool,
    kinds: Sequence[str], proto: PrototypeInference = PrototypeInference(),
    present_only: bool = False,
) -> dict[str, Tensor]:
    """Multi-scale maps of each kind (cam, pacam; pacam brings pacam_background), each
    channel max-normalised to [0, 1] once, after the sum over scales."""
    sums = multiscale_maps(model, images, scales, flip, labels, kinds, proto, present_only)
    out = {}
    for kind, value in sums.items():
        if kind.endswith("_seeds"):
            out[kind] = value
        elif kind == CAM_MAP and model.map_norm == "min_max":
            out[kind] = min_max_normalised(value)
        else:
            out[kind] = normalized_cam(value)
    return out


@dataclass
class Localisation:
    """What `infer` writes per image batch: maps of the present classes' kind in [0, 1],
    the map's own background channel where it has one, and the prototype seeds (one-hot
    (B, C+1, H, W)) where the method has them."""

    maps: Tensor
    background: Tensor | None = None
    seeds: Tensor | None = None


def localisation_maps(
    model: LocalisationNet, images: Tensor, labels: Tensor, scales: Sequence[float], flip: bool,
    kind: str, proto: PrototypeInference = PrototypeInference(), present_only: bool = False,
) -> Localisation:
    """The map of kind cam, pacam or fused (the mean of the two), values in [0, 1], with
    its own background channel (B, 1, H, W) where it has one (pacam: the background
    prototype's map; fused: the mean of that and the CAM's 1 - max). `present_only`: as
    `multiscale_maps` (absent classes' channels 0)."""
    needed = (CAM_MAP, PACAM_MAP) if kind == FUSED_MAP else (kind,)
    normed = normalised_maps(model, images, labels, scales, flip, needed, proto, present_only)
    seeds = normed.get("pacam_seeds")
    if kind == FUSED_MAP:
        present = labels[:, :, None, None].to(normed[CAM_MAP].dtype)
        cam_bg = 1.0 - (normed[CAM_MAP] * present).amax(dim=1, keepdim=True)
        return Localisation((normed[CAM_MAP] + normed[PACAM_MAP]) / 2,
                            (cam_bg + normed["pacam_background"]) / 2, seeds)
    return Localisation(normed[kind], normed.get(f"{kind}_background"), seeds)


def pending_maps(
    config: Config, layout: VOCLayout, split: str, identity: dict[str, Any],
    shard: tuple[int, int],
) -> list[str]:
    """Claim `split`'s maps folder, delete what killed writes of `shard` left, and list the
    shard's images without a map. Under torchrun rank 0 alone runs this, before any
    process writes."""
    out_dir = RunPaths(config.output_path).maps(split)
    out_dir.mkdir(parents=True, exist_ok=True)
    _claim_folder(out_dir, identity)
    ids = distributed.every_nth(layout.split_ids(split), *shard)
    _remove_stale_temporaries(out_dir, set(ids))
    pending, damaged = [], []
    for image_id in ids:
        path = out_dir / f"{image_id}.npz"
        problem = map_file_problem(path) if path.exists() else "missing"
        if problem is not None:
            pending.append(image_id)
            if problem != "missing":
                damaged.append(f"{path}: damaged map file ({problem}); redoing it")
    # Each damaged file named (never counted as done), the first few in full.
    for line in damaged[:_NAMED]:
        warn(line)
    if len(damaged) > _NAMED:
        warn(f"{out_dir}: {len(damaged) - _NAMED} more damaged map files; redoing them")
    return pending


def infer_split(
    config: Config, layout: VOCLayout, model: LocalisationNet, split: str, device: torch.device,
    identity: dict[str, Any], *, shard: tuple[int, int] = (0, 1), progress: bool = True,
) -> int:
    """Write maps for every image of `split` in `shard` not yet done (this process's deal
    of them under torchrun); return how many this process wrote."""
    pending = distributed.deal(lambda: pending_maps(config, layout, split, identity, shard))
    out_dir = RunPaths(config.output_path).maps(split)
    if not pending:
        return 0
    dataset = InferenceDataset(layout, pending)
    sampler = SameSizeBatchSampler(dataset.sizes(), config.infer.batch_size)
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=config.data.num_workers,
        pin_memory=device.type == "cuda",
    )
    bar = Progress(len(pending), f"maps {split}", enabled=progress)
    precision = inference_precision(config)
    for batch in loader:
        labels = batch["label"].to(device)
        images = batch["image"].to(device)
        if config.infer.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            loc = localisation_maps(
                model, images, labels, identity["scales"], config.infer.flip, config.map_kind,
                PrototypeInference.of(config), present_only=True,
            )
        for i, (label, image_id) in enumerate(zip(batch["label"], batch["id"], strict=True)):
            _write_record(out_dir / f"{image_id}.npz", loc, i, label)
        bar.update(len(batch["id"]))
    bar.close()
    return len(pending)


def _claim_folder(directory: Path, identity: dict[str, Any]) -> None:
    """Record what makes this folder's maps, or refuse if it holds maps made otherwise.

    Race-free between shards: the record is created exclusively (a hard link of a complete
    temporary file), so of several shards starting together one creates it and the others
    compare against it. Maps are only written after the record exists, so maps without
    one are foreign; the record is looked for again after the maps, in case another shard
    claimed the folder in between.
    """
    meta = directory / MAPS_META
    if any(directory.glob("*.npz")) and not meta.exists():
        raise ConfigError(
            f"{directory}: holds maps of unknown origin (no {MAPS_META}); delete the folder"
        )
    if not meta.exists():
        _create_exclusive(meta, identity)
    existing = read_maps_identity(directory)
    if existing != identity:
        changed = changed_keys(existing, identity)
        raise ConfigError(
            f"{directory}: holds maps made with other settings ({', '.join(changed)}); "
            "delete that folder or use another output_dir"
        )


def _create_exclusive(path: Path, record: dict[str, Any]) -> None:
    """Create the JSON file `path` complete and only if absent (the first writer wins)."""
    candidate = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    write_json_atomic(candidate, record)
    try:
        os.link(candidate, path)
    except FileExistsError:
        pass  # another shard claimed it first; the caller compares
    except OSError:
        # A filesystem without hard links: a rename is atomic but not exclusive (shards of
        # one configuration write identical records; the caller still compares).
        os.replace(candidate, path)
    finally:
        candidate.unlink(missing_ok=True)


def _remove_stale_temporaries(directory: Path, owned: set[str]) -> None:
    """Delete temporary files that killed writes of this shard's images left behind
    (`.ID.npz.XXXX.tmp`); other shards' are theirs (they may be writing them now)."""
    for tmp in directory.glob(".*.npz.*.tmp"):
        image_id = tmp.name[1:].rpartition(".npz.")[0]
        if image_id in owned:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _write_record(path: Path, loc: Localisation, i: int, label: Tensor) -> None:
    """Keep image i's present-class (already normalised) maps, its background map and
    seeds (as class indices, 255 where no seed) when the method has them."""
    present = torch.nonzero(label > 0.5).flatten()
    maps = loc.maps[i, present.to(loc.maps.device)]
    background = None if loc.background is None else loc.background[i, 0].float().cpu().numpy()
    seeds = None
    if loc.seeds is not None:
        onehot = loc.seeds[i]
        seeds = torch.where(onehot.sum(0) > 0, onehot.argmax(0), IGNORE_INDEX)
        seeds = seeds.to(torch.uint8).cpu().numpy()
    save_maps(path, MapRecord(classes=(present + 1).cpu().numpy().astype(np.int64),
                              maps=maps.float().cpu().numpy(), background=background,
                              seeds=seeds))


@distributed.collective
def infer(config: Config, splits: Sequence[str] | None = None, *, progress: bool = True) -> dict:
    """Generate this process's part of the maps of `infer.shard` for the configured splits;
    return {split: images written by this process}."""
    device = setup(config)
    claim_output_dir_everywhere(config)
    # Named even when null (following train.precision): it is the key to change.
    check_precision(config, device, "infer.precision", inference_precision(config))
    with distributed.main_first():  # rank 0 fills the dataset cache; the others reuse it
        layout = open_dataset(config.data)
    splits = list(splits or config.infer.splits)
    for split in splits:
        layout.check(split)  # fail before any work, not halfway through
    model, source = maps_network(config, layout, device)
    identity = maps_identity(config, source)
    progress = progress and distributed.ranks().is_main
    return {
        split: infer_split(config, layout, model, split, device, identity,
                           shard=config.infer.shard_spec, progress=progress)
        for split in splits
    }


def maps_network(config: Config, layout: VOCLayout, device: torch.device
                 ) -> tuple[LocalisationNet, MapSource]:
    """The network maps are made with: the run's final training checkpoint (the one rank
    0 found, for every process), or for a method that does not train the network built
    from its pretrained file."""
    if method_spec(config.method).trains:
        newest = resume_point(RunPaths(config.output_path).checkpoints)
        checkpoint, ckpt = load_final_checkpoint(config, distributed.main_value(newest))
        model = load_trained_model(ckpt, config, layout.num_foreground, device)
        # BatchNorm folded (and NHWC): the same maps up to float rounding, faster.
        model = inference_copy(model, channels_last=config.infer.channels_last)
        return model, MapSource.of_checkpoint(checkpoint, ckpt)
    net, report = build_network(config, layout.num_foreground, pretrained=True,
                                class_names=layout.class_names[1:])
    if report is not None and distributed.ranks().is_main:
        _log.info("pretrained: %s", report.summary())
    net.to(device)
    return net.eval(), MapSource.of_weights(config, dataset_scale(config.data, layout))


def missing_maps(config: Config, layout: VOCLayout, split: str) -> list[str]:
    """Ids of `split` whose map file does not exist yet."""
    directory = RunPaths(config.output_path).maps(split)
    return [i for i in layout.split_ids(split) if not (directory / f"{i}.npz").exists()]
