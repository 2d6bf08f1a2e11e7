"""Training and inference throughput of DeepLab-v2 at 321 x 321 crops (CPU, one thread).

Training step: MSC forward (scales 1, 0.75, 0.5 and their max), the ignore-aware loss on
all four outputs, backward and an SGD step with deeplab-pytorch's parameter groups.
Inference: the network's MSC max at one input scale (deeplab-pytorch's test), and
multi-scale + flip inference on top of it. Random images and labels: this measures the
network, not data loading. A benchmark, not a test: it prints figures, asserts nothing.

    python benchmarks/segmentation_throughput.py [--variants resnet101:0.25,resnet18:0.25]
        [--crop 321] [--batch 2] [--train-steps 3] [--infer-images 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from cpal.models.resnet import count_parameters
from cpal.models.segmenter import build_segmenter, sgd_param_groups
from cpal.segmentation.inference import multi_scale_logits
from cpal.segmentation.losses import segmentation_loss

NUM_CLASSES = 21


def _variants(text: str) -> list[tuple[str, float]]:
    out = []
    for item in text.split(","):
        arch, _, width = item.partition(":")
        out.append((arch.strip(), float(width or 1.0)))
    return out


def _rate(images: int, seconds: float) -> str:
    return f"{images / seconds:7.2f} images/s ({seconds / images:6.2f} s/image)"


def bench(arch: str, width: float, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model, _ = build_segmenter("deeplab_v2", NUM_CLASSES, arch=arch, width=width)
    optimizer = torch.optim.SGD(sgd_param_groups(model, 2.5e-4, 5e-4), lr=2.5e-4,
                                momentum=0.9)
    crop = args.crop
    images = torch.randn(args.batch, 3, crop, crop)
    labels = torch.randint(0, NUM_CLASSES, (args.batch, crop, crop))
    labels[:, : crop // 4] = 255
    print(f"deeplab_v2 {arch} width {width}: {count_parameters(model) / 1e6:.2f} M params, "
          f"OS {model.logit_stride}, MSC {model.msc_scales}")

    model.train()
    timed = 0.0
    for step in range(1 + args.train_steps):  # the first step warms up
        start = time.perf_counter()
        loss = segmentation_loss(model(images, return_all=True), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:
            timed += time.perf_counter() - start
    name = f"train (batch {args.batch}, {args.train_steps} steps)"
    print(f"  {name:<34} {_rate(args.batch * args.train_steps, timed)}")

    model.eval()
    one = torch.randn(1, 3, crop, crop)
    for name, scales, flip in (("infer (MSC max, 1 scale)", (1.0,), False),
                               ("infer (+ scales 0.75/1/1.25, flip)", (0.75, 1.0, 1.25), True)):
        with torch.inference_mode():
            multi_scale_logits(model, one, scales=scales, flip=flip)  # warm-up
            start = time.perf_counter()
            for _ in range(args.infer_images):
                multi_scale_logits(model, one, scales=scales, flip=flip)
            seconds = time.perf_counter() - start
        print(f"  {name:<34} {_rate(args.infer_images, seconds)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="resnet101:0.25,resnet18:0.25",
                        help="comma-separated arch:width pairs")
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--infer-images", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, crop {args.crop}")
    for arch, width in _variants(args.variants):
        bench(arch, width, args)


if __name__ == "__main__":
    main()
