"""Our ViT/DeiT: a forward pass computed by hand on a tiny config, timm DeiT files by key
(synthesised state dicts with timm's key set written out independently), position
embeddings for other input sizes, and the attention maps the WSSS methods read."""

import math

import pytest
import torch

from cpal.errors import CheckpointError
from cpal.models.vit import (
    VIT_ARCHS,
    VisionTransformer,
    ViTSpec,
    deit_layout,
    resize_pos_embed,
)
from cpal.models.weights import load_weights

BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
              "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
              "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")


def timm_deit_keys(depth: int = 12) -> set[str]:
    """timm's VisionTransformer (DeiT) state-dict keys, from its structure."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias", "head.weight", "head.bias"}
    return keys | {f"blocks.{i}.{k}" for i in range(depth) for k in BLOCK_KEYS}


def fake_deit(spec: ViTSpec, *, grid: int = 14, classes: int = 1000, seed: int = 0) -> dict:
    """A timm DeiT file's tensors with the real key set and shapes of `spec`."""
    g = torch.Generator().manual_seed(seed)
    d, h = spec.dim, int(spec.dim * spec.mlp_ratio)
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + grid * grid, d),
              "patch_embed.proj.weight": (d, 3, spec.patch, spec.patch),
              "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,),
              "head.weight": (classes, d), "head.bias": (classes,)}
    inner = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d),
             "attn.qkv.bias": (3 * d,), "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
             "norm2.weight": (d,), "norm2.bias": (d,), "mlp.fc1.weight": (h, d),
             "mlp.fc1.bias": (h,), "mlp.fc2.weight": (d, h), "mlp.fc2.bias": (d,)}
    for i in range(spec.depth):
        shapes |= {f"blocks.{i}.{k}": s for k, s in inner.items()}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def test_forward_by_hand_one_block_two_heads_dim_4_patch_2():
    spec = ViTSpec(dim=4, depth=1, heads=2, patch=2, mlp_ratio=2.0, image_size=4)
    torch.manual_seed(0)
    model = VisionTransformer(spec).double().eval()
    for p in model.parameters():  # every parameter away from its init, biases too
        p.data = torch.randn_like(p)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    out = model(x, return_attention=True)

    sd = {k: v for k, v in model.state_dict().items()}
    w = sd["patch_embed.proj.weight"]  # (4, 3, 2, 2)
    patches = [x[0, :, r:r + 2, c:c + 2] for r in (0, 2) for c in (0, 2)]  # row-major
    tokens = [sd["cls_token"][0, 0]] + [
        (w * p).sum(dim=(1, 2, 3)) + sd["patch_embed.proj.bias"] for p in patches]
    t = torch.stack(tokens) + sd["pos_embed"][0]  # (5, 4)
    b = "blocks.0."
    n1 = _layer_norm(t, sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-6)
    qkv = n1 @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]
    q, k, v = qkv[:, :4], qkv[:, 4:8], qkv[:, 8:]
    heads, maps = [], []
    for h in range(2):
        sl = slice(2 * h, 2 * h + 2)
        scores = (q[:, sl] @ k[:, sl].T) / math.sqrt(2)
        a = torch.exp(scores) / torch.exp(scores).sum(-1, keepdim=True)
        maps.append(a)
        heads.append(a @ v[:, sl])
    y = t + torch.cat(heads, dim=1) @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
    n2 = _layer_norm(y, sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-6)
    hid = n2 @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"]
    hid = 0.5 * hid * (1 + torch.erf(hid / math.sqrt(2)))  # exact GELU
    y = y + hid @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]

    torch.testing.assert_close(out.tokens[0], y, rtol=1e-10, atol=1e-10)  # float64 throughout
    torch.testing.assert_close(out.attentions[0][0], torch.stack(maps), rtol=1e-10, atol=1e-10)
    assert out.grid == (2, 2) and out.prefix == 1
    assert out.patch_map().shape == (1, 4, 2, 2)
    torch.testing.assert_close(out.patch_map()[0, :, 1, 0], y[3])  # row 1, column 0


def test_fused_attention_path_equals_the_explicit_one():
    spec = VIT_ARCHS["deit_small"].scaled(0.125, depth=2)
    model = VisionTransformer(spec).eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        fast = model(x).tokens
        slow = model(x, return_attention=True)
    # The same maths in two kernels: float32 summation order only.
    torch.testing.assert_close(fast, slow.tokens, rtol=1e-4, atol=1e-5)
    assert len(slow.attentions) == 2
    for a in slow.attentions:
        assert a.shape == (2, spec.heads, 1 + 12, 1 + 12)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, spec.heads, 13))


def test_timm_deit_small_file_loads_by_key(tmp_path):
    spec = VIT_ARCHS["deit_small"].scaled(0.125)  # the real key set, small tensors
    state = fake_deit(spec)
    assert set(state) == timm_deit_keys() and len(state) == 152
    path = tmp_path / "deit_small_patch16_224-cd65a155.pth"
    torch.save({"model": state}, path)  # DeiT's release wraps the state dict
    model = VisionTransformer(spec)
    report = load_weights(model, path, deit_layout(model))
    assert report.missing == [] and report.unexpected == [] and report.leaks == []
    assert sorted(report.ignored) == ["head.bias", "head.weight"]
    assert report.loaded == 150
    own = model.state_dict()
    for key, value in state.items():
        if not key.startswith("head."):
            torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)


def test_class_tokens_start_as_copies_of_cls_and_positions_follow_the_grid(tmp_path):
    spec = VIT_ARCHS["deit_small"].scaled(0.125, depth=1)
    state = fake_deit(spec)
    path = tmp_path / "deit.safetensors"
    from safetensors.torch import save_file
    save_file(state, str(path))
    wide = ViTSpec(**{**spec.__dict__, "image_size": 448})  # grid 28 instead of 14
    model = VisionTransformer(wide, prefix=5)  # MCTformer: one token per class
    load_weights(model, path, deit_layout(model))
    for c in range(5):
        torch.testing.assert_close(model.cls_token[0, c], state["cls_token"][0, 0])
        torch.testing.assert_close(model.pos_embed[0, c], state["pos_embed"][0, 0])
    expected = resize_pos_embed(state["pos_embed"], 1, (14, 14), (28, 28), "bicubic")
    torch.testing.assert_close(model.pos_embed[:, 5:], expected[:, 1:])


def test_distilled_and_resnet_files_are_refused_by_name(tmp_path):
    spec = VIT_ARCHS["deit_small"].scaled(0.125, depth=1)
    state = fake_deit(spec) | {"dist_token": torch.zeros(1, 1, spec.dim),
                               "head_dist.weight": torch.zeros(10, spec.dim)}
    path = tmp_path / "deit_small_distilled_patch16_224.pth"
    torch.save(state, path)
    model = VisionTransformer(spec)
    with pytest.raises(CheckpointError, match=r"unexpected 2 \(dist_token, head_dist.weight\)"
                       r".*distilled DeiT"):
        load_weights(model, path, deit_layout(model))
    resnet = tmp_path / "resnet50-19c8e357.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "layer1.0.conv1.weight":
                torch.zeros(8, 8, 1, 1)}, resnet)
    with pytest.raises(CheckpointError, match="a ResNet file: the MCTformer methods"):
        load_weights(model, resnet, deit_layout(model))
    clean = tmp_path / "deit_small_patch16_224.pth"
    torch.save(fake_deit(spec), clean)
    bigger = VisionTransformer(VIT_ARCHS["deit_small"].scaled(0.25, depth=1))
    with pytest.raises(CheckpointError, match=r"shape mismatch for 18 tensors: .*model.width"):
        load_weights(bigger, clean, deit_layout(bigger))


def test_position_embeddings_are_resized_for_other_inputs():
    pos = torch.randn(1, 1 + 16, 8)
    same = resize_pos_embed(pos, 1, (4, 4), (4, 4), "bicubic")
    assert same is pos
    flat = torch.ones(1, 1 + 16, 8)
    for mode in ("bicubic", "bilinear"):
        out = resize_pos_embed(flat, 1, (4, 4), (6, 3), mode)
        assert out.shape == (1, 1 + 18, 8)
        torch.testing.assert_close(out, torch.ones_like(out))  # a constant stays constant
    spec = VIT_ARCHS["deit_tiny"].scaled(0.125, depth=1)
    model = VisionTransformer(spec).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 70, 100))  # not a multiple of 16: floor, as a conv
    assert out.grid == (4, 6) and out.tokens.shape == (1, 1 + 24, spec.dim)


def test_kept_block_outputs_and_running_the_first_blocks_only():
    spec = VIT_ARCHS["deit_tiny"].scaled(0.125, depth=3)
    model = VisionTransformer(spec).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        full = model(x, keep=(-1, 1))
        part = model(x, blocks=2)
    torch.testing.assert_close(full.hidden[-1], full.tokens)
    torch.testing.assert_close(full.hidden[1], part.tokens)
    with pytest.raises(ValueError, match="block 3 does not exist"):
        model(x, keep=(3,))


def test_drop_path_only_in_training_and_per_sample():
    spec = VIT_ARCHS["deit_tiny"].scaled(0.125, depth=2)
    model = VisionTransformer(spec, drop_path=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        a, b = model(x).tokens, model(x).tokens
    torch.testing.assert_close(a, b)
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        c = model(x).tokens
    assert not torch.allclose(a, c)
