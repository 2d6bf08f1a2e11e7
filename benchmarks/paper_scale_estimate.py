"""ESTIMATE of the time and memory of each paper-scale stage on one GPU, without a GPU.

Prints Markdown tables for the paper configs (configs/voc12, configs/coco14): the FLOPs
of one training image and one image's multi-scale maps, the FLOPs of each stage, its time
under a stated sustained throughput, and the memory of a training step and of a map batch.
It runs the networks on PyTorch's `meta` device (shapes only, no arithmetic), so it takes
seconds on a CPU. A benchmark: it prints figures, it asserts nothing.

Method
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` counts every convolution and matrix
  product (2 FLOPs per multiply-add) of our network as the engine runs it: training =
  forward + backward of a batch at the configured crop (frozen stages get no backward, as
  in a real step), maps = `multiscale_maps` of a typical image (VOC 500x375, COCO 640x480)
  at every configured scale, with its flip. BatchNorm, ReLU and resizing are not counted.
- Throughput: calibrated, not assumed. The same counter on torchvision's ResNet-50 (output
  stride 32) training at 224 px, times NVIDIA's published single-GPU ResNet-50 v1.5
  training throughput (DeepLearningExamples, 1x A100 80GB, pytorch-21.03: 938 img/s TF32),
  gives the FLOP rate a tuned PyTorch ResNet-50 sustains there, elementwise work included.
  cpal trains in float32, where PyTorch runs cuDNN convolutions in TF32 by default, so the
  TF32 figure applies. H100 SXM is given as a range: A100 time divided by the ratio of HBM
  bandwidth (3.35 / 2.04 TB/s, the pessimistic end) and of dense TF32 peak (495 / 156
  TFLOPS, the optimistic end). Data loading, map writing, evaluation and labels (CPU
  stages) are not included.
- Memory (float32): measured on the meta device. Training: weights + gradients of
  trainable weights + momentum buffers + the peak of live tensors during the forward pass
  (activations saved for backward included, tracked per storage) + 2x the largest saved
  activation (an activation's gradient and its input's coexist in backward). Maps: the
  peak of live tensors of one forward at the largest scale, `infer.batch_size` images and
  their flips. cuDNN workspaces and allocator caching come on top.

    python benchmarks/paper_scale_estimate.py [--methods cam sipe] [--a100-tf32-img-s 938]
"""

from __future__ import annotations

import argparse
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from cpal.config import Config, load_config
from cpal.engine.infer import multiscale_maps
from cpal.engine.train import compute_loss
from cpal.models.cam_net import build_network
from cpal.models.resnet import ResNet

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


@dataclass(frozen=True)
class Dataset:
    """Image counts of the splits the paper configs train on and map (public dataset facts)."""

    name: str
    config_dir: str
    classes: int  # foreground
    splits: dict[str, int]
    typical_hw: tuple[int, int]  # a typical image (height, width) for the maps estimate


DATASETS = (
    Dataset("VOC 2012", "voc12", 20,
            {"train_aug": 10_582, "train": 1_464, "val": 1_449}, (375, 500)),
    Dataset("COCO 2014", "coco14", 80, {"train": 82_081, "val": 40_137}, (480, 640)),
)

# Calibration source and GPU specifications (see the module docstring).
A100_TF32_RESNET50_IMG_S = 938.0
A100_HBM_TBPS, H100_HBM_TBPS = 2.039, 3.35
A100_TF32_TFLOPS, H100_TF32_TFLOPS = 156.0, 494.7


# ---------------------------------------------------------------------------------------
# Counting on the meta device


class LiveTensors(TorchDispatchMode):
    """Tracks the bytes of live tensor storages through every op; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def track(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata  # the storage's address: shared by views, unique while alive
        if key not in self.refs:
            self.refs[key], self.sizes[key] = 0, storage.nbytes()
            self.live += self.sizes[key]
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, Tensor):
                self.track(value)
        return out


def build(config: Config, classes: int) -> nn.Module:
    with torch.device("meta"):
        net, _ = build_network(config, classes, pretrained=False)
    return net


def random_labels(batch: int, classes: int) -> Tensor:
    return torch.empty(batch, classes, device="meta")


@dataclass
class TrainCost:
    forward_flops: float  # per image
    step_flops: float  # forward + backward, per image
    saved_bytes: int  # activations kept for backward, whole batch
    largest_saved: int
    forward_peak: int  # live tensors at the forward's peak, whole batch
    weight_bytes: int
    grad_bytes: int


def train_cost(config: Config, classes: int) -> TrainCost:
    net = build(config, classes).train()
    t = config.train
    images = torch.empty(t.batch_size, 3, t.crop_size, t.crop_size, device="meta")
    labels = random_labels(t.batch_size, classes)
    saved: dict[int, int] = {}
    weights = {p.untyped_storage()._cdata for p in net.parameters()}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:  # weights are counted once, below
            saved[storage._cdata] = storage.nbytes()
        return tensor  # the Python object stays referenced: LiveTensors sees it alive

    live = LiveTensors()
    counter = FlopCounterMode(display=False)
    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        with live:
            loss, _ = compute_loss(net, images, labels, config)
        forward = counter.get_total_flops()
        loss.backward()
    params = list(net.parameters())
    trainable = [p for p in params if p.requires_grad]
    momentum = len(trainable) if config.train.momentum > 0 else 0
    return TrainCost(
        forward_flops=forward / t.batch_size,
        step_flops=counter.get_total_flops() / t.batch_size,
        saved_bytes=sum(saved.values()),
        largest_saved=max(saved.values()),
        forward_peak=live.peak,
        weight_bytes=sum(p.numel() * 4 for p in params),
        grad_bytes=sum(p.numel() * 4 for p in trainable) * (1 + (momentum > 0)),
    )


def train_peak(cost: TrainCost) -> int:
    return cost.weight_bytes + cost.grad_bytes + cost.forward_peak + 2 * cost.largest_saved


def maps_cost(config: Config, classes: int, hw: tuple[int, int]) -> tuple[float, int]:
    """(FLOPs of one image's maps, peak bytes of one forward at the largest scale)."""
    net = build(config, classes).eval()
    kinds = {"cam": ("cam",), "pacam": ("pacam",), "fused": ("cam", "pacam")}[config.map_kind]
    image = torch.empty(1, 3, *hw, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        multiscale_maps(net, image, config.infer.scales, config.infer.flip,
                        random_labels(1, classes), kinds)
    flops = counter.get_total_flops()
    largest = max(config.infer.scales)
    size = (round(hw[0] * largest), round(hw[1] * largest))
    batch = config.infer.batch_size * (2 if config.infer.flip else 1)
    live = LiveTensors()
    with torch.inference_mode(), live:
        net(torch.empty(batch, 3, *size, device="meta"))
    return flops, live.peak


def reference_rate(img_s: float) -> float:
    """Sustained FLOP/s implied by a published ResNet-50 (224 px) training throughput."""
    with torch.device("meta"):
        trunk = ResNet("resnet50", output_stride=32)
        fc = nn.Linear(trunk.num_features, 1000)
    counter = FlopCounterMode(display=False)
    with counter:
        logits = fc(trunk(torch.empty(32, 3, 224, 224, device="meta"))[-1].mean(dim=(2, 3)))
        logits.sum().backward()
    return counter.get_total_flops() / 32 * img_s


# ---------------------------------------------------------------------------------------
# Report


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def stage_row(dataset: str, method: str, stage: str, images: str, flops: float, rate: float,
              fast: float, slow: float, memory: str) -> list[str]:
    seconds = flops / rate
    return [dataset, method, stage, images, f"{flops / 1e15:.1f}", duration(seconds),
            f"{duration(seconds * fast)} - {duration(seconds * slow)}", memory]


def table(header: list[str], rows: list[list[Any]], text_columns: int = 1) -> str:
    """A Markdown table: the first `text_columns` left-aligned, numbers right-aligned."""
    align = ["---" if i < text_columns else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def paper_config(name: str) -> Config:
    """A shipped paper config for counting shapes: no data is read, so its dataset root
    (required when training) may stay unset."""
    return load_config(REPO / "configs" / name, ["data.require_root=false"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["cam", "sipe"],
                        help="paper configs to estimate (cpal costs as sipe: docs/benchmarks.md)")
    parser.add_argument("--a100-tf32-img-s", type=float, default=A100_TF32_RESNET50_IMG_S,
                        help="published ResNet-50 training img/s on one A100 (calibration)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()

    rate = reference_rate(args.a100_tf32_img_s)
    h100_slow = A100_HBM_TBPS / H100_HBM_TBPS
    h100_fast = A100_TF32_TFLOPS / H100_TF32_TFLOPS
    print("ESTIMATE, not a measurement: no GPU was used.")
    print(f"Sustained rate: {rate / 1e12:.1f} TFLOP/s on one A100 80GB in TF32 = "
          f"{args.a100_tf32_img_s:.0f} img/s (NVIDIA's ResNet-50 v1.5 training) x "
          f"{rate / args.a100_tf32_img_s / 1e9:.1f} GFLOP per 224 px image (fwd + bwd, "
          f"counted); {100 * rate / 1e12 / A100_TF32_TFLOPS:.0f} % of the "
          f"{A100_TF32_TFLOPS:.0f} TFLOPS dense TF32 peak. H100 SXM: A100 time x "
          f"{h100_fast:.2f} (TF32 peak ratio) .. x {h100_slow:.2f} (HBM bandwidth ratio).\n")

    per_image: list[list[Any]] = []
    stages: list[list[Any]] = []
    for ds in DATASETS:
        for method in args.methods:
            name = f"{ds.config_dir}/{method}_r50.yaml"
            config = paper_config(name)
            t = config.train
            cost = train_cost(config, ds.classes)
            map_flops, map_peak = maps_cost(config, ds.classes, ds.typical_hw)
            h, w = ds.typical_hw
            per_image.append([
                f"{ds.name} {method}", f"{cost.forward_flops / 1e9:.0f}",
                f"{cost.step_flops / 1e9:.0f} ({cost.step_flops / cost.forward_flops:.2f}x)",
                f"{3 * cost.forward_flops / 1e9:.0f}", f"{map_flops / 1e9:.0f} ({w}x{h})",
                f"{cost.saved_bytes / GIB:.1f}", f"{train_peak(cost) / GIB:.1f}",
                f"{map_peak / GIB:.1f}",
            ])
            steps = ds.splits[config.data.train_split] // t.batch_size  # drop_last, as engine
            images = steps * t.batch_size * t.epochs
            runs: list[tuple[str, int, float, str]] = [
                (f"train, {config.data.train_split} x {t.epochs} epochs", images,
                 cost.step_flops, f"{train_peak(cost) / GIB:.1f} GiB"),
            ]
            for split in config.infer.splits:
                runs.append((f"maps, {split}", ds.splits[split], map_flops,
                             f"{map_peak / GIB:.1f} GiB"))
            total = 0.0
            for stage, count, flops, memory in runs:
                total += count * flops
                stages.append(stage_row(ds.name, method, stage, f"{count:,}", count * flops,
                                        rate, h100_fast, h100_slow, memory))
            stages.append(stage_row(ds.name, method, "**all GPU stages**", "", total, rate,
                                    h100_fast, h100_slow, ""))

    s = DATASETS[0]
    cfg = paper_config(f"{s.config_dir}/cam_r50.yaml")
    scales = "/".join(f"{x:g}" for x in cfg.infer.scales)
    print(f"Per image: training at batch {cfg.train.batch_size} x {cfg.train.crop_size} px "
          f"(frozen stages {cfg.model.frozen_stages}: no backward there); maps at scales "
          f"{scales}{' + flip' if cfg.infer.flip else ''}, {cfg.infer.batch_size} images "
          "per forward. Memory float32.\n")
    print(table(["config", "forward GFLOP (512 px)", "train step GFLOP (fwd+bwd)",
                 "3x forward rule", "maps GFLOP per image", "saved activations (GiB)",
                 "train peak (GiB)", "maps peak (GiB)"], per_image))
    print()
    print(table(["dataset", "method", "stage", "images", "PFLOP", "A100 80GB (TF32)",
                 "H100 SXM (TF32)", "memory"], stages, text_columns=3))
    print("\ncpal costs as sipe plus its support bank and k-means (0.06 % of a ResNet-50 step "
          "measured by benchmarks/method_overhead.py); it cannot run on the meta device.")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
