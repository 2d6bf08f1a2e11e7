import json

import torch

from cpal.engine.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_restores_model_and_momentum(tmp_path):
    model, opt = _model_and_optimizer()
    path = save_checkpoint(tmp_path, epoch=3, step=30, model=model, optimizer=opt,
                           meta={"note": "x"})
    ckpt = load_checkpoint(path)
    assert (ckpt.epoch, ckpt.step, ckpt.meta) == (3, 30, {"note": "x"})
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    fresh.load_state_dict(ckpt.model)
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ckpt.optimizer)
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"],
                       opt.state_dict()["state"][0]["momentum_buffer"])


def test_incomplete_checkpoints_are_ignored(tmp_path):
    model, opt = _model_and_optimizer()
    save_checkpoint(tmp_path, epoch=1, step=10, model=model, optimizer=opt, meta={})
    second = save_checkpoint(tmp_path, epoch=2, step=20, model=model, optimizer=opt, meta={})
    # A kill during the tensor write of epoch 3 leaves only a tensor file (no JSON marker).
    (tmp_path / "epoch_003.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == second
    # A truncated tensor file behind a JSON marker is also not trusted.
    tensors = tmp_path / "epoch_002.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:50])
    assert latest_checkpoint(tmp_path).name == "epoch_001.json"
    assert json.loads((tmp_path / "epoch_001.json").read_text())["epoch"] == 1


def test_prune_keeps_newest(tmp_path):
    model, opt = _model_and_optimizer()
    for epoch in range(1, 5):
        save_checkpoint(tmp_path, epoch=epoch, step=epoch, model=model, optimizer=opt, meta={})
    (tmp_path / "epoch_009.safetensors").write_bytes(b"orphan")
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch_003.json", "epoch_004.json"]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "epoch_003.safetensors", "epoch_004.safetensors"]


def test_a_checkpoint_of_another_format_is_refused_in_one_line(tmp_path):
    import pytest

    from cpal.engine.checkpoint import FORMAT_VERSION
    from cpal.errors import CheckpointError

    model, opt = _model_and_optimizer()
    path = save_checkpoint(tmp_path, epoch=1, step=1, model=model, optimizer=opt, meta={})
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "format": FORMAT_VERSION - 1}))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value) == (f"{path}: checkpoint format {FORMAT_VERSION - 1}, this cpal "
                                f"reads format {FORMAT_VERSION}; train again (delete "
                                f"{tmp_path} or choose another output_dir)")


def test_a_maps_folder_of_another_format_is_refused_in_one_line(tmp_path):
    import pytest

    from cpal.engine.identity import MAPS_FORMAT, MAPS_META, read_maps_identity
    from cpal.errors import DatasetError

    (tmp_path / MAPS_META).write_text(json.dumps({"checkpoint": "epoch_002.json"}))
    with pytest.raises(DatasetError, match=rf"{MAPS_META}: maps folder of format 1, this cpal "
                                           rf"reads format {MAPS_FORMAT}; delete the folder"):
        read_maps_identity(tmp_path)
