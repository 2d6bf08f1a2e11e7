"""CLIP-ES (Lin et al., CVPR 2023): class maps from a frozen CLIP ViT-B/16, no training.

Per image (the `clip_es` config section holds every setting):
1. Prompts: "a clean origami {}." with each class's text (synonyms comma-separated in
   one text, as CLIP-ES writes them) and background text classes (ground, sky, ...); the
   text features are CLIP's normalised embeddings, computed once.
2. Softmax-GradCAM on the last block: the image runs through all blocks but the last
   without gradients; the last block runs from its first LayerNorm's output (the GradCAM
   activation); the image feature (final LayerNorm, mean over patch tokens, projection)
   is scored against the image's own classes and the background texts by CLIP's scaled
   cosine, softmax over those; for each present class the gradient of its probability
   gives the channel weights (mean over patches), and the map is relu(weights . tokens),
   min-max normalised.
3. Class-aware attention affinity: the patch-to-patch attention, averaged over heads and
   the last 8 blocks, normalised by columns then rows three times (Sinkhorn), made
   symmetric and squared; each class's map is propagated by it within the boxes around
   the regions where its map exceeds 0.4 of its maximum, and min-max normalised again.
4. Pseudo masks: dense CRF (`cpal.refine`'s `crf_clip_es` preset) on [1 - max, maps],
   pixels below 0.95 confidence ignored (`clip_es_crf_labels`).

The image is resized to the next multiple of 16 on each side (CLIP-ES: bicubic on the
8-bit image; here bilinear on the normalised tensor, as every cpal resize) and
re-normalised with CLIP's mean and standard deviation.

`clip-es-cpal` adds the CPAL prototype branch on the frozen features: the CLIP-ES maps
are its CAM, the patch tokens of the chosen blocks its features, and only the branch
trains (docs/method.md, "CPAL on transformer and CLIP bases").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpal.config import ClipEsConfig, Config
from cpal.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from cpal.errors import ConfigError, warn
from cpal.models.cam_net import CAMOutput, MapNorm, build_cpal_module, valid_area
from cpal.models.clip import CLIP, CLIP_ARCHS, CLIP_LAYOUT, CLIP_MEAN, CLIP_STD
from cpal.models.registry import NetworkSpec, register_network
from cpal.models.tokenizer import BPETokenizer
from cpal.models.vit import patch_multiple, vit_spec
from cpal.models.weights import LoadReport, load_weights
from cpal.prototypes.module import CPALModule
from cpal.prototypes.pooling import min_max_normalised

CLIP_ES_TEXTS: dict[str, str] = {
    # VOC names
    "bird": "bird avian", "chair": "chair seat", "person": "person with clothes,people,human",
    "tvmonitor": "tvmonitor screen",
    # COCO 2014's category names (instances_*.json), as CLIP-ES writes them (its VOC-style
    # names for the VOC classes, its typo 'sknowboard' included: it is what it scored)
    "motorcycle": "motorbike", "airplane": "aeroplane", "couch": "sofa",
    "potted plant": "pottedplant", "dining table": "diningtable", "tv": "tvmonitor screen",
    "backpack": "backpack,bag", "umbrella": "umbrella,parasol", "handbag": "handbag,purse",
    "tie": "necktie", "snowboard": "sknowboard", "baseball glove": "glove",
    "spoon": "dessertspoon", "remote": "remote control", "hair drier": "hairdrier,blowdrier",
}
"""A dataset class name -> CLIP-ES's text for it (names not listed are their own text)."""


def class_texts(names: Sequence[str], override: Sequence[str] | None = None) -> list[str]:
    """The text of each foreground class: `clip_es.class_names` when given, else each
    name as CLIP-ES rewrites it."""
    if override is not None:
        if len(override) != len(names):
            raise ConfigError(f"'clip_es.class_names': {len(override)} texts for "
                              f"{len(names)} classes ({', '.join(names)})")
        return list(override)
    return [CLIP_ES_TEXTS.get(n, n) for n in names]


@torch.no_grad()
def text_features(clip: CLIP, tokenizer: BPETokenizer, template: str, texts: Sequence[str],
                  context_length: int) -> Tensor:
    """(len(texts), E) unit text embeddings of `template` filled with each text."""
    tokens = tokenizer.tokenize([template.format(t) for t in texts], context_length)
    features = clip.encode_text(tokens).float()
    return features / features.norm(dim=-1, keepdim=True)


def grad_cam(activation: Tensor, scores: Tensor, classes: Sequence[int], skip: int = 0
             ) -> Tensor:
    """GradCAM of each class in `classes` on `activation` (B, L, D), a leaf that `scores`
    (B, K) were computed from, over its tokens after the first `skip` (CLIP's CLS):
    channel weights = the mean over those N tokens of the gradient of the class's score,
    map = relu(sum over channels of weight x activation): (B, len(classes), N)."""
    maps = []
    tokens = activation[:, skip:].detach()
    for c in classes:
        (grad,) = torch.autograd.grad(scores[:, c].sum(), activation, retain_graph=True)
        weights = grad[:, skip:].mean(dim=1, keepdim=True)
        maps.append(F.relu((tokens * weights).sum(dim=-1)))
    return torch.stack(maps, dim=1)


def attention_affinity(attention: Tensor, iterations: int = 3, squarings: int = 1) -> Tensor:
    """CLIP-ES's transition matrix from patch attention (B, N, N): columns then rows
    normalised to sum 1, `iterations` times; symmetrised; squared `squarings` times."""
    t = attention.float()
    for _ in range(iterations):
        t = t / t.sum(dim=1, keepdim=True).clamp_min(1e-12)
        t = t / t.sum(dim=2, keepdim=True).clamp_min(1e-12)
    t = (t + t.transpose(1, 2)) / 2
    for _ in range(squarings):
        t = t @ t
    return t


def connected_components(binary: Tensor) -> Tensor:
    """8-connected components of each (M, h, w) boolean map: labels 1.. (0: background),
    the largest pixel index + 1 of the component."""
    _, h, w = binary.shape
    index = torch.arange(1, h * w + 1, dtype=torch.float32, device=binary.device)
    labels = torch.where(binary, index.reshape(1, h, w), torch.zeros(()))
    mask = binary.float()
    while True:
        grown = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * mask
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


def box_mask(maps: Tensor, threshold: float) -> Tensor:
    """(M, h, w) maps -> (M, h, w) {0, 1}: the union of the bounding boxes of the
    8-connected regions where a map exceeds `threshold` x its maximum (CLIP-ES's boxes,
    with its cropping: a box spans rows y0 .. min(y_max + 1, h - 1) - 1, so a region
    touching the last row or column loses it; a map without any region gives no box)."""
    m, h, w = maps.shape
    peak = maps.flatten(1).amax(dim=1)[:, None, None]
    labels = connected_components((maps > threshold * peak) & (peak > 0))
    out = torch.zeros_like(maps)
    rows = torch.arange(h, device=maps.device)[:, None].expand(h, w)
    cols = torch.arange(w, device=maps.device)[None, :].expand(h, w)
    for i in range(m):
        for label in torch.unique(labels[i]).tolist():
            if label == 0:
                continue
            where = labels[i] == label
            y0, y1 = int(rows[where].min()), min(int(rows[where].max()) + 1, h - 1)
            x0, x1 = int(cols[where].min()), min(int(cols[where].max()) + 1, w - 1)
            out[i, y0:y1, x0:x1] = 1.0
    return out


def refine_maps(maps: Tensor, affinity: Tensor, present: Tensor, threshold: float) -> Tensor:
    """Class-aware refinement: map_c(i) = sum_j T(i, j) box_c(j) map_c(j), min-max
    normalised; absent classes stay 0. maps (B, C, h, w), affinity (B, N, N)."""
    b, c, h, w = maps.shape
    boxes = box_mask(maps.flatten(0, 1), threshold).reshape(b, c, h * w)
    refined = torch.bmm(maps.flatten(2) * boxes, affinity.transpose(1, 2))
    refined = min_max_normalised(refined.reshape(b, c, h, w), eps=1e-7)
    return refined * present[:, :, None, None].to(refined.dtype)


class ClipEs(nn.Module):
    """CLIP-ES's maps from a frozen CLIP; optionally the CPAL prototype branch on top."""

    align_to_stride = False  # the patch grid is resized straight to the image
    map_norm: MapNorm = "min_max"
    text_features: Tensor
    input_scale: Tensor
    input_shift: Tensor

    def __init__(self, clip: CLIP, texts: Tensor, num_classes: int, settings: ClipEsConfig,
                 feature_blocks: Sequence[int] = (-2,), cpal: CPALModule | None = None
                 ) -> None:
        super().__init__()
        self.clip = clip.requires_grad_(False).eval()
        self.num_classes, self.settings, self.cpal = num_classes, settings, cpal
        self.feature_blocks = clip.visual.feature_blocks(feature_blocks)
        self.register_buffer("text_features", texts, persistent=False)
        # ImageNet-normalised input -> CLIP-normalised: x * scale + shift per channel.
        mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
        scale = torch.from_numpy(IMAGENET_STD) / std
        shift = (torch.from_numpy(IMAGENET_MEAN) - mean) / std
        self.register_buffer("input_scale", scale.reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", shift.reshape(1, 3, 1, 1), persistent=False)
        # The frozen CLIP is never in a checkpoint: it is rebuilt from model.pretrained.
        self.register_state_dict_post_hook(_drop_frozen)
        self.register_load_state_dict_post_hook(_frozen_not_missing)

    @property
    def output_stride(self) -> int:
        return self.clip.visual.spec.patch

    def train(self, mode: bool = True) -> ClipEs:
        super().train(mode)
        self.clip.eval()
        return self

    def forward(self, x: Tensor, labels: Tensor | None = None,
                sample_ids: Tensor | None = None, valid: Tensor | None = None) -> CAMOutput:
        out = self.inference(x, labels)
        if self.cpal is not None and labels is not None:
            out.cpal = self.cpal(out.features, out.cam, labels, sample_ids,
                                 valid_area(valid, out.cam), x)
        return out

    def inference(self, x: Tensor, labels: Tensor | None = None) -> CAMOutput:
        """Maps of the images' classes (B, C, h, w) in `cam` and `maps` (absent classes
        0), zero-shot scores, and the chosen blocks' patch tokens as features."""
        if labels is None:
            raise ValueError("CLIP-ES makes maps of the image's classes: pass its labels")
        # Under torch.inference_mode (map making) GradCAM still needs autograd: inputs are
        # cloned into ordinary tensors inside a grad-enabled region.
        with torch.inference_mode(False), torch.enable_grad():
            return self._maps(x.clone(), labels.clone())

    def _maps(self, x: Tensor, labels: Tensor) -> CAMOutput:
        s, visual, c = self.settings, self.clip.visual, self.num_classes
        x = x * self.input_scale + self.input_shift
        size = (patch_multiple(x.shape[-2], visual.spec.patch),
                patch_multiple(x.shape[-1], visual.spec.patch))
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        depth = visual.depth
        first = depth - min(s.attention_blocks, depth)
        sums: list[Tensor] = []

        def reduce(index: int, weights: Tensor) -> None:
            if index >= first:
                patch = weights.detach().mean(dim=1)[:, 1:, 1:]
                sums[:] = [patch if not sums else sums[0] + patch]

        earlier = [i for i in self.feature_blocks if i < depth - 1]
        with torch.no_grad():
            head = visual(x, blocks=depth - 1, keep=earlier, on_attention=reduce)
        last = visual.blocks[depth - 1]
        tokens = head.tokens.detach()
        activation = last.norm1(tokens).detach().requires_grad_(True)
        out, weights = last.forward_normed(activation, tokens, need_weights=True)
        assert weights is not None
        reduce(depth - 1, weights)
        image = visual.project(out)[:, 1:].mean(dim=1)
        image = image / image.norm(dim=-1, keepdim=True)
        logits = self.clip.logit_scale.exp() * image @ self.text_features.T.to(image.dtype)
        present = labels > 0.5
        keep = torch.cat([present, torch.ones_like(logits[:, c:], dtype=torch.bool)], dim=1)
        probs = logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
        classes = torch.nonzero(present.any(dim=0)).flatten().tolist()
        b, (h, w) = x.shape[0], head.grid
        cams = torch.zeros(b, c, h * w, device=x.device)
        if classes:
            cams[:, classes] = grad_cam(activation, probs, classes, skip=1).float()
        cams = min_max_normalised(cams.reshape(b, c, h, w), eps=1e-7) * present[
            :, :, None, None]
        if s.refine and classes:
            affinity = attention_affinity(sums[0] / min(s.attention_blocks, depth),
                                          s.sinkhorn_iterations, s.affinity_squarings)
            cams = refine_maps(cams, affinity, present, s.box_threshold)
        hidden = {**head.hidden, depth - 1: out.detach()}
        features = [head.patch_map(hidden[i]) for i in self.feature_blocks]
        return CAMOutput(logits=logits[:, :c].detach(), cam=cams, features=features, maps=cams)

    def param_groups(self) -> list[tuple[list[nn.Parameter], str]]:
        """Only the prototype branch trains (CLIP is frozen)."""
        if self.cpal is None:
            return []
        return [([p for p in self.cpal.parameters() if p.requires_grad], "prototype")]


def _drop_frozen(module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
    for key in [k for k in state if k.startswith(f"{prefix}clip.")]:
        del state[key]


def _frozen_not_missing(module: nn.Module, keys: Any) -> None:
    keys.missing_keys[:] = [k for k in keys.missing_keys if not k.startswith("clip.")]


def clip_es_crf_labels(image: np.ndarray, maps: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """CLIP-ES's pseudo mask of one image: the `crf_clip_es` refiner (dense CRF, pixels
    below 0.95 confidence 255) on [1 - max, maps]; maps (K, H, W) in [0, 1] of the image's
    classes `classes` (K,) (dataset indices, 1-based); returns dataset class indices."""
    from cpal.refine import REFINERS

    probs = np.concatenate([1.0 - maps.max(axis=0, keepdims=True, initial=0.0), maps])
    labels = REFINERS.get("crf_clip_es")(image, probs.astype(np.float32))
    lookup = np.concatenate([[0], np.asarray(classes, dtype=np.int64)])
    return np.where(labels == 255, 255, lookup[np.minimum(labels, len(lookup) - 1)])


_RANDOM_WARNED: list[bool] = []


def build_clip_es(config: Config, num_classes: int, *, pretrained: bool = True,
                  class_names: Sequence[str] | None = None) -> tuple[ClipEs, LoadReport | None]:
    """CLIP-ES on `model.arch` from `model.pretrained` (random weights without one, for
    CPU demos: warned) with `clip_es.tokenizer`'s vocabulary."""
    s, path = config.clip_es, config.model.pretrained
    if path and s.tokenizer is None:
        raise ConfigError("'clip_es.tokenizer': required with model.pretrained (the CLIP "
                          "vocabulary): pass clip_es.tokenizer=/path/bpe_simple_vocab_16e6.txt.gz")
    tokenizer = BPETokenizer.from_files(s.tokenizer) if s.tokenizer else BPETokenizer.bytes_only()
    spec = CLIP_ARCHS[config.model.arch].scaled(config.model.width, config.vit.depth)
    spec = dataclasses.replace(spec, vocab_size=tokenizer.vocab_size,
                               context_length=s.context_length)
    spec = dataclasses.replace(spec, vision=vit_spec(config, spec.vision, scaled=False))
    # A random trunk is drawn from the run's seed alone, so that training and inference
    # of clip-es-cpal (which rebuild the frozen trunk) see the same one.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        clip = CLIP(spec)
    report = None
    if pretrained and path:
        report = load_weights(clip, path, CLIP_LAYOUT,
                              allow_leak=config.model.pretrained_allow_leak)
    elif pretrained and not _RANDOM_WARNED:
        _RANDOM_WARNED.append(True)  # once per process: every stage rebuilds the network
        warn("model.pretrained is null: CLIP-ES runs on randomly initialised CLIP weights; "
             "its maps show the pipeline, not CLIP-ES's quality")
    if class_names is None:
        if s.class_names is None:
            raise ConfigError("'clip_es.class_names': the dataset's class names are needed "
                              "for the prompts")
        class_names = s.class_names
    texts = [*class_texts(class_names, s.class_names), *s.background]
    features = text_features(clip, tokenizer, s.template, texts, s.context_length)
    blocks = config.vit.feature_blocks or [-2]
    net = ClipEs(clip, features, num_classes, s, blocks)
    net.cpal = build_cpal_module(config, [spec.vision.dim] * len(blocks), num_classes)
    return net, report


register_network(NetworkSpec("clip_es", build_clip_es, archs=lambda: CLIP_ARCHS,
                             frozen_trunk=True, map_sections=("clip_es",)))
