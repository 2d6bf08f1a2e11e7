"""Cost of the prototype methods relative to the plain CAM network.

Prints, per backbone: the training-step time (forward + backward + SGD step, random data,
same batch and crop) of every variant and its ratio to `cam`; the prototype branch's own
forward + backward on the same batch's features (its cost apart from the step's noise,
which on a shared CPU is larger than the branch); the share of a `cpal` step
spent in the support bank (enqueue + amortised k-means re-clustering); and the memory of the
bank at VOC (20 + 1 classes) and COCO (80 + 1) scale. Targets (issue 3): cpal <= 1.15 x cam,
bank + k-means <= 5 % of a step; issue 9 asks every variant <= 1.10 x cam on the demo
net and <= 1.05 x on ResNet-50. A benchmark: it prints figures, it asserts nothing.

    python benchmarks/method_overhead.py [--steps N] [--r50-batch B] [--r50-crop S]
"""

from __future__ import annotations

import argparse
import time

import torch

from cpal.config import load_config
from cpal.engine.train import build_optimizer, compute_loss
from cpal.methods import ablation_ladder
from cpal.models.cam_net import build_network
from cpal.prototypes.bank import SupportBank


class Stepper:
    """One variant's network, optimizer and batch: `step()` times one training step."""

    def __init__(self, overrides: list[str], batch: int, crop: int, classes: int) -> None:
        self.cfg = load_config(None, overrides)
        torch.manual_seed(0)
        self.model, _ = build_network(self.cfg, classes)
        self.model.train()
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.images = torch.randn(batch, 3, crop, crop)
        self.labels = (torch.rand(batch, classes) < 0.2).float()
        self.labels[:, 0] = 1.0

    def step(self) -> float:
        start = time.perf_counter()
        loss, _ = compute_loss(self.model, self.images, self.labels, self.cfg)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start


def branch_time(stepper: Stepper, reps: int = 10) -> float:
    """Seconds of the prototype branch alone (forward + backward on the network's own
    features of the step's batch, the bank updated as in training), the minimum of `reps`:
    a few milliseconds measured apart from a step whose own noise is larger than they."""
    model = stepper.model
    assert model.cpal is not None
    with torch.no_grad():
        features = model.backbone(stepper.images)
        cam = model.classifier(features[-1])
    labels = stepper.labels
    times = []
    for _ in range(reps + 2):
        cam_in = cam.detach().requires_grad_()
        start = time.perf_counter()
        out = model.cpal(features, cam_in, labels, None, None, stepper.images)
        sum(out.losses.values()).backward()
        times.append(time.perf_counter() - start)
    return min(times[2:])


def step_times(variants: dict[str, list[str]], batch: int, crop: int, steps: int,
               classes: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds of one training step per variant, after two warm-up steps each.
    The variants take turns step by step, each round starting one variant later, so a
    drift of the machine's speed (another process, the clock) and a variant's place in
    the round fall on all of them alike. Also each prototype branch's own time
    (`branch_time`)."""
    steppers = [(name, Stepper(o, batch, crop, classes)) for name, o in variants.items()]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(steps + 2):
        for j in range(len(steppers)):
            name, stepper = steppers[(i + j) % len(steppers)]
            seconds = stepper.step()
            if i >= 2:
                times[name].append(seconds)
    medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    branches = {name: branch_time(stepper) for name, stepper in steppers
                if stepper.model.cpal is not None}
    return medians, branches


def embedding_dim(cfg, classes: int) -> int:
    """D of the network's embedding (the hierarchical feature's width, or the projection)."""
    model, _ = build_network(cfg, classes)
    assert model.cpal is not None
    return model.cpal.head.dim


def bank_time(channels: int, size: int, dim: int, clusters: int, per_step: int,
              recluster_every: int) -> float:
    """Seconds per step spent in the bank: one enqueue + 1/recluster_every of a k-means."""
    bank = SupportBank(channels, size, dim)
    protos = torch.nn.functional.normalize(torch.randn(per_step, dim), dim=1)
    chans = torch.randint(0, channels, (per_step,))
    for _ in range(size // max(1, per_step // channels) + 1):
        bank.enqueue(protos, chans)
    start = time.perf_counter()
    for _ in range(20):
        bank.enqueue(protos, chans)
    enqueue = (time.perf_counter() - start) / 20
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(3):
        bank.recluster(clusters, 10, generator)
    recluster = (time.perf_counter() - start) / 3
    return enqueue + recluster / recluster_every


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--r50-batch", type=int, default=4)
    parser.add_argument("--r50-crop", type=int, default=256)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    setups = {
        # The demo recipe's crop: its 128-px images enlarged to 192 (data.min_long_side).
        "demo net (ResNet-18 x0.5, batch 32, crop 192, 10 classes)": (
            ["model.arch=resnet18", "model.width=0.5", "model.frozen_bn=false"], 32, 192, 10),
        f"ResNet-50 (batch {args.r50_batch}, crop {args.r50_crop}, 20 classes)": (
            ["model.arch=resnet50"], args.r50_batch, args.r50_crop, 20),
    }
    for title, (base, batch, crop, classes) in setups.items():
        print(f"\n{title}")
        medians, branches = step_times({v: [*base, f"method={v}"] for v in ablation_ladder()},
                                       batch, crop, args.steps, classes)
        cam = medians["cam"]
        for variant, seconds in medians.items():
            branch = (f"   branch alone {branches[variant] * 1000:6.1f} ms = "
                      f"{1 + branches[variant] / cam:4.2f} x cam") if variant in branches else ""
            print(f"  {variant:10s} {seconds * 1000:8.1f} ms/step  {seconds / cam:5.2f} x cam"
                  f"{branch}")
            if variant == "cpal":
                cfg = load_config(None, [*base, "method=cpal"])
                dim = embedding_dim(cfg, classes)
                bank = bank_time(classes + 1, cfg.bank.size, dim,
                                 cfg.bank.clusters, batch * 3, cfg.bank.recluster_every)
                print(f"  bank + k-means: {bank * 1000:.2f} ms/step = "
                      f"{100 * bank / seconds:.2f} % of a cpal step "
                      f"(size {cfg.bank.size}, D {dim}, {cfg.bank.clusters} "
                      f"clusters every {cfg.bank.recluster_every} steps)")
    print("\nsupport bank memory (buffers, float32; D 768 = SIPE's ResNet-50 feature):")
    for name, classes in (("VOC", 20), ("COCO", 80)):
        bank = SupportBank(classes + 1, 512, 768)
        nbytes = sum(b.numel() * b.element_size() for b in bank.buffers())
        print(f"  {name}: {classes} classes + background, 512 entries, D 768: "
              f"{nbytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
