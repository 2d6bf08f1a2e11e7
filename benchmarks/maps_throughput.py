"""Map images/s of each base: the ResNet CAM, MCTformer and CLIP-ES (and their +CPAL maps).

Each base makes maps with its reference's inference protocol (cam/cpal: scales 1.0, 0.5,
1.5, 2.0 + flip as IRN/SIPE; mctformer: scale 1.0 + flip; clip-es: scale 1.0, no flip,
one backward pass per present class), through the code `cpal infer` runs
(`localisation_maps`), on random images of one size with two present classes of 20, with
random weights (speed does not depend on the weights). Paper-sized trunks by default
(ResNet-50, DeiT-S, CLIP ViT-B/16); `--width`/`--depth` for CPU-sized ones. A benchmark,
not a test: it prints figures, it asserts nothing.

    python benchmarks/maps_throughput.py [--size H W] [--images N] [--batch B]
        [--bases cam,cpal,mctformer,mctformer-cpal,clip-es,clip-es-cpal] [--width W]
        [--depth D] [--device cpu|cuda] [--threads T]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from cpal.config import load_config
from cpal.engine.infer import PrototypeInference, localisation_maps
from cpal.engine.runtime import resolve_device
from cpal.models.cam_net import build_network
from cpal.models.resnet import count_parameters

CLASSES = 20
PROTOCOLS = {"resnet50": ("[1.0,0.5,1.5,2.0]", "true"), "deit_small": ("[1.0]", "true"),
             "clip_vit_b16": ("[1.0]", "false")}
"""Each trunk's reference inference: IRN/SIPE's scales + flip, MCTformer's scale 1 + flip,
CLIP-ES's scale 1 without flip."""
BASES = {"cam": "resnet50", "cpal": "resnet50", "mctformer": "deit_small",
         "mctformer-cpal": "deit_small", "clip-es": "clip_vit_b16",
         "clip-es-cpal": "clip_vit_b16"}


def overrides_of(base: str) -> list[str]:
    arch = BASES[base]
    scales, flip = PROTOCOLS[arch]
    return [f"method={base}", f"model.arch={arch}", f"infer.scales={scales}",
            f"infer.flip={flip}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(320, 480), metavar=("H", "W"))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--bases", default=",".join(BASES))
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--depth", type=int, default=None, help="transformer blocks")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}; images {args.size[0]}x"
          f"{args.size[1]}, batch {args.batch}, random weights")
    print(f"{'base':<16}{'trunk':<14}{'params':>9}  {'protocol':<38}{'images/s':>9}"
          f"{'s/image':>9}{'peak MB':>9}")
    for base in args.bases.split(","):
        overrides = [*overrides_of(base), f"model.width={args.width}", "model.frozen_bn=false",
                     f"infer.batch_size={args.batch}"]
        if args.depth is not None:
            overrides.append(f"vit.depth={args.depth}")
        rate, peak, cfg, params = measure(load_config(None, overrides), args, device)
        flip = " + flip" if cfg.infer.flip else ""
        protocol = f"{cfg.map_kind}, scales {','.join(map(str, cfg.infer.scales))}{flip}"
        print(f"{base:<16}{cfg.model.arch:<14}{params / 1e6:>8.1f}M  {protocol:<38}"
              f"{rate:>9.2f}{1 / rate:>9.2f}{peak:>9.0f}")


def measure(cfg, args: argparse.Namespace, device: torch.device
            ) -> tuple[float, float, object, int]:
    """(images/s, peak CUDA MB or 0, config, parameter count) over `args.images` images
    after one warm-up batch."""
    torch.manual_seed(0)
    model, _ = build_network(cfg, CLASSES, pretrained=False,
                             class_names=[f"class {i}" for i in range(CLASSES)])
    model.to(device).eval()
    images = torch.randn(args.batch, 3, *args.size, device=device)
    labels = torch.zeros(args.batch, CLASSES, device=device)
    labels[:, 3] = labels[:, 11] = 1.0
    proto = PrototypeInference.of(cfg)

    def batch() -> None:
        localisation_maps(model, images, labels, cfg.infer.scales, cfg.infer.flip,
                          cfg.map_kind, proto)

    batch()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    steps = max(1, args.images // args.batch)
    start = time.perf_counter()
    for _ in range(steps):
        batch()
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = steps * args.batch / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
    return rate, peak, cfg, count_parameters(model)


if __name__ == "__main__":
    main()
