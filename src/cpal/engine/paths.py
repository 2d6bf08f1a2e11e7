"""Where each stage of a run reads and writes, all under one output directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def train_log(self) -> Path:
        return self.root / "train_log.jsonl"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def stages(self) -> Path:
        return self.root / "stages.json"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard events (`log.tensorboard: true`)."""
        return self.root / "tensorboard"

    def maps(self, split: str) -> Path:
        return self.root / "maps" / split

    def labels(self, split: str) -> Path:
        """The final pseudo masks of `split` (what the segmentation network trains on)."""
        return self.root / "labels" / split

    def seeds(self, split: str) -> Path:
        """The un-refined labels (maps + background threshold) when a refinement follows;
        without one they are `labels(split)` themselves."""
        return self.root / "seeds" / split

    def refinement(self, method: str) -> Path:
        """Everything refinement `method` makes (IRN: IR labels, checkpoints, log)."""
        return self.root / "refine" / method

    def refined(self, method: str, split: str) -> Path:
        return self.refinement(method) / split

    @property
    def segmentation(self) -> Path:
        """The segmentation network's checkpoints, log and predictions."""
        return self.root / "segmentation"

    def predictions(self, split: str) -> Path:
        return self.segmentation / split

    def server_results(self, split: str) -> Path:
        """The VOC evaluation server's layout for a split without GT masks (VOC test):
        results/VOC2012/Segmentation/comp6_<split>_cls/<id>.png, index PNGs."""
        return self.segmentation / "results" / "VOC2012" / "Segmentation" / f"comp6_{split}_cls"
