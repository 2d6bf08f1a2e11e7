"""CLIP (Radford et al., ICML 2021): our ViT image encoder and text transformer, loading
OpenAI's and Hugging Face's files by key.

The image encoder is `cpal.models.vit.VisionTransformer` with CLIP's settings (no patch
bias, a LayerNorm before the blocks, LayerNorm eps 1e-5, x * sigmoid(1.702 x), bilinear
position resizing as CLIP-ES does) plus the projection to the joint space; the text
encoder runs the same blocks under a causal mask and reads the end-of-text token.
Parameter names are ours (timm's inside blocks); `CLIP_LAYOUT` maps both published
layouts onto them in one place:

- OpenAI (`ViT-B-16.pt`, a TorchScript archive read by `cpal.models.torchscript`, or
  the same state dict as a .pt/.safetensors file): visual.conv1, visual.class_embedding,
  visual.positional_embedding, visual.ln_pre/ln_post, visual.proj,
  visual.transformer.resblocks.i.{ln_1, attn.in_proj_weight/bias, attn.out_proj, ln_2,
  mlp.c_fc, mlp.c_proj}, token_embedding, positional_embedding, transformer.resblocks.i,
  ln_final, text_projection, logit_scale;
- Hugging Face (`openai/clip-vit-base-patch16`: model.safetensors or pytorch_model.bin):
  vision_model.embeddings.{class_embedding, patch_embedding, position_embedding},
  vision_model.pre_layrnorm / post_layernorm, vision_model.encoder.layers.i.{layer_norm1,
  self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}, visual_projection (a Linear:
  our projection transposed), text_model.*, text_projection, logit_scale.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cpal.errors import CheckpointError
from cpal.models.vit import Block, VisionTransformer, ViTSpec, run_blocks
from cpal.models.weights import WeightLayout
from cpal.registry import Registry

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""CLIP's input normalisation (its images are not normalised with ImageNet's)."""


@dataclass(frozen=True)
class ClipSpec:
    vision: ViTSpec
    embed_dim: int = 512
    text_width: int = 512
    text_depth: int = 12
    text_heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408

    def scaled(self, width: float = 1.0, depth: int | None = None) -> ClipSpec:
        """Narrower heads (x width) and `depth` blocks in both encoders (CPU runs)."""
        head = max(1, round(self.text_width // self.text_heads * width))
        return dataclasses.replace(
            self, vision=self.vision.scaled(width, depth),
            embed_dim=max(8, round(self.embed_dim * width)), text_width=head * self.text_heads,
            text_depth=self.text_depth if depth is None else depth)

    @property
    def text(self) -> ViTSpec:
        """The text blocks' shape (a ViTSpec: the same blocks, CLIP's settings)."""
        return dataclasses.replace(self.vision, dim=self.text_width, depth=self.text_depth,
                                   heads=self.text_heads)


CLIP_ARCHS: Registry[ClipSpec] = Registry("CLIP model")
CLIP_ARCHS.register("clip_vit_b16", ClipSpec(ViTSpec(
    dim=768, depth=12, heads=12, patch=16, image_size=224, eps=1e-5, act="quick_gelu",
    patch_bias=False, pre_norm=True, interpolation="bilinear")), aliases=("ViT-B/16",))


class ClipVisual(VisionTransformer):
    """CLIP's image encoder: the ViT trunk and `proj` (width -> joint space)."""

    def __init__(self, spec: ViTSpec, embed_dim: int) -> None:
        super().__init__(spec, prefix=1)
        self.proj = nn.Parameter(torch.randn(spec.dim, embed_dim) * spec.dim ** -0.5)

    def project(self, tokens: Tensor) -> Tensor:
        """Final LayerNorm, then the projection, on each token (B, L, D) -> (B, L, E)."""
        return self.norm(tokens) @ self.proj


class TextTransformer(nn.Module):
    def __init__(self, spec: ClipSpec) -> None:
        super().__init__()
        text = spec.text
        self.token_embedding = nn.Embedding(spec.vocab_size, text.dim)
        self.pos_embed = nn.Parameter(torch.randn(spec.context_length, text.dim) * 0.01)
        self.blocks = nn.ModuleList(Block(text) for _ in range(text.depth))
        self.norm = nn.LayerNorm(text.dim, eps=text.eps)
        self.proj = nn.Parameter(torch.randn(text.dim, spec.embed_dim) * text.dim ** -0.5)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        mask = torch.full((spec.context_length, spec.context_length), float("-inf")).triu(1)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """(N, L) token ids -> (N, E): the end-of-text token's (the largest id) output."""
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.pos_embed[:n]
        x, _ = run_blocks(self.blocks, x, mask=self.causal_mask[:n, :n].to(x.dtype))
        x = self.norm(x)
        return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.proj


class CLIP(nn.Module):
    """Image and text encoders with CLIP's learned logit scale."""

    def __init__(self, spec: ClipSpec) -> None:
        super().__init__()
        self.spec = spec
        self.visual = ClipVisual(spec.vision, spec.embed_dim)
        self.text = TextTransformer(spec)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @torch.no_grad()
    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.text(tokens)


# ---------------------------------------------------------------------------------------
# Files


_BLOCK = (("ln_1.", "norm1."), ("ln_2.", "norm2."), ("attn.in_proj_weight", "attn.qkv.weight"),
          ("attn.in_proj_bias", "attn.qkv.bias"), ("attn.out_proj.", "attn.proj."),
          ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."),
          ("layer_norm1.", "norm1."), ("layer_norm2.", "norm2."),
          ("self_attn.out_proj.", "attn.proj."))
_OPENAI = (
    (r"visual\.class_embedding$", "visual.cls_token"),
    (r"visual\.positional_embedding$", "visual.pos_embed"),
    (r"visual\.conv1\.", "visual.patch_embed.proj."),
    (r"visual\.ln_pre\.", "visual.norm_pre."),
    (r"visual\.ln_post\.", "visual.norm."),
    (r"visual\.transformer\.resblocks\.(\d+)\.", r"visual.blocks.\1."),
    (r"transformer\.resblocks\.(\d+)\.", r"text.blocks.\1."),
    (r"token_embedding\.", "text.token_embedding."),
    (r"positional_embedding$", "text.pos_embed"),
    (r"ln_final\.", "text.norm."),
    (r"text_projection$", "text.proj"),
)
_HF = (
    (r"vision_model\.embeddings\.class_embedding$", "visual.cls_token"),
    (r"vision_model\.embeddings\.patch_embedding\.", "visual.patch_embed.proj."),
    (r"vision_model\.embeddings\.position_embedding\.weight$", "visual.pos_embed"),
    (r"vision_model\.pre_layrnorm\.", "visual.norm_pre."),
    (r"vision_model\.post_layernorm\.", "visual.norm."),
    (r"vision_model\.encoder\.layers\.(\d+)\.", r"visual.blocks.\1."),
    (r"visual_projection\.weight$", "visual.proj"),
    (r"text_model\.embeddings\.token_embedding\.", "text.token_embedding."),
    (r"text_model\.embeddings\.position_embedding\.weight$", "text.pos_embed"),
    (r"text_model\.encoder\.layers\.(\d+)\.", r"text.blocks.\1."),
    (r"text_model\.final_layer_norm\.", "text.norm."),
    (r"text_projection\.weight$", "text.proj"),
)
_TRANSPOSED = frozenset({"visual.proj", "text.proj"})  # HF stores them as Linear weights
_DROPPED = re.compile(
    r"^(input_resolution|context_length|vocab_size)$|\.attn_mask$|position_ids$")
"""OpenAI's config scalars and mask attributes, HF's index buffers: not weights."""
_HF_QKV = re.compile(r"^(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str:
    for pattern, replacement in rules:
        new, count = re.subn(f"^{pattern}", replacement, key)
        if count:
            key = new
            break
    for old, new_part in _BLOCK:
        if ".blocks." in key and f".{old}" in key:
            return key.replace(f".{old}", f".{new_part}", 1)
    return key


def clip_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A CLIP file's tensors under our names and shapes, whichever layout it has
    (OpenAI's, Hugging Face's, or ours)."""
    hf = any(k.startswith(("vision_model.", "text_model.")) for k in tensors)
    openai = any(k.startswith(("visual.transformer.", "visual.conv1.")) for k in tensors)
    if not (hf or openai):
        return dict(tensors)
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if _DROPPED.search(key):
            continue
        match = _HF_QKV.match(key) if hf else None
        if match:
            qkv.setdefault((_rename(match.group(1) + ".", _HF), match.group(3)), {})[
                match.group(2)] = value
            continue
        new = _rename(key, _HF if hf else _OPENAI)
        if hf and new in _TRANSPOSED:
            value = value.T
        out[new] = value
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            missing = ", ".join(f"{kind} {p}" for p in "qkv" if p not in parts)
            raise CheckpointError(f"the file's {prefix}self_attn lacks {missing}")
        out[f"{prefix}attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if "visual.cls_token" in out:
        out["visual.cls_token"] = out["visual.cls_token"].reshape(1, 1, -1)
    if "visual.pos_embed" in out and out["visual.pos_embed"].ndim == 2:
        out["visual.pos_embed"] = out["visual.pos_embed"][None]
    return out


def _clip_hint(missing: list[str], unexpected: list[str], own: dict) -> str:
    if any(k.startswith(("cls_token", "blocks.", "patch_embed.")) for k in unexpected):
        return " - a DeiT/ViT file: the CLIP-ES methods need a CLIP file (ViT-B-16.pt)"
    if missing and all(k.startswith("text.") or k == "logit_scale" for k in missing):
        return " - an image encoder only: CLIP-ES needs the text encoder too"
    return " - check model.arch and that the file is CLIP ViT-B/16 (OpenAI or Hugging Face)"


CLIP_LAYOUT = WeightLayout("CLIP", ignored_prefixes=(), ignored_what="none",
                           optional_suffixes=(), convert=clip_tensors, hint=_clip_hint)
