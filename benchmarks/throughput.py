"""Training and inference throughput of a config on its dataset (default: the demo).

Prints images/s for training steps (data loading, forward, backward, SGD step) and for
multi-scale + flip map inference (data loading, forward over all scales, upsampling).
A benchmark, not a test: it prints figures, it asserts nothing.

    python benchmarks/throughput.py [CONFIG] [KEY=VALUE ...] [--train-steps N] [--infer-images N]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

from cpal.config import load_config
from cpal.data.datasets import ClassificationDataset, InferenceDataset, SameSizeBatchSampler
from cpal.data.source import open_dataset
from cpal.data.transforms import TrainTransform
from cpal.engine.infer import multiscale_cam
from cpal.engine.runtime import setup
from cpal.engine.train import build_optimizer, compute_loss
from cpal.models.cam_net import build_network
from cpal.models.resnet import count_parameters

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--infer-images", type=int, default=128)
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

    dataset = ClassificationDataset(
        layout, cfg.data.train_split,
        TrainTransform(t.crop_size, (t.resize_long[0], t.resize_long[1]), t.hflip), cfg.seed,
    )
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
    infer_loader = DataLoader(
        infer_set, batch_sampler=SameSizeBatchSampler(infer_set.sizes(), cfg.infer.batch_size),
        num_workers=cfg.data.num_workers,
    )
    model.eval()
    scales = cfg.infer.scales
    # Warm up on one batch, then time the whole set.
    multiscale_cam(model, next(iter(infer_loader))["image"].to(device), scales, cfg.infer.flip)
    _sync(device)
    start = time.perf_counter()
    for batch in infer_loader:
        multiscale_cam(model, batch["image"].to(device), scales, cfg.infer.flip)
    _sync(device)
    infer_rate = len(ids) / (time.perf_counter() - start)
    flip = " + flip" if cfg.infer.flip else ""
    print(f"infer: {infer_rate:8.1f} images/s  (scales {scales}{flip}, "
          f"batch {cfg.infer.batch_size}, {len(ids)} images)")
    # Baseline: one forward per image, per scale and per flip (the reference scripts' loop).
    subset = ids[: max(1, len(ids) // 4)]
    start = time.perf_counter()
    for image_id in subset:
        image = infer_set[infer_set.ids.index(image_id)]["image"][None].to(device)
        for flip_view in ([image, image.flip(-1)] if cfg.infer.flip else [image]):
            multiscale_cam(model, flip_view, scales, flip=False)
    _sync(device)
    single_rate = len(subset) / (time.perf_counter() - start)
    print(f"infer, one forward per image/scale/flip: {single_rate:8.1f} images/s  "
          f"({len(subset)} images) -> batching speed-up {infer_rate / single_rate:.2f}x")
    print(f"ratio infer/train images/s: {infer_rate / train_rate:.2f}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
