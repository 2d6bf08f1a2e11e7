"""The TorchScript-archive reader (OpenAI's CLIP files): tensors of an archive written by
torch.jit.save here, read back without torch.jit.load, and archives whose pickle asks for
anything else refused before anything is imported or called."""

import pickle
import zipfile

import pytest
import torch
from torch import nn

from cpal.errors import CheckpointError
from cpal.models.torchscript import is_torchscript_archive, read_torchscript_tensors
from cpal.models.weights import read_weight_file
from tests.helpers import torchscript_archive


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.ln_1 = nn.LayerNorm(8)
        self.register_buffer("running", torch.arange(4.0))
        self.attn_mask = torch.full((3, 3), float("-inf")).triu(1)  # a plain attribute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_1(self.attn(x, x, x, need_weights=False, attn_mask=self.attn_mask)[0])


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(_Block(), _Block())
        self.class_embedding = nn.Parameter(torch.randn(8).half())  # CLIP's files are fp16
        self.register_buffer("vocab_size", torch.tensor(49408))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return torchscript_archive(_Model, tmp_path_factory.mktemp("jit"))


def test_tensors_of_a_saved_script_module_are_read_exactly(archive):
    model, path = archive
    assert is_torchscript_archive(path)
    tensors = read_torchscript_tensors(path)
    state = model.state_dict()
    for key, value in state.items():
        assert tensors[key].dtype == value.dtype, key
        torch.testing.assert_close(tensors[key], value, rtol=0, atol=0, msg=key)
    # Tensor attributes that are not in the state dict come too (the caller's keys decide).
    assert set(tensors) - set(state) == {"blocks.0.attn_mask", "blocks.1.attn_mask"}
    assert tensors["class_embedding"].dtype == torch.float16
    # read_weight_file dispatches the archive here, never to torch.load / torch.jit.load.
    assert set(read_weight_file(path).tensors) == set(tensors)


def _rewrite_pickle(path, data: bytes, out):
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            payload = data if item.filename.endswith("/data.pkl") else src.read(item)
            dst.writestr(item, payload)


class _Evil:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_a_pickle_naming_any_other_global_is_refused(archive, tmp_path):
    _, path = archive
    bad = tmp_path / "evil.pt"
    _rewrite_pickle(path, pickle.dumps({"x": _Evil()}, protocol=2), bad)
    assert is_torchscript_archive(bad)
    with pytest.raises(CheckpointError, match=r"evil.pt: cannot read the TorchScript archive "
                       r"\(refused global (__builtin__|builtins).eval\)"):
        read_torchscript_tensors(bad)


def test_damaged_archives_are_named(archive, tmp_path):
    _, path = archive
    cut = tmp_path / "cut.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(cut, "w") as dst:
        for item in src.infolist():
            payload = src.read(item)
            if "/data/" in item.filename:
                payload = payload[:2]  # every storage truncated
            dst.writestr(item, payload)
    with pytest.raises(CheckpointError, match=r"cut.pt: storage \d+ is truncated"):
        read_torchscript_tensors(cut)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, plain)  # a zip too, but no compiled code
    assert not is_torchscript_archive(plain)
