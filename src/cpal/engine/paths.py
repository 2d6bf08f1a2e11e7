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
        return self.root / "labels" / split
