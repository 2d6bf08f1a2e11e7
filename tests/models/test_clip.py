"""CLIP files by key: OpenAI's layout (a TorchScript archive of a module built like
OpenAI's, and the same state dict as a plain file) and Hugging Face's (derived from it by
HF's naming, written out here), each loaded into our CLIP and checked against a forward
pass of the OpenAI-structured module, which runs on torch's own MultiheadAttention."""

import dataclasses
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from cpal.errors import CheckpointError
from cpal.models.clip import CLIP, CLIP_ARCHS, CLIP_LAYOUT
from cpal.models.weights import load_weights
from tests.helpers import torchscript_archive

_B16 = CLIP_ARCHS["clip_vit_b16"].scaled(1 / 48, depth=1)  # real layout, tiny: width 12
SPEC = dataclasses.replace(_B16, vocab_size=40, context_length=7,
                           vision=dataclasses.replace(_B16.vision, image_size=32))


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResBlock(nn.Module):
    """OpenAI's ResidualAttentionBlock: ln_1, attn (MultiheadAttention), ln_2, mlp."""

    def __init__(self, width: int, heads: int, mask: torch.Tensor | None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)),
                                              ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)
        self.attn_mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mask=None) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[ResBlock(width, heads, mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class Visual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        v = SPEC.vision
        self.conv1 = nn.Conv2d(3, v.dim, v.patch, v.patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(v.dim))
        self.positional_embedding = nn.Parameter(torch.randn(v.grid ** 2 + 1, v.dim))
        self.ln_pre = nn.LayerNorm(v.dim)
        self.transformer = Transformer(v.dim, v.depth, v.heads)
        self.ln_post = nn.LayerNorm(v.dim)
        self.proj = nn.Parameter(torch.randn(v.dim, SPEC.embed_dim))

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.proj


class OpenAIClip(nn.Module):
    """Built as OpenAI's clip/model.py builds CLIP (names and maths), randomly initialised."""

    def __init__(self) -> None:
        super().__init__()
        w, n = SPEC.text_width, SPEC.context_length
        self.visual = Visual()
        mask = torch.full((n, n), float("-inf")).triu(1)
        self.transformer = Transformer(w, SPEC.text_depth, SPEC.text_heads, mask)
        self.token_embedding = nn.Embedding(SPEC.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.randn(n, w))
        self.ln_final = nn.LayerNorm(w)
        self.text_projection = nn.Parameter(torch.randn(w, SPEC.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(4.6))
        for p in self.parameters():  # biases and norms away from their init too
            p.data = torch.randn_like(p) * 0.3
        self.register_buffer("input_resolution", torch.tensor(224))
        self.register_buffer("context_length", torch.tensor(n))
        self.register_buffer("vocab_size", torch.tensor(SPEC.vocab_size))

    def encode_image(self, x):
        return self.visual(x)

    def encode_text(self, tokens):
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.text_projection

    def forward(self, x):
        return self.visual(x)


def openai_keys(depth_v: int, depth_t: int) -> set[str]:
    """OpenAI ViT CLIP state-dict keys, from clip/model.py's structure."""
    inner = ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
             "attn.out_proj.bias", "ln_1.weight", "ln_1.bias", "mlp.c_fc.weight",
             "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias", "ln_2.weight",
             "ln_2.bias")
    keys = {"visual.class_embedding", "visual.positional_embedding", "visual.proj",
            "visual.conv1.weight", "visual.ln_pre.weight", "visual.ln_pre.bias",
            "visual.ln_post.weight", "visual.ln_post.bias", "positional_embedding",
            "text_projection", "logit_scale", "token_embedding.weight", "ln_final.weight",
            "ln_final.bias", "input_resolution", "context_length", "vocab_size"}
    keys |= {f"visual.transformer.resblocks.{i}.{k}" for i in range(depth_v) for k in inner}
    return keys | {f"transformer.resblocks.{i}.{k}" for i in range(depth_t) for k in inner}


def hf_state(reference: OpenAIClip) -> dict[str, torch.Tensor]:
    """The same weights under transformers' CLIPModel names (q/k/v split, projections
    as Linear weights), position_ids buffers included as older files have them."""
    out: dict[str, torch.Tensor] = {}
    for key, value in reference.state_dict().items():
        if key in ("input_resolution", "context_length", "vocab_size"):
            continue
        tower, rest = ("vision_model", key[len("visual."):]) if key.startswith("visual.") \
            else ("text_model", key)
        rest = rest.replace("transformer.resblocks.", "encoder.layers.")
        rest = (rest.replace("ln_1", "layer_norm1").replace("ln_2", "layer_norm2")
                .replace("attn.out_proj", "self_attn.out_proj")
                .replace("mlp.c_fc", "mlp.fc1").replace("mlp.c_proj", "mlp.fc2"))
        if rest.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):
            stem, kind = rest.rsplit(".attn.in_proj_", 1)
            for name, part in zip("qkv", value.chunk(3), strict=True):
                out[f"{tower}.{stem}.self_attn.{name}_proj.{kind}"] = part.clone()
            continue
        named = {"class_embedding": "embeddings.class_embedding",
                 "conv1.weight": "embeddings.patch_embedding.weight",
                 "positional_embedding": "embeddings.position_embedding.weight",
                 "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",
                 "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias",
                 "token_embedding.weight": "embeddings.token_embedding.weight",
                 "ln_final.weight": "final_layer_norm.weight",
                 "ln_final.bias": "final_layer_norm.bias"}
        if rest == "proj":
            out["visual_projection.weight"] = value.T.contiguous()
        elif rest == "text_projection":
            out["text_projection.weight"] = value.T.contiguous()
        elif rest == "logit_scale":
            out["logit_scale"] = value.clone()
        else:
            out[f"{tower}.{named.get(rest, rest)}"] = value.clone()
    out["vision_model.embeddings.position_ids"] = torch.arange(SPEC.vision.grid ** 2 + 1)[None]
    out["text_model.embeddings.position_ids"] = torch.arange(SPEC.context_length)[None]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The OpenAI-structured model and its TorchScript archive (as ViT-B-16.pt is)."""
    return torchscript_archive(OpenAIClip, tmp_path_factory.mktemp("clip"))


def _check_equivalent(ours: CLIP, reference: OpenAIClip) -> None:
    x = torch.randn(2, 3, 32, 32)
    tokens = torch.tensor([[3, 7, 5, 39, 0, 0, 0], [3, 39, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        image = ours.visual.project(ours.visual(x).tokens)[:, 0]
        text = ours.encode_text(tokens)
        # float32, the same maths in other kernels (MultiheadAttention vs ours)
        torch.testing.assert_close(image, reference.encode_image(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(text, reference.encode_text(tokens), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.logit_scale, reference.logit_scale)


def test_openai_torchscript_archive_loads_and_computes_the_same(reference):
    model, path = reference
    assert set(model.state_dict()) == openai_keys(1, 1)
    ours = CLIP(SPEC).eval()
    report = load_weights(ours, path, CLIP_LAYOUT)
    assert report.missing == [] and report.unexpected == [] and report.leaks == []
    assert report.loaded == len(ours.state_dict())
    _check_equivalent(ours, model)


def test_openai_state_dict_as_a_plain_file(reference, tmp_path):
    model, _ = reference
    path = tmp_path / "clip_vit_b16.pt"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)  # fp16 as released
    ours = CLIP(SPEC).eval()
    load_weights(ours, path, CLIP_LAYOUT)
    assert ours.visual.proj.dtype == torch.float32  # copied into our float32 parameters
    torch.testing.assert_close(ours.visual.proj, model.visual.proj.half().float())


def test_hugging_face_layout_loads_and_computes_the_same(reference, tmp_path):
    model, _ = reference
    folder = tmp_path / "models--openai--clip-vit-base-patch16" / "snapshots" / "abc123"
    folder.mkdir(parents=True)
    save_file(hf_state(model), str(folder / "model.safetensors"))
    ours = CLIP(SPEC).eval()
    report = load_weights(ours, folder / "model.safetensors", CLIP_LAYOUT)
    assert report.missing == [] and report.unexpected == [] and report.leaks == []
    _check_equivalent(ours, model)


def test_wrong_files_are_named(reference, tmp_path):
    model, _ = reference
    state = {k: v for k, v in model.state_dict().items() if k.startswith("visual.")}
    path = tmp_path / "visual_only.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError,
                       match=r"missing \d+ \(logit_scale, text\..*image encoder only"):
        load_weights(CLIP(SPEC), path, CLIP_LAYOUT)
    deit = tmp_path / "deit_small_patch16_224.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 12), "blocks.0.norm1.weight": torch.zeros(12)},
               deit)
    with pytest.raises(CheckpointError, match="a DeiT/ViT file: the CLIP-ES methods"):
        load_weights(CLIP(SPEC), deit, CLIP_LAYOUT)
    hf = hf_state(model)
    del hf["vision_model.encoder.layers.0.self_attn.k_proj.bias"]
    broken = tmp_path / "model.safetensors"
    save_file(hf, str(broken))
    with pytest.raises(CheckpointError, match=r"visual.blocks.0.self_attn lacks bias k"):
        load_weights(CLIP(SPEC), broken, CLIP_LAYOUT)
