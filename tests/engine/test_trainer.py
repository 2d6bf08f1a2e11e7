"""The shared training loop on a task that is not the CAM network (as the DeepLab and IRN
trainers will be): hook order, checkpoints and the log, exact resume after a kill."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from cpal.config import TrainConfig
from cpal.engine.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from cpal.engine.hooks import HookBase, Interrupt, TensorBoardHook, standard_hooks
from cpal.engine.paths import RunPaths
from cpal.engine.trainer import Trainer

SETTINGS = TrainConfig(batch_size=4, log_every=1, checkpoint_every_steps=2,
                       keep_checkpoints=10, poly_power=0.9)


class _Points:
    """12 fixed (x, y) pairs; nothing to augment, so `set_epoch` has nothing to do."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(12, 3, generator=generator)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5]])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"x": self.x[index], "y": self.y[index]}

    def set_epoch(self, epoch: int) -> None:
        pass


class _Regression:
    """A TrainTask: a linear model, the squared error weighted by the micro-batch's share."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)
        self.dataset = _Points()

    def loss(self, model: nn.Module, item: dict[str, Any], batch: Sequence[int]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        share = len(item["x"]) / len(batch)
        error = ((model(item["x"]) - item["y"]) ** 2).mean() * share
        return error, {"mse": error}


class _Recorder(HookBase):
    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattribute__(self, name: str) -> Any:
        if name.startswith(("before_", "after_")):
            return lambda: self.events.append(name)
        return super().__getattribute__(name)


def _trainer(out: Path, *extra: HookBase) -> Trainer:
    task = _Regression()
    optimizer = torch.optim.SGD([{"params": task.net.parameters(), "lr": 0.1,
                                  "base_lr": 0.1}], lr=0.1)
    return Trainer(task, optimizer, train=SETTINGS, seed=0, num_workers=0,
                   device=torch.device("cpu"), paths=RunPaths(out), meta={"fingerprint": {}},
                   epochs=2, steps_per_epoch=3,
                   hooks=[*standard_hooks(SETTINGS, progress=False), *extra])


def test_hooks_are_called_in_order_and_the_standard_ones_write(tmp_path):
    recorder = _Recorder()
    trainer = _trainer(tmp_path, recorder)
    trainer.resume({}, allowed=True)
    assert trainer.train() == tmp_path / "checkpoints" / "epoch_002.json"
    epoch = ["before_epoch", *["before_step", "after_step"] * 3, "after_epoch"]
    assert recorder.events == ["before_train", *epoch, *epoch, "after_train"]
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [
        "step_00000002.json", "epoch_001.json", "step_00000004.json", "epoch_002.json"]
    rows = [json.loads(x) for x in RunPaths(tmp_path).train_log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4, 5, 6, 6]
    assert all("loss_mse" in r for r in rows if "loss" in r)


def test_a_killed_task_resumes_exactly(tmp_path):
    straight = _trainer(tmp_path / "a")
    straight.resume({}, allowed=True)
    straight.train()
    with pytest.raises(KeyboardInterrupt):
        killed = _trainer(tmp_path / "b", Interrupt(at_step=5))
        killed.resume({}, allowed=True)
        killed.train()
    assert latest_checkpoint(tmp_path / "b/checkpoints").name == "step_00000004.json"
    resumed = _trainer(tmp_path / "b")
    resumed.resume({}, allowed=True)
    assert (resumed.position.epoch, resumed.position.batch) == (1, 1)
    resumed.train()
    a = load_checkpoint(tmp_path / "a/checkpoints/epoch_002.json").model
    b = load_checkpoint(tmp_path / "b/checkpoints/epoch_002.json").model
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def test_interrupt_needs_one_point():
    with pytest.raises(ValueError, match="exactly one"):
        Interrupt()


class _Writer:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, int]] = []
        self.closed = False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        assert isinstance(value, float)
        self.scalars.append((tag, step))

    def close(self) -> None:
        self.closed = True


def test_tensorboard_scalars_follow_the_log(tmp_path):
    writer = _Writer()
    trainer = _trainer(tmp_path, TensorBoardHook(SETTINGS, tmp_path / "tb", writer))
    trainer.resume({}, allowed=True)
    trainer.train()
    tags = {tag for tag, _ in writer.scalars}
    assert tags == {"train/loss", "train/mse", "train/lr", "train/images_per_s",
                    "epoch/mean_loss"}
    assert [s for t, s in writer.scalars if t == "train/loss"] == [1, 2, 3, 4, 5, 6]
    assert [s for t, s in writer.scalars if t == "epoch/mean_loss"] == [3, 6]
    assert writer.closed


def test_tensorboard_without_the_package_is_one_line(monkeypatch):
    import importlib.util

    from cpal.config import load_config
    from cpal.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^'log\.tensorboard': needs the tensorboard "
                                          r"package \(pip install tensorboard\)$"):
        load_config(None, ["log.tensorboard=true"])
    assert not load_config(None).log.tensorboard
