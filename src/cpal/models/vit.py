"""A Vision Transformer (ViT / DeiT) with timm's parameter names, so DeiT files load by key.

Our own implementation because timm and torchvision do not import with the CPU torch this
project pins. Pre-norm blocks (LayerNorm, multi-head self-attention, LayerNorm, MLP), a
patch embedding by a strided convolution, learned position embeddings and `prefix`
leading tokens (1 CLS token for DeiT and CLIP, one per class for MCTformer).

What the WSSS methods need beyond timm's model:
- other input sizes: the position embeddings of the patch grid are resized (bicubic for
  DeiT/MCTformer, bilinear for CLIP, as their references do) to the grid of the input;
- attention maps: each block can report its softmax attention (B, heads, L, L) to a
  callback as it runs, so a caller keeps the reductions it needs (MCTformer sums over
  blocks) without holding every block's maps;
- intermediate tokens: the outputs of chosen blocks, and running only the first blocks
  (CLIP-ES runs the last block separately, under autograd).

The same blocks serve CLIP's text transformer (`run_blocks` with a causal mask).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpal.config import Config
from cpal.errors import ConfigError
from cpal.models.weights import WeightLayout
from cpal.registry import Registry

Activation = Literal["gelu", "quick_gelu"]
Interpolation = Literal["bicubic", "bilinear"]
AttentionCallback = Callable[[int, Tensor], None]
"""(block index, softmax attention (B, heads, L, L)) as each block runs."""


@dataclass(frozen=True)
class ViTSpec:
    """The shape of a transformer trunk; `scaled` makes CPU-sized variants of it."""

    dim: int
    depth: int
    heads: int
    patch: int = 16
    mlp_ratio: float = 4.0
    image_size: int = 224
    """Input side the position embeddings were made for (grid image_size / patch)."""
    eps: float = 1e-6
    """LayerNorm epsilon: timm's DeiT 1e-6, CLIP 1e-5."""
    act: Activation = "gelu"
    """exact GELU (DeiT) or CLIP's x * sigmoid(1.702 x)."""
    qkv_bias: bool = True
    patch_bias: bool = True
    """CLIP's patch convolution has no bias."""
    pre_norm: bool = False
    """A LayerNorm on the embedded tokens before the blocks (CLIP's ln_pre)."""
    interpolation: Interpolation = "bicubic"

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by {self.heads} heads")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    def scaled(self, width: float = 1.0, depth: int | None = None) -> ViTSpec:
        """Same heads, head width x `width` (at least 1); `depth` blocks when given."""
        head_dim = max(1, round(self.dim // self.heads * width))
        return dataclasses.replace(self, dim=head_dim * self.heads,
                                   depth=self.depth if depth is None else depth)


VIT_ARCHS: Registry[ViTSpec] = Registry("transformer arch")
"""DeiT/ViT trunks by name (`model.arch` of the MCTformer methods)."""
VIT_ARCHS.register("deit_tiny", ViTSpec(dim=192, depth=12, heads=3))
VIT_ARCHS.register("deit_small", ViTSpec(dim=384, depth=12, heads=6), aliases=("deit_s",))
VIT_ARCHS.register("deit_base", ViTSpec(dim=768, depth=12, heads=12), aliases=("deit_b",))


class QuickGELU(nn.Module):
    """CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(name: Activation) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class DropPath(nn.Module):
    """Stochastic depth (DeiT trains with it): drop a sample's residual branch with
    probability p, scale kept ones by 1 / (1 - p)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention with timm's names (qkv: q, k, v stacked in that order,
    as CLIP's in_proj_weight)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None, need_weights: bool = False
                ) -> tuple[Tensor, Tensor | None]:
        """x (B, L, D); mask: additive (L, L); returns (output, attention (B, H, L, L) or
        None). Without weights the fused kernel runs; both paths compute the same maths."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = None
        if need_weights:
            scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d)), weights


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: Activation) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = _activation(act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """x + attn(norm1(x)), then + mlp(norm2(x)) (timm's and CLIP's block)."""

    def __init__(self, spec: ViTSpec, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.dim, eps=spec.eps)
        self.attn = Attention(spec.dim, spec.heads, spec.qkv_bias)
        self.norm2 = nn.LayerNorm(spec.dim, eps=spec.eps)
        self.mlp = Mlp(spec.dim, int(spec.dim * spec.mlp_ratio), spec.act)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, mask: Tensor | None = None, need_weights: bool = False
                ) -> tuple[Tensor, Tensor | None]:
        return self.forward_normed(self.norm1(x), x, mask, need_weights)

    def forward_normed(self, normed: Tensor, x: Tensor, mask: Tensor | None = None,
                       need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """The block from norm1(x) on: GradCAM on CLIP-ES's last block differentiates
        with respect to norm1's output, so the caller may compute it itself."""
        out, weights = self.attn(normed, mask, need_weights)
        x = x + self.drop_path(out)
        return x + self.drop_path(self.mlp(self.norm2(x))), weights


def run_blocks(
    blocks: Sequence[Block], x: Tensor, *, mask: Tensor | None = None,
    on_attention: AttentionCallback | None = None, keep: Sequence[int] = (),
    start: int = 0,
) -> tuple[Tensor, dict[int, Tensor]]:
    """Run `blocks` in order (their indices counted from `start`); return the last
    output and the outputs of the blocks in `keep` (indices, by block)."""
    kept: dict[int, Tensor] = {}
    for offset, block in enumerate(blocks):
        index = start + offset
        x, weights = block(x, mask, need_weights=on_attention is not None)
        if on_attention is not None:
            assert weights is not None
            on_attention(index, weights)
        if index in keep:
            kept[index] = x
    return x, kept


class PatchEmbed(nn.Module):
    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.patch = spec.patch
        self.proj = nn.Conv2d(3, spec.dim, spec.patch, stride=spec.patch, bias=spec.patch_bias)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(B, N, D) tokens in row-major order and the grid (h, w): floor(H / patch) x
        floor(W / patch), as a strided convolution leaves it."""
        f = self.proj(x)
        return f.flatten(2).transpose(1, 2), (f.shape[-2], f.shape[-1])


def resize_pos_embed(pos: Tensor, prefix: int, old: tuple[int, int], new: tuple[int, int],
                     mode: Interpolation) -> Tensor:
    """(1, prefix + oh*ow, D) -> (1, prefix + nh*nw, D): the patch positions resized as
    an image (align_corners false, as timm, MCTformer and CLIP-ES do), prefix kept."""
    if tuple(old) == tuple(new):
        return pos
    head, grid = pos[:, :prefix], pos[:, prefix:]
    d = grid.shape[-1]
    grid = grid.reshape(1, old[0], old[1], d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=new, mode=mode, align_corners=False).to(pos.dtype)
    return torch.cat([head, grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], d)], dim=1)


@dataclass
class ViTOutput:
    tokens: Tensor
    """(B, prefix + h*w, D) output of the last block run (before the final norm)."""
    grid: tuple[int, int]
    prefix: int
    hidden: dict[int, Tensor] = field(default_factory=dict)
    """Outputs of the blocks asked for (`keep`), by block index."""
    attentions: list[Tensor] | None = None
    """Per block, (B, heads, L, L), when asked for (`return_attention`)."""

    def patch_map(self, tokens: Tensor | None = None) -> Tensor:
        """Patch tokens (B, L, D) -> a feature map (B, D, h, w)."""
        x = self.tokens if tokens is None else tokens
        b, _, d = x.shape
        return x[:, self.prefix:].transpose(1, 2).reshape(b, d, *self.grid)


class VisionTransformer(nn.Module):
    """ViT/DeiT trunk with timm's keys: cls_token, pos_embed, patch_embed.proj,
    blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm (and norm_pre
    for CLIP). ImageNet's `head` is not part of the trunk."""

    def __init__(self, spec: ViTSpec, *, prefix: int = 1, drop_path: float = 0.0) -> None:
        super().__init__()
        self.spec, self.prefix = spec, prefix
        self.patch_embed = PatchEmbed(spec)
        self.cls_token = nn.Parameter(torch.zeros(1, prefix, spec.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, prefix + spec.grid ** 2, spec.dim))
        self.norm_pre = nn.LayerNorm(spec.dim, eps=spec.eps) if spec.pre_norm else None
        rates = torch.linspace(0, drop_path, spec.depth).tolist() if spec.depth else []
        self.blocks = nn.ModuleList(Block(spec, rate) for rate in rates)
        self.norm = nn.LayerNorm(spec.dim, eps=spec.eps)
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's init: truncated normal (std 0.02) for tokens, positions and linear
        layers, zero biases (from-scratch runs; pretrained files overwrite it)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def block_index(self, index: int) -> int:
        """A block index counted from the end when negative (-1: the last block)."""
        resolved = index + self.depth if index < 0 else index
        if not 0 <= resolved < self.depth:
            raise ValueError(f"block {index} does not exist in a {self.depth}-block trunk")
        return resolved

    def feature_blocks(self, blocks: Sequence[int]) -> tuple[int, ...]:
        """`vit.feature_blocks` resolved, or a ConfigError naming the key."""
        try:
            return tuple(self.block_index(b) for b in blocks)
        except ValueError as exc:
            raise ConfigError(f"'vit.feature_blocks': {exc}") from None

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch tokens with the prefix tokens in front, plus position embeddings
        resized to this input's grid."""
        tokens, grid = self.patch_embed(x)
        g = self.spec.grid
        pos = resize_pos_embed(self.pos_embed, self.prefix, (g, g), grid, self.spec.interpolation)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype),
                            tokens], dim=1)
        tokens = tokens + pos.to(tokens.dtype)
        if self.norm_pre is not None:
            tokens = self.norm_pre(tokens)
        return tokens, grid

    def forward(
        self, x: Tensor, *, keep: Sequence[int] = (), on_attention: AttentionCallback | None = None,
        return_attention: bool = False, blocks: int | None = None,
    ) -> ViTOutput:
        """Run the first `blocks` blocks (all when None) on images x (B, 3, H, W).

        keep: block indices (negative from the end) whose outputs to return;
        on_attention / return_attention: each block's softmax attention to a callback,
        or collected in the output."""
        tokens, grid = self.embed(x)
        collected: list[Tensor] = []
        callback = on_attention
        if return_attention:
            def callback(index: int, weights: Tensor) -> None:
                collected.append(weights)
                if on_attention is not None:
                    on_attention(index, weights)
        count = self.depth if blocks is None else blocks
        wanted = [self.block_index(i) for i in keep]
        tokens, hidden = run_blocks(self.blocks[:count], tokens, on_attention=callback,
                                    keep=wanted)
        hidden = {i: hidden[self.block_index(i)] for i in keep if self.block_index(i) in hidden}
        return ViTOutput(tokens, grid, self.prefix, hidden,
                         collected if return_attention else None)


def vit_spec(config: Config, arch: ViTSpec, *, scaled: bool = True) -> ViTSpec:
    """`arch` at `model.width` and `vit.depth` (unless already `scaled`), with `vit`'s
    input and patch sizes."""
    spec = arch.scaled(config.model.width, config.vit.depth) if scaled else arch
    v = config.vit
    return dataclasses.replace(spec, image_size=v.image_size or spec.image_size,
                               patch=v.patch_size or spec.patch)


def patch_multiple(size: int, patch: int) -> int:
    """The smallest multiple of `patch` >= size (CLIP-ES resizes images to it)."""
    return int(math.ceil(size / patch) * patch)


# ---------------------------------------------------------------------------------------
# timm DeiT files


def deit_layout(model: VisionTransformer) -> WeightLayout:
    """timm DeiT/ViT files (`deit_small_patch16_224-cd65a155.pth`, `{"model": ...}`,
    152 keys for DeiT-S) onto `model`: the ImageNet `head` is ignored; the CLS token and
    its position are repeated for each of the model's prefix tokens (MCTformer's class
    tokens start as copies of CLS), and the patch positions are resized to the model's
    grid when the file was made for another input size."""

    def convert(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        out = dict(tensors)
        cls, pos = out.get("cls_token"), out.get("pos_embed")
        if cls is not None and cls.ndim == 3 and cls.shape[1] == 1:
            out["cls_token"] = cls.expand(1, model.prefix, cls.shape[-1]).clone()
        if pos is not None and pos.ndim == 3:
            n = pos.shape[1] - 1
            side = math.isqrt(n)
            if side * side == n and n > 0:
                g = model.spec.grid
                grid = resize_pos_embed(pos, 1, (side, side), (g, g), "bicubic")
                head = grid[:, :1].expand(1, model.prefix, grid.shape[-1])
                out["pos_embed"] = torch.cat([head, grid[:, 1:]], dim=1).clone()
        return out

    def hint(missing: list[str], unexpected: list[str], own: dict) -> str:
        if any(k.startswith(("dist_token", "head_dist.")) for k in unexpected):
            return (" - a distilled DeiT file (dist_token, head_dist): use the plain "
                    "deit_*_patch16_224 files")
        if any(k.startswith(("conv1.", "layer1.")) for k in unexpected):
            return " - a ResNet file: the MCTformer methods need a DeiT/ViT file"
        return " - check model.arch against the file (deit_tiny/small/base)"

    return WeightLayout("timm DeiT", ignored_prefixes=("head.",),
                        ignored_what="ImageNet head", optional_suffixes=(), convert=convert,
                        hint=hint)
