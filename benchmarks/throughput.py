"""Training and inference throughput of a config on its dataset (default: the demo).

Prints images/s for training steps (data loading, forward, backward, SGD step) and for
multi-scale + flip map inference (data loading, forward over all scales, upsampling):
plainly batched, as `cpal infer` runs it (BatchNorm folded, NHWC, present classes only;
also under `infer.precision=bf16`), and the reference loop of one forward per image, scale
and flip, with the ratios. Map rates are over `--infer-images` images (512 by default: fewer
give noisy ratios on a shared CPU), the reference over a quarter of them.
A benchmark, not a test: it prints figures, it asserts nothing.

    python benchmarks/throughput.py [CONFIG] [KEY=VALUE ...] [--train-steps N] [--infer-images N]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

from cpal.config import load_config
from cpal.data.datasets import ClassificationDataset, InferenceDataset, SameSizeBatchSampler
from cpal.data.images import image_size
from cpal.data.source import dataset_scale, open_dataset
from cpal.data.transforms import TrainTransform
from cpal.engine.infer import PrototypeInference, localisation_maps, multiscale_cam
from cpal.engine.runtime import autocast, setup
from cpal.engine.train import build_optimizer, compute_loss, crop_geometry
from cpal.models.cam_net import build_network
from cpal.models.fusion import inference_copy
from cpal.models.resnet import count_parameters

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--infer-images", type=int, default=512)
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    device = setup(cfg)
    layout = open_dataset(cfg.data)
    t = cfg.train
    model, _ = build_network(cfg, layout.num_foreground)
    model.to(device)
    print(f"config: {args.config} | {cfg.model.arch} width {cfg.model.width} "
          f"OS {cfg.model.output_stride} | {count_parameters(model) / 1e6:.2f} M params")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}")

    # The run's own geometry: "auto" crops and the dataset's scale (data.min_long_side).
    ids = layout.split_ids(cfg.data.train_split)
    image_scale = dataset_scale(cfg.data, layout)
    crop, resize = crop_geometry(t, [max(image_size(layout.image_path(i))) for i in ids],
                                 image_scale)
    print(f"images x{image_scale:.3g}, crop {crop}, resize_long {list(resize)}")
    dataset = ClassificationDataset(layout, cfg.data.train_split,
                                    TrainTransform(crop, resize, t.hflip), cfg.seed)
    loader = DataLoader(dataset, batch_size=t.batch_size, drop_last=True,
                        sampler=RandomSampler(dataset, generator=torch.Generator().manual_seed(0)),
                        num_workers=cfg.data.num_workers)
    optimizer = build_optimizer(model, cfg)
    model.train()
    warmup, timed, start = 2, 0, 0.0
    for i, batch in enumerate(loader):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        loss, _ = compute_loss(model, batch["image"].to(device), batch["label"].to(device), cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            timed += len(batch["image"])
        if i + 1 >= warmup + args.train_steps:
            break
    _sync(device)
    train_rate = timed / (time.perf_counter() - start)
    print(f"train: {train_rate:8.1f} images/s  (batch {t.batch_size}, crop {t.crop_size}, "
          f"{args.train_steps} timed steps)")

    ids = layout.split_ids(cfg.infer.splits[0])[: args.infer_images]
    infer_set = InferenceDataset(layout, ids)
    model.eval()
    scales = [s * image_scale for s in cfg.infer.scales]
    flip = " + flip" if cfg.infer.flip else ""
    # What `cpal infer` runs: BatchNorm folded, NHWC (infer.channels_last), batches of
    # same-size images with their flips, present classes only upsampled.
    fast = inference_copy(model, channels_last=cfg.infer.channels_last)
    rates = {}
    for name, net, layout_cl, present, precision in (
            ("plain", model, False, False, "fp32"),
            ("cpal infer", fast, cfg.infer.channels_last, True, "fp32"),
            ("cpal infer, bf16", fast, cfg.infer.channels_last, True, "bf16")):
        with autocast(device, precision):
            rates[name] = _batched_rate(net, infer_set, cfg, scales, device, layout_cl, present)
        print(f"infer ({name}): {rates[name]:8.1f} images/s  (scales {scales}{flip}, "
              f"batch {cfg.infer.batch_size}, {len(ids)} images)")
    # The reference: one forward per image, per scale and per flip (IRN's loop over a
    # batch of one), on the network as trained.
    subset = ids[: max(1, len(ids) // 4)]
    start = time.perf_counter()
    for image_id in subset:
        image = infer_set[infer_set.ids.index(image_id)]["image"][None].to(device)
        for flip_view in ([image, image.flip(-1)] if cfg.infer.flip else [image]):
            multiscale_cam(model, flip_view, scales, flip=False)
    _sync(device)
    single_rate = len(subset) / (time.perf_counter() - start)
    print(f"infer, one forward per image/scale/flip: {single_rate:8.1f} images/s  "
          f"({len(subset)} images)")
    print(f"map generation vs that reference: plain batching {rates['plain'] / single_rate:.2f}x, "
          f"cpal infer {rates['cpal infer'] / single_rate:.2f}x "
          f"(bf16: {rates['cpal infer, bf16'] / single_rate:.2f}x)")
    print(f"ratio infer/train images/s: {rates['cpal infer'] / train_rate:.2f}")


def _batched_rate(net: torch.nn.Module, dataset: InferenceDataset, cfg: Any,
                  scales: list[float], device: torch.device, channels_last: bool,
                  present: bool) -> float:
    """Images/s of batched multi-scale + flip maps over `dataset` (loading included)."""
    loader = DataLoader(
        dataset, batch_sampler=SameSizeBatchSampler(dataset.sizes(), cfg.infer.batch_size),
        num_workers=cfg.data.num_workers,
    )

    def run(batch: dict[str, Any]) -> None:
        images = batch["image"].to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        localisation_maps(net, images, batch["label"].to(device), scales,
                          cfg.infer.flip, cfg.map_kind, PrototypeInference.of(cfg),
                          present_only=present)

    run(next(iter(loader)))  # warm-up
    _sync(device)
    start = time.perf_counter()
    for batch in loader:
        run(batch)
    _sync(device)
    return len(dataset) / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
