"""A deliberately minimal CAM baseline, independent of cpal's training code.

A 4-block CNN at output stride 8, Adam 1e-3, images at their native size (no resize or
crop), horizontal flip at test time, 60 epochs. Its CAM mIoU on a dataset is the bar the
library's own recipe must clear on small data (docs/results.md, "Recipe check").

    python benchmarks/reference_cam.py DATA_ROOT [--epochs 60] [--seed 0]

Prints train-split mIoU at a fixed background threshold of 0.25 and at the oracle
threshold (best on train GT), so both can be compared with `cpal run` on the same root.
Diagnosis switches swap one ingredient at a time for cpal's: `--trunk resnet18` (cpal's
ResNet-18 x0.5 at output stride 8), `--optim sgd` (cpal's demo SGD: lr 0.05, momentum 0.9,
poly schedule, weight decay 1e-4).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cpal.data.transforms import normalize
from cpal.data.voc import VOCLayout
from cpal.models.resnet import ResNet


def block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
              nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Net(nn.Module):
    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(block(3, width, True), block(width, 2 * width, True),
                                      block(2 * width, 4 * width, True),
                                      block(4 * width, 8 * width, False))
        self.classifier = nn.Conv2d(8 * width, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ResNetCAM(nn.Module):
    """cpal's ResNet trunk with a 1x1 classifier, for the --trunk diagnosis."""

    def __init__(self, num_classes: int, width: float, output_stride: int) -> None:
        super().__init__()
        self.trunk = ResNet("resnet18", width=width, output_stride=output_stride)  # type: ignore[arg-type]
        self.classifier = nn.Conv2d(self.trunk.num_features, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.trunk(x)[-1])


def miou(conf: np.ndarray) -> float:
    iou = np.diag(conf) / np.maximum(conf.sum(0) + conf.sum(1) - np.diag(conf), 1)
    return float(iou.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train")
    parser.add_argument("--trunk", choices=["cnn4", "resnet18"], default="cnn4")
    parser.add_argument("--optim", choices=["adam", "sgd"], default="adam")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    layout = VOCLayout.open(args.root)
    ids = layout.split_ids(args.split)
    images = torch.stack([normalize(layout.load_image(i)) for i in ids])
    labels = torch.from_numpy(layout.image_labels(ids))
    net = Net(labels.shape[1]) if args.trunk == "cnn4" else ResNetCAM(labels.shape[1], 0.5, 8)
    if args.optim == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    steps = args.epochs * -(-len(ids) // args.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (1 - i / steps) ** 0.9 if args.optim == "sgd" else 1.0)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(ids))
        total = 0.0
        net.train()
        for b in range(0, len(ids), args.batch):
            idx = perm[b : b + args.batch]
            x = images[idx]
            flip = torch.rand(len(idx)) < 0.5
            x[flip] = x[flip].flip(-1)
            loss = F.multilabel_soft_margin_loss(net(x).mean((2, 3)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1}: loss {total / len(ids):.4f}", flush=True)
    net.eval()
    thresholds = [round(0.05 * i, 2) for i in range(1, 20)]
    k = layout.num_classes
    confs = {t: np.zeros((k, k), dtype=np.int64) for t in thresholds}
    with torch.no_grad():
        for i, image_id in enumerate(ids):
            x = images[i : i + 1]
            cam = F.relu(net(torch.cat([x, x.flip(-1)])))
            cam = cam[:1] + cam[1:].flip(-1)
            cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0]
            cam = cam / (cam.flatten(1).amax(1)[:, None, None] + 1e-5)
            present = torch.nonzero(labels[i] > 0.5).flatten()
            gt = layout.load_mask(image_id)
            valid = gt != 255
            for t in thresholds:
                scores = torch.cat([torch.full_like(cam[:1], t), cam[present]])
                pred = torch.cat([torch.zeros(1, dtype=torch.long), present + 1])[scores.argmax(0)]
                p = pred.numpy()[valid]
                confs[t] += np.bincount(gt[valid].astype(np.int64) * k + p,
                                        minlength=k * k).reshape(k, k)
    scores = {t: miou(c) for t, c in confs.items()}
    best = max(scores, key=scores.get)
    print(f"reference CAM [{args.trunk}, {args.optim}] ({time.perf_counter() - start:.0f} s): "
          f"{args.split} mIoU "
          f"{100 * scores[0.25]:.1f} at bg 0.25, {100 * scores[best]:.1f} at oracle bg {best}")


if __name__ == "__main__":
    main()
