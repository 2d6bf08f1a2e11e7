"""Typed run configuration: YAML files plus `KEY=VALUE` overrides, validated against a schema.

The schema is a tree of dataclasses. Loading converts each value to the declared type and
rejects unknown keys naming the valid ones, so that a typo fails before hours of training
instead of being silently ignored; each section's `validate` then checks the ranges types
cannot express, next to its fields.

A config file may name `_base_:` (a path relative to it, or a list of them): the bases
are merged in order, then the file over them, mappings key by key and anything else
(lists included) replaced, so that an overlay states only what differs
(`read_config_tree`; docs/development.md).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from cpal.errors import ConfigError
from cpal.methods import DEFAULT_METHOD, MAP_KINDS, METHODS, method_spec

BASE_KEY = "_base_"


def need(ok: bool, key: str, message: str) -> None:
    """Raise ConfigError("'KEY': MESSAGE") unless `ok`: the form of every range check."""
    if not ok:
        raise ConfigError(f"'{key}': {message}")


@dataclass
class SyntheticConfig:
    """The built-in procedural dataset (used when `data.root` is null)."""

    family: Literal["parts", "attributes"] = "parts"
    """parts: a class is told only by its small part (bodies share every appearance);
    attributes: bodies also carry class appearance modes (docs/datasets.md)."""
    seed: int = 0
    num_train: int = 2000
    num_val: int = 500
    image_size: int = 128

    def validate(self, at: str) -> None:
        from cpal.data.synthetic import MIN_IMAGE_SIZE  # the generator's own limit

        need(self.num_train >= 1 and self.num_val >= 1, at, "needs >= 1 image per split")
        need(self.image_size >= MIN_IMAGE_SIZE, f"{at}.image_size",
             f"must be >= {MIN_IMAGE_SIZE}")


@dataclass
class DataConfig:
    root: str | None = None
    """A dataset in VOC layout; null selects the built-in synthetic dataset."""
    cache_dir: str | None = None
    """Where the built-in dataset is generated; null: $CPAL_CACHE or ~/.cache/cpal."""
    require_root: bool = False
    """Refuse a null `root` (paper configs): a null root selects the synthetic dataset,
    which a run meant for VOC or COCO must never train on silently."""
    train_split: str = "train"
    min_long_side: int | None = None
    """Upscale small images: when the training images' median long side is below this,
    every image is enlarged by one factor (this / that median) in training (the auto crop
    and resize_long follow) and at inference (infer.scales are multiplied by it), so that
    the trunk's stem and receptive field leave room to localise (docs/results.md, "Recipe
    check"). null: images at their own size."""
    num_workers: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self, at: str) -> None:
        need(self.root is not None or not self.require_root, f"{at}.root",
             "required by this config (data.require_root=true): pass data.root=/path/to/dataset")
        need(self.num_workers >= 0, f"{at}.num_workers", "must be >= 0")
        need(self.min_long_side is None or self.min_long_side >= 16, f"{at}.min_long_side",
             "must be >= 16 or null")
        self.synthetic.validate(f"{at}.synthetic")


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    """A registered trunk of the method's network: a backbone (`BACKBONES`:
    resnet18/34/50/101) for the CAM network, a DeiT (`VIT_ARCHS`: deit_tiny/small/base)
    for MCTformer, a CLIP model (`CLIP_ARCHS`: clip_vit_b16) for CLIP-ES."""
    width: float = 1.0
    """Channel multiplier of the trunk (1.0 = the published widths; <1 for CPU-sized runs;
    a transformer keeps its heads and narrows each)."""
    output_stride: Literal[8, 16] = 16
    frozen_bn: bool = True
    """BatchNorm running statistics never update (affine parameters still train)."""
    frozen_stages: int = 0
    """0: train everything; 1: freeze the stem; 2: + layer1; 3: + layer2 (IRN/SIPE)."""
    pretrained: str | None = None
    """A local weight file of the trunk, loaded by key: torchvision/timm ResNet, timm
    DeiT, OpenAI CLIP (`ViT-B-16.pt`) or Hugging Face CLIP (`model.safetensors`)."""
    require_pretrained: bool = False
    """Refuse a null `pretrained` (the CLIP-ES configs: maps of random weights mean
    nothing, and training-free methods have nothing else to start from)."""
    pretrained_allow_leak: bool = False
    """Acknowledge a `pretrained` file that looks trained on VOC/COCO pixel labels: the
    warning becomes a printed note (results are then not weakly supervised)."""

    def validate(self, at: str) -> None:
        from cpal.models.registry import check_arch  # builds torch modules: imported on use

        self.arch = check_arch(self.arch, f"{at}.arch")
        need(self.pretrained is not None or not self.require_pretrained, f"{at}.pretrained",
             "required by this config (model.require_pretrained=true): pass "
             "model.pretrained=/path/to/the/weights")
        need(self.width > 0, f"{at}.width", "must be > 0")
        need(0 <= self.frozen_stages <= 3, f"{at}.frozen_stages", "must be 0, 1, 2 or 3")


@dataclass
class PrototypeConfig:
    """Embedding head, seeds and instance prototypes (docs/method.md, steps 2-3).

    Defaults reproduce SIPE's official code; every earlier choice of this library is a
    switch, so the ablation can show what each costs (docs/results.md)."""

    features: Literal["hierarchical", "layer4"] = "hierarchical"
    """SIPE's hierarchical feature (side convs on every stage, concatenated), or the last
    stage's side conv alone."""
    projection: int | None = None
    """null: no projection (SIPE: cosine on the raw concatenation); D: a learned 1x1 conv to
    D dims, then unit length (the earlier choice, 256)."""
    head_init: Literal["default", "kaiming"] = "default"
    """Side-conv initialisation: PyTorch's default (SIPE) or Kaiming fan-out (earlier)."""
    align_corners: bool = False
    """Bilinear resize of the side features (SIPE: false; earlier: true)."""
    lr_mult: float | None = None
    """Learning-rate multiplier of the prototype branch (relative to train.lr); null uses
    train.head_lr_mult, as SIPE trains its side convs with the classifier's 10x."""
    region: Literal["sipe_seeds", "threshold"] = "sipe_seeds"
    """sipe_seeds: the whole image is split between background and present classes by the
    seed rule; threshold: CAM > tau (and 1 - max CAM > tau_bg for the background)."""
    seed_source: Literal["affinity_iou", "pcm"] = "affinity_iou"
    """affinity_iou (SIPE): a pixel goes to the channel whose map best matches its feature
    affinity row; pcm (SFC): argmax of the CAM refined by a learned pixel-correlation
    module, which then also replaces the CAM in L_self."""
    seed_features: Literal["layer4", "hierarchical"] = "layer4"
    """Features of the training seeds' affinity (SIPE: the last backbone stage)."""
    infer_seed_features: Literal["hierarchical", "layer4"] = "hierarchical"
    """Features of the inference seeds' affinity (SIPE: the hierarchical feature; the
    earlier choice: layer4)."""
    bg_factor: float = 0.5
    """Background score factor of the seed argmax (SIPE 0.5, SFC 0.3)."""
    background_from: Literal["all", "present"] = "all"
    """Background = 1 - max over all foreground maps (SIPE) or over present classes only."""
    empty_region: Literal["zero", "cam"] = "zero"
    """An empty region gives a zero prototype (SIPE) or CAM-weighted pooling (earlier)."""
    mask_padding: bool = True
    """Zero every CAM channel on the padding of a training crop, so padding is neither seed
    nor target (SIPE's valid mask); false counts padding as image (earlier)."""
    tau: float = 0.5
    """Foreground region of `region: threshold`: normalised CAM > tau."""
    tau_bg: float = 0.5
    """Background region of `region: threshold`: 1 - max_c CAM > tau_bg."""
    normalize: bool = True
    """Unit-length instance prototypes in the bank and k-means centroids. false keeps the raw
    masked mean of unit embeddings, whose norm (<= 1) measures how consistent the region
    is, so that `awareness.score: dot` differs from `cosine`. p* and PACAM are cosine-based
    either way."""

    def validate(self, at: str) -> None:
        need(self.projection is None or self.projection >= 1, f"{at}.projection",
             "must be >= 1 or null")
        need(self.lr_mult is None or self.lr_mult > 0, f"{at}.lr_mult", "must be > 0 or null")
        need(self.bg_factor >= 0, f"{at}.bg_factor", "must be >= 0")
        need(0 <= self.tau < 1, f"{at}.tau", "must be in [0, 1)")
        need(0 <= self.tau_bg < 1, f"{at}.tau_bg", "must be in [0, 1)")


@dataclass
class BankConfig:
    """Support bank of past instance prototypes and its context clusters (steps 4-5)."""

    size: int = 512
    """FIFO capacity per class (background included)."""
    recluster_every: int = 50
    clusters: int = 16
    """Spherical k-means centroids per class; 0 uses the raw queue entries."""
    kmeans_iters: int = 10

    def validate(self, at: str) -> None:
        need(self.size >= 1, f"{at}.size", "must be >= 1")
        need(self.recluster_every >= 1, f"{at}.recluster_every", "must be >= 1")
        need(0 <= self.clusters <= self.size, f"{at}.clusters", "must be in [0, bank.size]")
        need(self.kmeans_iters >= 1, f"{at}.kmeans_iters", "must be >= 1")


@dataclass
class AwarenessConfig:
    """Prototype awareness: positiveness, top-K soft selection (step 6)."""

    score: Literal["dot", "cosine", "l2"] = "dot"
    top_k: int = 5
    temperature: float = 0.1
    alpha: float = 0.5
    """Weight of the selected context in the context-aware prototype."""
    background: Literal["context", "instance"] = "context"
    """`context`: the background channel gets context (and the alignment shift) like every
    class, from its own queue (the method page's design). `instance`: it keeps the image's
    own background prototype, as SIPE's, and only the classes get context: a background
    averaged over other images is the part of context the paper does not describe."""

    def validate(self, at: str) -> None:
        need(self.top_k >= 1, f"{at}.top_k", "must be >= 1")
        need(self.temperature > 0, f"{at}.temperature", "must be > 0")
        need(0 <= self.alpha <= 1, f"{at}.alpha", "must be in [0, 1]")


@dataclass
class AlignmentConfig:
    """Feature distribution alignment (step 7)."""

    beta: float = 1.0
    loss_weight: float = 0.0
    """Weight of the optional compactness loss L_fda (0 = off)."""

    def validate(self, at: str) -> None:
        need(self.beta >= 0, f"{at}.beta", "must be >= 0")
        need(self.loss_weight >= 0, f"{at}.loss_weight", "must be >= 0")


@dataclass
class VitConfig:
    """Transformer trunks (the MCTformer and CLIP-ES networks; CAM networks ignore it)."""

    depth: int | None = None
    """Blocks of the trunk (null: the arch's own, 12); CPU demos use fewer."""
    drop_path: float = 0.0
    """Stochastic depth rate of the last block (linear from 0; DeiT / MCTformer: 0.1)."""
    image_size: int | None = None
    """Input side the position embeddings are made for (null: the arch's, 224); a
    pretrained file's grid is resized to it on load, other inputs at run time."""
    patch_size: int | None = None
    """Side of a patch in pixels (null: the arch's, 16); smaller patches give a finer map
    for small images (CPU demos); pretrained files fix it."""
    feature_blocks: list[int] | None = None
    """Blocks whose patch tokens feed the prototype branch (negative: from the end);
    null: the network's own (MCTformer: the last block [-1], as its patch CAM; CLIP-ES:
    the input of the last block [-2], the tokens its GradCAM reads)."""

    def validate(self, at: str) -> None:
        need(self.depth is None or self.depth >= 1, f"{at}.depth", "must be >= 1 or null")
        need(0 <= self.drop_path < 1, f"{at}.drop_path", "must be in [0, 1)")
        need(self.image_size is None or self.image_size >= 16, f"{at}.image_size",
             "must be >= 16 or null")
        need(self.patch_size is None or self.patch_size >= 1, f"{at}.patch_size",
             "must be >= 1 or null")
        need(self.feature_blocks is None or len(self.feature_blocks) >= 1,
             f"{at}.feature_blocks", "must name at least one block, or be null")


@dataclass
class MCTformerConfig:
    """MCTformer-V2's maps (Xu et al., CVPR 2022; docs/transformers.md): what `infer`
    makes from the trained network. Training does not read it."""

    fusion: Literal["fused", "attention", "patch_cam"] = "fused"
    """fused: class-to-patch attention x relu(patch CAM) (V2); attention: the attention
    alone (V1's map); patch_cam: relu(patch CAM) alone."""
    class_attention_blocks: int = 3
    """Class-to-patch attention (mean over heads) summed over the last K blocks (3)."""
    patch_refine: bool = True
    """Refine the maps by the patch-to-patch attention (their --patch-attn-refine)."""
    refine_blocks: int | None = None
    """Patch-to-patch attention summed over the last K blocks; null: all of them (the
    reference sums every block)."""

    def validate(self, at: str) -> None:
        need(self.class_attention_blocks >= 1, f"{at}.class_attention_blocks", "must be >= 1")
        need(self.refine_blocks is None or self.refine_blocks >= 1, f"{at}.refine_blocks",
             "must be >= 1 or null")


CLIP_ES_BACKGROUND = [
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river",
    "sea", "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean",
    "road", "rock", "street", "valley", "bridge", "sign",
]
"""CLIP-ES's background text classes for VOC (COCO's list drops keyboard and sign)."""


@dataclass
class ClipEsConfig:
    """CLIP-ES's maps (Lin et al., CVPR 2023; docs/transformers.md): prompts, softmax
    GradCAM and the class-aware attention affinity refinement."""

    tokenizer: str | None = None
    """The BPE vocabulary: OpenAI's bpe_simple_vocab_16e6.txt.gz, or Hugging Face's
    vocab.json (with merges.txt beside it), or a folder holding either; null: bytes only
    (no merges), which suits randomly initialised text encoders only."""
    template: str = "a clean origami {}."
    """The prompt; {} is replaced by each class's text."""
    class_names: list[str] | None = None
    """Text of each foreground class in the dataset's order (synonyms comma-separated,
    as CLIP-ES writes 'person with clothes,people,human'); null: the dataset's names, with
    CLIP-ES's texts for the VOC and COCO names it rewrites."""
    background: list[str] = field(default_factory=lambda: list(CLIP_ES_BACKGROUND))
    """Background text classes, competing with the image's classes in the softmax."""
    context_length: int = 77
    attention_blocks: int = 8
    """The affinity is the mean over heads and over the last K blocks of the patch-to-
    patch attention (8)."""
    refine: bool = True
    """Apply the class-aware attention affinity refinement (else the GradCAM alone)."""
    box_threshold: float = 0.4
    """A class's refinement is confined to the boxes around the regions where its map
    exceeds this fraction of its maximum."""
    sinkhorn_iterations: int = 3
    """Rounds of column-then-row normalisation of the affinity (3)."""
    affinity_squarings: int = 1
    """The symmetrised affinity is squared this many times (1: T @ T)."""

    def validate(self, at: str) -> None:
        need("{}" in self.template, f"{at}.template", "must contain {} for the class text")
        need(self.class_names is None or all(n.strip() for n in self.class_names),
             f"{at}.class_names", "names must not be empty")
        need(self.context_length >= 3, f"{at}.context_length", "must be >= 3")
        need(self.attention_blocks >= 1, f"{at}.attention_blocks", "must be >= 1")
        need(0 <= self.box_threshold < 1, f"{at}.box_threshold", "must be in [0, 1)")
        need(self.sinkhorn_iterations >= 1, f"{at}.sinkhorn_iterations", "must be >= 1")
        need(self.affinity_squarings >= 0, f"{at}.affinity_squarings", "must be >= 0")


@dataclass
class LossConfig:
    self_weight: float = 1.0
    """lambda_self: weight of |CAM - PACAM| (step 9)."""
    self_average: Literal["all", "present"] = "all"
    """all (SIPE): mean over every channel and pixel of the batch (absent classes are 0 - 0);
    present: over the background and present-class channels only (earlier; about
    (C+1)/(1+#present) times heavier)."""
    self_detach_cam: bool = False
    """Stop L_self's gradient into the CAM (only the prototype branch learns from it).
    false = SIPE's GSC (both branches), the method page's default."""

    def validate(self, at: str) -> None:
        need(self.self_weight >= 0, f"{at}.self_weight", "must be >= 0")


Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class TrainConfig:
    epochs: int = 5
    """Passes over the training split (ignored when `steps` is set)."""
    steps: int | None = None
    """Optimizer steps of the whole run; null: epochs x steps per epoch. Set, the run takes
    ceil(steps / steps per epoch) whole epochs, so a small dataset gets as many updates as
    a large one (a schedule in steps, not in epochs)."""
    batch_size: int = 16
    """The GLOBAL batch: images per optimizer step, summed over processes and micro-batches."""
    grad_accum: int = 1
    """Micro-batches per optimizer step: each process runs batch_size / (processes *
    grad_accum) images at a time and the gradients add up to the global batch's."""
    precision: Precision = "fp32"
    """Autocast dtype of forward passes: fp32 (off), bf16, or fp16 (with a gradient scaler)."""
    channels_last: bool = False
    """NHWC memory layout for the network and its inputs (faster convolutions on tensor cores)."""
    crop_size: int | Literal["auto"] = 512
    """Square training crop; auto: the median long side of the training images, rounded up
    to a multiple of 16 (each image is seen whole at its own scale)."""
    resize_long: list[int] | Literal["auto"] = field(default_factory=lambda: [320, 640])
    """Random resize: the long side is drawn uniformly from [min, max]; auto: [0.875, 1.25]
    x the median long side of the training images."""
    hflip: bool = True
    optimizer: str = "sgd"
    """A registered optimizer (`cpal.engine.optim.OPTIMIZERS`): sgd (the references':
    momentum below), adam (betas 0.9/0.999, weight decay as L2 in the gradient, like
    torch.optim.Adam) or adamw (decoupled weight decay: DeiT's and MCTformer's)."""
    schedule: str = "poly"
    """A registered schedule (`cpal.engine.optim.SCHEDULES`), per optimizer step: poly
    (IRN/SIPE: lr (1 - step/total)^poly_power) or cosine (timm's: down to min_lr)."""
    lr: float = 0.1
    """Backbone learning rate; the classifier uses lr * head_lr_mult."""
    lr_reference_batch: int | None = None
    """The batch `lr` is stated for: the run uses lr x batch_size / this (DeiT's linear
    scaling, 512: MCTformer's 5e-4 at batch 64 is 6.25e-5); null: lr as is."""
    head_lr_mult: float = 10.0
    momentum: float = 0.0
    """The references' SGD wrapper passed weight decay into the momentum slot, so their
    published numbers used (almost) no momentum; 0.9 is the usual choice elsewhere."""
    weight_decay: float = 1e-4
    decay_norm_and_bias: bool = True
    """Weight decay on every parameter (the references' SGD); false exempts 1-d tensors
    (norms, biases) and the token / position embeddings, as timm's AdamW recipe does."""
    poly_power: float = 0.9
    warmup_epochs: float = 0.0
    """Linear warm-up from warmup_lr to the learning rate over this many epochs (DeiT /
    MCTformer: 5); 0: none."""
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    """Where the cosine schedule ends (timm / MCTformer: 1e-5)."""
    grad_clip: float | None = None
    checkpoint_every: int = 1
    """Epochs between checkpoints (the last epoch is always saved)."""
    checkpoint_every_steps: int | None = None
    """Also checkpoint every N optimizer steps inside an epoch (null: epoch ends only), so
    a run killed mid-epoch loses at most N steps."""
    keep_checkpoints: int = 2
    resume: bool = True
    """Continue from the newest complete checkpoint in output_dir when one exists."""
    log_every: int = 20

    def validate(self, at: str) -> None:
        need(self.crop_size == "auto" or self.crop_size >= 16, f"{at}.crop_size",
             "must be >= 16 or auto")
        need(self.resize_long == "auto"
             or (len(self.resize_long) == 2 and 0 < self.resize_long[0] <= self.resize_long[1]),
             f"{at}.resize_long", "must be [min, max] with 0 < min <= max, or auto")
        from cpal.engine.optim import OPTIMIZERS  # torch: imported on use

        self.optimizer = OPTIMIZERS.check(self.optimizer, f"{at}.optimizer")
        need(self.lr_reference_batch is None or self.lr_reference_batch >= 1,
             f"{at}.lr_reference_batch", "must be >= 1 or null")
        need(self.head_lr_mult > 0, f"{at}.head_lr_mult", "must be > 0")
        validate_schedule(self, at)


def validate_schedule(t: TrainConfig | StageTrainConfig, at: str) -> None:
    """The checks of the fields the shared trainer reads, for every training section."""
    need(t.epochs >= 1, f"{at}.epochs", "must be >= 1")
    need(t.steps is None or t.steps >= 1, f"{at}.steps", "must be >= 1 or null")
    need(t.batch_size >= 1, f"{at}.batch_size", "must be >= 1")
    need(t.lr > 0, f"{at}.lr", "must be > 0")
    need(0 <= t.momentum < 1, f"{at}.momentum", "must be in [0, 1)")
    need(t.weight_decay >= 0, f"{at}.weight_decay", "must be >= 0")
    need(t.poly_power >= 0, f"{at}.poly_power", "must be >= 0")
    from cpal.engine.optim import SCHEDULES  # torch: imported on use

    t.schedule = SCHEDULES.check(t.schedule, f"{at}.schedule")
    need(t.warmup_epochs >= 0, f"{at}.warmup_epochs", "must be >= 0")
    need(t.warmup_lr >= 0, f"{at}.warmup_lr", "must be >= 0")
    need(t.min_lr >= 0, f"{at}.min_lr", "must be >= 0")
    need(t.grad_clip is None or t.grad_clip > 0, f"{at}.grad_clip", "must be > 0 or null")
    need(t.grad_accum >= 1, f"{at}.grad_accum", "must be >= 1")
    need(t.batch_size % t.grad_accum == 0, f"{at}.batch_size",
         f"{t.batch_size} is not divisible by {at}.grad_accum ({t.grad_accum})")
    need(t.checkpoint_every >= 1, f"{at}.checkpoint_every", "must be >= 1")
    need(t.checkpoint_every_steps is None or t.checkpoint_every_steps >= 1,
         f"{at}.checkpoint_every_steps", "must be >= 1 or null")
    need(t.keep_checkpoints >= 1, f"{at}.keep_checkpoints", "must be >= 1")
    need(t.log_every >= 1, f"{at}.log_every", "must be >= 1")


@dataclass
class StageTrainConfig:
    """The schedule of a network trained after the CAM network on its outputs (IRN's
    boundary branch on IR labels, the segmentation network on pseudo masks): the fields
    the shared trainer reads, plus the random scale / flip / crop of the training images
    and their labels. Each section states its reference recipe as its default."""

    epochs: int = 1
    """Passes over the training split (ignored when `steps` is set)."""
    steps: int | None = None
    """Optimizer steps of the whole run, rounded up to whole epochs (as train.steps)."""
    batch_size: int = 8
    """The global batch (images per optimizer step over processes and micro-batches)."""
    grad_accum: int = 1
    precision: Precision = "fp32"
    channels_last: bool = False
    crop_size: int = 512
    """Square training crop; smaller images are padded (image: the mean colour, label:
    ignore)."""
    scale_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    """Random rescale of each image (and its labels) by a factor drawn from [min, max]."""
    hflip: bool = True
    lr: float = 0.01
    """Base learning rate; each network's parameter groups scale it (IRN: displacement
    branch x10; DeepLab-v2: ASPP weights x10, biases x20)."""
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "poly"
    """As train.schedule: poly (the references') or cosine."""
    poly_power: float = 0.9
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    grad_clip: float | None = None
    checkpoint_every: int = 1
    checkpoint_every_steps: int | None = None
    keep_checkpoints: int = 2
    resume: bool = True
    log_every: int = 20

    def validate(self, at: str) -> None:
        need(self.crop_size >= 16, f"{at}.crop_size", "must be >= 16")
        need(len(self.scale_range) == 2 and 0 < self.scale_range[0] <= self.scale_range[1],
             f"{at}.scale_range", "must be [min, max] with 0 < min <= max")
        validate_schedule(self, at)


LoopConfig = TrainConfig | StageTrainConfig
"""What the shared trainer and its hooks read: any training section."""


@dataclass
class InferConfig:
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 1.5, 2.0])
    flip: bool = True
    batch_size: int = 8
    """Images per forward pass (each with its flip); images are grouped by size."""
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    map: str = "auto"
    """Which localisation map to write (`cpal.methods.MAP_KINDS`): auto = the method's
    default (pacam for prototype methods, cam for cam); fused = mean of the
    max-normalised CAM and PACAM."""
    prototype_maps: Literal["sipe", "per_scale"] = "sipe"
    """sipe: the raw relu-cosine maps of every scale are resized to the image (bilinear,
    align_corners=False), summed and max-normalised once per channel; per_scale (earlier):
    each scale's map is normalised, aligned on the stride grid, summed and normalised again."""
    flip_fusion: Literal["embedding", "backbone"] = "embedding"
    """How an image and its flip are fused for prototype maps: the embeddings and CAMs are
    summed (SIPE), or the backbone features averaged before the head (earlier)."""
    precision: Precision | None = None
    """Autocast dtype for map generation; null uses train.precision."""
    channels_last: bool = True
    """NHWC layout for map generation (with BatchNorm folded into the convolutions): the
    same maps up to float rounding, faster on CPU (oneDNN) and on tensor cores."""
    shard: str | None = None
    """"I/N": write only shard I (0-based) of N of every split's images, for independent
    processes such as a SLURM array (`cpal infer --shard I/N`); null: all images."""

    @property
    def shard_spec(self) -> tuple[int, int]:
        """(index, count) of `shard`; (0, 1) when unsharded."""
        if self.shard is None:
            return 0, 1
        index, sep, count = self.shard.partition("/")
        try:
            spec = int(index), int(count)
        except ValueError:
            spec = (-1, -1)
        if not sep or not (0 <= spec[0] < spec[1]):
            raise ConfigError(
                f"'infer.shard': expected I/N with 0 <= I < N (e.g. 0/4), got {self.shard!r}"
            )
        return spec

    def validate(self, at: str) -> None:
        need(len(self.scales) >= 1 and all(x > 0 for x in self.scales), f"{at}.scales",
             "must be > 0")
        need(self.batch_size >= 1, f"{at}.batch_size", "must be >= 1")
        need(self.shard_spec[1] >= 1, f"{at}.shard", "needs N >= 1")  # shard_spec: the form
        need(self.map == "auto" or self.map in MAP_KINDS, f"{at}.map",
             f"invalid value {self.map!r}; choose one of auto, {', '.join(MAP_KINDS)}")


@dataclass
class EvalConfig:
    thresholds: list[float] = field(
        default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)]
    )
    """Background thresholds swept when evaluating maps."""
    diagnostic_images: int = 64
    """Images per split for the prototype-separation diagnostic (prototype methods; 0 off)."""

    def validate(self, at: str) -> None:
        need(bool(self.thresholds), f"{at}.thresholds", "must not be empty")
        need(all(0 <= x <= 1 for x in self.thresholds), f"{at}.thresholds", "must lie in [0, 1]")
        need(self.diagnostic_images >= 0, f"{at}.diagnostic_images", "must be >= 0")


@dataclass
class LabelsConfig:
    split: str = "train"
    """Split for which pseudo labels are exported (the training split)."""
    threshold: float | None = None
    """Fixed background threshold; null: chosen by the sweep on `tune_split`."""
    tune_split: str = "val"
    """Split whose GT picks the threshold when `threshold` is null. Using the export
    split itself is allowed but reported as an oracle."""
    allow_split_overlap: bool = False
    """Accept a tune_split that shares images with `split`: the threshold is then reported
    as tuned but NOT held out (with the shared count), and a warning is printed. false: such
    an overlap is refused before training, since a number labelled held out must be."""

    def validate(self, at: str) -> None:
        need(self.threshold is None or 0 <= self.threshold <= 1, f"{at}.threshold",
             "must lie in [0, 1]")


@dataclass
class RefineConfig:
    """Refinement of the maps into pseudo masks, between the seeds and the final labels
    (docs/pipeline.md, "refine"). `method` is a registered refinement
    (`cpal.engine.refine.REFINEMENTS`): none (the seeds are the pseudo masks), crf (dense
    CRF with `preset`), irn (the `irn` section) or amn (the `amn` section, then IRN's)."""

    method: str = "none"
    preset: str = "irn"
    """CRF parameter set of method crf (`cpal.refine.crf.PRESETS`: irn, clip_es, deeplab);
    a preset on a label unary refines the seeds, one on probabilities the maps."""
    workers: int = 1
    """Processes for per-image CRF work (CRF, IR labels, test-time CRF)."""
    threads: int = 1
    """torch threads of each worker: more workers than cores, or workers with several
    threads each, slow each other down many times over."""

    def validate(self, at: str) -> None:
        from cpal.engine.refine import REFINEMENTS  # imports torch: on use
        from cpal.refine.crf import PRESETS

        self.method = REFINEMENTS.check(self.method, f"{at}.method")
        self.preset = PRESETS.check(self.preset, f"{at}.preset")
        need(self.workers >= 1, f"{at}.workers", "must be >= 1")
        need(self.threads >= 1, f"{at}.threads", "must be >= 1")


def _irn_schedule() -> StageTrainConfig:
    # IRN's train_irn: crop 512, batch 32, 3 epochs, lr 0.1 (x10 displacement), weight
    # decay 1e-4, poly 0.9; its PolyOptimizer passes the weight decay as momentum (none).
    return StageTrainConfig(epochs=3, batch_size=32, crop_size=512, scale_range=[0.5, 1.5],
                            lr=0.1, momentum=0.0, weight_decay=1e-4)


@dataclass
class IRNConfig:
    """IRN (Ahn et al., CVPR 2019) as refinement method irn: IR labels from the maps,
    the boundary branch of the inter-pixel relation network trained on them over a frozen
    trunk, and the random walk of the maps along its boundaries (docs/pipeline.md)."""

    fg_threshold: float = 0.30
    """Confident foreground: background score of the first IR-label CRF (IRN: 0.30)."""
    bg_threshold: float = 0.05
    """Confident background: background score of the second CRF (IRN: 0.05)."""
    calibration: Literal["fixed", "seeds"] = "fixed"
    """`fixed`: fg_threshold, bg_threshold and bg_score as given (IRN's, set for VOC's
    CAMs). `seeds`: each follows the maps' own calibration, the seeds' background
    threshold t (labels.threshold, or tuned on labels.tune_split's GT, and then so
    reported): theta -> theta^g with g = ln t / ln reference_threshold, which maps
    reference_threshold to t and keeps the three in order (docs/pipeline.md)."""
    reference_threshold: float = 0.16
    """The seed threshold IRN's three were chosen beside (its CAMs on VOC: 0.16 by sweep)."""
    crf_preset: str = "irn"
    """CRF of the IR labels (a preset on a label unary)."""
    trunk: Literal["pretrained", "cam"] = "pretrained"
    """The frozen trunk: ImageNet weights (`pretrained`, IRN's) or the trunk of this run's
    trained CAM network (`cam`: for data without an ImageNet start, e.g. the demo)."""
    pretrained: str | None = None
    """ImageNet file of the trunk (model.arch, model.width); null: model.pretrained."""
    radius: int = 10
    """Pairs related in training, on the stride-4 grid (IRN: 10)."""
    displacement: bool = False
    """Also train IRN's displacement branch (instance centroids; not used by the walk)."""
    train: StageTrainConfig = field(default_factory=_irn_schedule)
    boundary_flip: bool = True
    """Average the boundary logits with those of the mirrored image (IRN)."""
    walk_radius: int = 5
    beta: float = 10.0
    """Affinities raised to this power before normalisation (IRN: 10)."""
    exp_times: int = 8
    """The walk takes 2^exp_times steps (IRN: 8)."""
    bg_score: float = 0.25
    """Constant background plane of the walked maps (IRN: sem_seg_bg_thres 0.25)."""
    background: Literal["plane", "own"] = "plane"
    """`plane` (IRN's): constant background scores (fg_threshold, bg_threshold, bg_score).
    `own` (SIPE's official chain): maps that carry their own background channel (the
    prototype methods') use it instead: IR labels by argmax against it (confident
    background: against it x own_bg_factor), the walk on [background, classes]^own_power
    with no plane, so no threshold enters. Maps without one (CAMs) keep the planes."""
    own_bg_factor: float = 0.5
    """`background: own`: the background channel's factor for confident background (SIPE: 0.5)."""
    own_power: float = 1.5
    """`background: own`: the maps are walked raised to this power (SIPE: 1.5)."""
    walk_batch: int = 8
    """Images per random-walk batch (padded to the largest grid of the batch)."""

    def validate(self, at: str) -> None:
        from cpal.refine.crf import PRESETS

        need(0 <= self.bg_threshold <= self.fg_threshold <= 1, f"{at}.bg_threshold",
             f"must satisfy 0 <= bg_threshold <= fg_threshold ({self.fg_threshold}) <= 1")
        need(0 < self.reference_threshold < 1, f"{at}.reference_threshold",
             "must lie in (0, 1)")
        self.crf_preset = PRESETS.check(self.crf_preset, f"{at}.crf_preset")
        need(PRESETS[self.crf_preset].unary == "labels", f"{at}.crf_preset",
             f"IR labels refine label maps: preset {self.crf_preset} takes probabilities")
        need(self.radius >= 2, f"{at}.radius", "must be >= 2")
        need(self.walk_radius >= 2, f"{at}.walk_radius", "must be >= 2")
        need(self.beta > 0, f"{at}.beta", "must be > 0")
        need(0 <= self.exp_times <= 16, f"{at}.exp_times", "must lie in [0, 16]")
        need(0 <= self.bg_score <= 1, f"{at}.bg_score", "must lie in [0, 1]")
        need(self.background in ("plane", "own"), f"{at}.background", "must be plane or own")
        need(0 < self.own_bg_factor <= 1, f"{at}.own_bg_factor", "must lie in (0, 1]")
        need(self.own_power > 0, f"{at}.own_power", "must be > 0")
        need(self.walk_batch >= 1, f"{at}.walk_batch", "must be >= 1")
        self.train.validate(f"{at}.train")


def _amn_schedule() -> StageTrainConfig:
    # AMN's train_amn: crop 512, batch 16, 5 epochs, rescale 0.5-1.5, flip; Adam at lr 5e-6
    # on the trunk (x20 on the new layers: 1e-4), weight decay 1e-4, a constant rate.
    return StageTrainConfig(epochs=5, batch_size=16, crop_size=512, scale_range=[0.5, 1.5],
                            lr=5e-6, momentum=0.0, weight_decay=1e-4, poly_power=0.0)


@dataclass
class AMNConfig:
    """AMN (Lee et al., CVPR 2022) as refinement method amn (docs/pipeline.md): a
    label-conditioned per-pixel classifier trained on the IR labels of the run's maps
    (the `irn` section's fg_threshold / bg_threshold / crf_preset), its maps, their IR
    labels (fg_threshold / bg_threshold here), then IRN's boundary network and random
    walk (the `irn` section's) on those maps raised to `power`."""

    trunk: Literal["pretrained", "cam"] = "pretrained"
    """Where the ResNet (model.arch, model.width; trained, not frozen) starts: ImageNet
    weights (`pretrained`, AMN's) or this run's trained CAM network (`cam`)."""
    pretrained: str | None = None
    """ImageNet file of the trunk; null: model.pretrained."""
    eps: float = 0.4
    """Label smoothing of the per-pixel loss: 1 - eps on the pixel's label, eps / C on each
    of the C others (C: the dataset's foreground classes; AMN: 0.4)."""
    rates: list[int] = field(default_factory=lambda: [6, 12, 18, 24])
    """Dilation rates of the summed ASPP head (DeepLab-v2's, as AMN)."""
    dropout: float = 0.1
    """Dropout before the ASPP head in training (AMN: 0.1)."""
    optimizer: str = "adam"
    """A registered optimizer (`cpal.engine.optim.OPTIMIZERS`): adam (AMN's, betas
    0.9/0.999, weight decay as L2); sgd reads amn.train.momentum."""
    head_lr_mult: float = 20.0
    """The new layers (label encoder, ASPP) train at amn.train.lr x this (AMN: 1e-4 against
    the trunk's 5e-6)."""
    train: StageTrainConfig = field(default_factory=_amn_schedule)
    raw_on_background: bool = True
    """Where the IR labels AMN trained on say background, the maps keep the softmax itself
    rather than its per-image min-max normalisation (the reference's make_amn_cam), so
    normalising cannot raise the background."""
    fg_threshold: float = 0.45
    """Confident foreground of the IR labels made from AMN's maps (AMN: 0.45)."""
    bg_threshold: float = 0.15
    """Confident background of those IR labels (AMN: 0.15)."""
    crf_preset: str = "irn"
    """CRF of those IR labels (a preset on a label unary)."""
    power: float = 1.3
    """AMN's maps on the boundary grid are raised to this before IRN's random walk (1.3)."""

    def validate(self, at: str) -> None:
        from cpal.engine.optim import OPTIMIZERS
        from cpal.refine.crf import PRESETS

        need(0 <= self.eps < 1, f"{at}.eps", "must lie in [0, 1)")
        need(bool(self.rates) and all(r >= 1 for r in self.rates), f"{at}.rates",
             "must name at least one rate, each >= 1")
        need(0 <= self.dropout < 1, f"{at}.dropout", "must lie in [0, 1)")
        self.optimizer = OPTIMIZERS.check(self.optimizer, f"{at}.optimizer")
        need(self.head_lr_mult > 0, f"{at}.head_lr_mult", "must be > 0")
        need(0 <= self.bg_threshold <= self.fg_threshold <= 1, f"{at}.bg_threshold",
             f"must satisfy 0 <= bg_threshold <= fg_threshold ({self.fg_threshold}) <= 1")
        self.crf_preset = PRESETS.check(self.crf_preset, f"{at}.crf_preset")
        need(PRESETS[self.crf_preset].unary == "labels", f"{at}.crf_preset",
             f"IR labels refine label maps: preset {self.crf_preset} takes probabilities")
        need(self.power > 0, f"{at}.power", "must be > 0")
        self.train.validate(f"{at}.train")


def _deeplab_schedule() -> StageTrainConfig:
    # deeplab-pytorch's VOC recipe: crop 321, scale 0.5-1.5, flip, batch 5 x iter_size 2,
    # SGD lr 2.5e-4 momentum 0.9 weight decay 5e-4, poly 0.9, 20,000 iterations.
    return StageTrainConfig(steps=20000, batch_size=10, grad_accum=2, crop_size=321,
                            scale_range=[0.5, 1.5], lr=2.5e-4, momentum=0.9,
                            weight_decay=5e-4, checkpoint_every_steps=1000)


@dataclass
class SegmentInferConfig:
    """How the segmentation network predicts a split (deeplab-pytorch tests at one scale,
    optionally multi-scale + flip, then the dense CRF)."""

    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    crf: str | None = None
    """A CRF preset on probabilities run on the softmax (deeplab: deeplab-pytorch's test
    CRF); null: argmax of the logits."""
    batch_size: int = 4
    """Images per forward pass (grouped by size)."""
    channels_last: bool = True
    """NHWC layout, BatchNorm folded (as infer.channels_last)."""

    def validate(self, at: str) -> None:
        from cpal.refine.crf import PRESETS

        need(bool(self.scales) and all(x > 0 for x in self.scales), f"{at}.scales",
             "must be > 0")
        need(self.batch_size >= 1, f"{at}.batch_size", "must be >= 1")
        if self.crf is not None:
            self.crf = PRESETS.check(self.crf, f"{at}.crf")
            need(PRESETS[self.crf].unary == "probabilities", f"{at}.crf",
                 f"preset {self.crf} takes a label map, not the network's probabilities")


@dataclass
class SegmentConfig:
    """The segmentation network trained on the final pseudo masks (OUT/labels/<labels.
    split>/, 255 ignored) and its predictions (docs/pipeline.md, "segment")."""

    network: str | None = None
    """A registered segmentation network (`cpal.models.registry.SEGMENTERS`: deeplab_v2,
    deeplab_v3plus); null: no segmentation stage (`cpal run` ends with pseudo masks)."""
    arch: str = "resnet101"
    width: float = 1.0
    output_stride: Literal[8, 16] = 8
    msc_scales: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5])
    """MSC training: logits at these input scales plus their max, each supervised."""
    frozen_bn: bool = True
    """Trunk BatchNorm fixed (statistics and affine), as deeplab-pytorch."""
    trunk: Literal["pretrained", "cam", "scratch"] = "pretrained"
    """Trunk initialisation: ImageNet weights (`pretrained`), this run's trained CAM
    network's trunk (`cam`: same arch and width as `model`; image labels only, so still
    weakly supervised), or none."""
    pretrained: str | None = None
    """ImageNet ResNet file of `arch` (torchvision/timm layout), loaded by key."""
    pretrained_allow_leak: bool = False
    """Acknowledge a `pretrained` file that saw pixel labels (a COCO-trained DeepLab)."""
    train: StageTrainConfig = field(default_factory=_deeplab_schedule)
    infer: SegmentInferConfig = field(default_factory=SegmentInferConfig)
    splits: list[str] = field(default_factory=lambda: ["val"])
    """Splits to predict: scored where every image has a GT mask; a split without masks
    (VOC test) is also written in the VOC evaluation server's layout."""

    def validate(self, at: str) -> None:
        from cpal.models.registry import BACKBONES, SEGMENTERS

        if self.network is not None:
            self.network = SEGMENTERS.check(self.network, f"{at}.network")
        self.arch = BACKBONES.check(self.arch, f"{at}.arch")
        need(self.width > 0, f"{at}.width", "must be > 0")
        need(bool(self.msc_scales) and all(x > 0 for x in self.msc_scales),
             f"{at}.msc_scales", "must be > 0")
        need(bool(self.splits), f"{at}.splits", "must name at least one split")
        self.train.validate(f"{at}.train")
        self.infer.validate(f"{at}.infer")


@dataclass
class PredictConfig:
    """`cpal predict` on a folder of new images (no labels, no masks)."""

    source: Literal["auto", "segmentation", "cam"] = "auto"
    """auto: the trained segmentation network when there is one, else the CAM network
    with the image labels it predicts."""
    score_threshold: float = 0.5
    """CAM network: a class is predicted present when its sigmoid score exceeds this."""
    max_long_side: int | None = 1024
    """Larger images are predicted at this long side and the labels resized back (memory
    and time stay bounded); null: always at full size."""
    overlay_alpha: float = 0.5
    """Opacity of the label colours in the overlay pictures."""

    def validate(self, at: str) -> None:
        need(0 < self.score_threshold < 1, f"{at}.score_threshold", "must lie in (0, 1)")
        need(self.max_long_side is None or self.max_long_side >= 32, f"{at}.max_long_side",
             "must be >= 32 or null")
        need(0 <= self.overlay_alpha <= 1, f"{at}.overlay_alpha", "must lie in [0, 1]")


@dataclass
class VizConfig:
    num_images: int = 8
    split: str = "train"

    def validate(self, at: str) -> None:
        need(self.num_images >= 1, f"{at}.num_images", "must be >= 1")


@dataclass
class LogConfig:
    """What a run records besides `train_log.jsonl` (nothing here changes the numbers)."""

    tensorboard: bool = False
    """Also write the training scalars (loss and its terms, lr, images/s, epoch mean loss)
    as TensorBoard events under output_dir/tensorboard/; needs the tensorboard package."""

    def validate(self, at: str) -> None:
        need(not self.tensorboard or importlib.util.find_spec("tensorboard") is not None,
             f"{at}.tensorboard", "needs the tensorboard package (pip install tensorboard)")


@dataclass
class Config:
    output_dir: str = "runs/default"
    output_dir_force: bool = False
    """Write into an output_dir that holds files of something other than a cpal run (the
    `--force` option); cpal files there such as config.yaml, metrics.json and figures/
    are overwritten. false: such a folder is refused, so that no user file is lost."""
    seed: int = 0
    deterministic: bool = False
    """torch deterministic algorithms, for exact reproduction (slower on GPU)."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda or cuda:N."""
    threads: int | None = None
    """torch CPU threads; null keeps torch's default."""
    method: str = DEFAULT_METHOD
    """A registered method (`cpal.methods.METHODS`): cam, sipe, cpal-mean, cpal-topk or
    cpal (the ablation ladder) on a ResNet; mctformer, mctformer-cpal; clip-es,
    clip-es-cpal."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prototype: PrototypeConfig = field(default_factory=PrototypeConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    awareness: AwarenessConfig = field(default_factory=AwarenessConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    vit: VitConfig = field(default_factory=VitConfig)
    mctformer: MCTformerConfig = field(default_factory=MCTformerConfig)
    clip_es: ClipEsConfig = field(default_factory=ClipEsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    irn: IRNConfig = field(default_factory=IRNConfig)
    amn: AMNConfig = field(default_factory=AMNConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    viz: VizConfig = field(default_factory=VizConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def map_kind(self) -> str:
        """The map `infer` writes: `infer.map`, with auto resolved by the method."""
        if self.infer.map != "auto":
            return self.infer.map
        return method_spec(self.method).default_map

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> None:
        """Every section's own checks, then what ties sections together."""
        need(self.threads is None or self.threads >= 1, "threads", "must be >= 1 or null")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             "device", "choose auto, cpu, cuda or cuda:N")
        self.method = METHODS.check(self.method, "method")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate(f.name)  # type: ignore[union-attr]
        spec, i = method_spec(self.method), self.infer
        need(i.map == "auto" or i.map in spec.maps, "infer.map",
             f"method {self.method} writes {', '.join(spec.maps)}, not {i.map}")
        from cpal.models.registry import NETWORKS  # torch: imported on use

        archs = NETWORKS.get(spec.network).archs()
        need(self.model.arch in archs, "model.arch",
             f"method {self.method} runs on {archs.kind}s ({', '.join(archs.names())}), "
             f"not {self.model.arch}")
        # Later stages read the maps of these splits: catch a missing one before training.
        tune = self.labels.tune_split if self.labels.threshold is None else None
        for key, split in (("labels.split", self.labels.split), ("viz.split", self.viz.split),
                           ("labels.tune_split", tune)):
            need(split is None or split in i.splits, key,
                 f"split '{split}' has no maps: add it to infer.splits (now: "
                 f"{', '.join(i.splits)})")


# ---------------------------------------------------------------------------------------
# Loading and validation


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file and its bases (or start from defaults), apply `KEY=VALUE`
    overrides, validate."""
    raw = read_config_tree(path) if path is not None else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form KEY=VALUE")
        parsed = parse_yaml(value, f"override '{item}'") if value.strip() else None
        _set_dotted(raw, key.strip(), parsed)
    config = _build(Config, raw, prefix="")
    config.validate()
    return _resolve_paths(config)


def read_config_tree(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping a config file states, its `_base_` files merged under it (each base
    relative to the file naming it, in order, recursively): what the file and its bases
    say, before defaults."""
    return _read_tree(Path(path), ())


def merge_configs(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """`child` over `base`: mappings merge key by key, anything else (lists included) is
    replaced by the child's value."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_tree(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    here = path.resolve()
    if here in chain:
        loop = " -> ".join(str(p) for p in (*chain, here))
        raise ConfigError(f"{path}: {BASE_KEY} files include each other ({loop})")
    raw = _read_mapping(path)
    bases = raw.pop(BASE_KEY, None)
    if bases is None:
        return raw
    names = [bases] if isinstance(bases, str) else bases
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(
            f"{path}: '{BASE_KEY}' must be a path or a list of paths, got {bases!r}")
    merged: dict[str, Any] = {}
    for name in names:
        base = path.parent / name
        if not base.is_file():
            raise ConfigError(f"{path}: {BASE_KEY} '{name}' not found (looked for {base})")
        merged = merge_configs(merged, _read_tree(base, (*chain, here)))
    return merge_configs(merged, raw)


def _read_mapping(path: Path) -> dict[str, Any]:
    """One YAML file's top-level mapping (empty for an empty file)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
            "save the config as UTF-8"
        ) from exc
    loaded = parse_yaml(text, str(path))
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return loaded


def parse_yaml(text: str, where: str) -> Any:
    """YAML as `yaml.safe_load` reads it, except that a key given twice in one mapping is an
    error (safe_load silently keeps the last one, so `train:` twice would drop a section).
    `where` (a file, or an override) starts every error message, which is one line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML ({_one_line(exc)})") from exc
    if node is None:
        return None
    _refuse_duplicate_keys(node, where, "")
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML ({_one_line(exc)})") from exc
    finally:
        loader.dispose()


def _one_line(exc: yaml.YAMLError) -> str:
    """PyYAML's message without its multi-line source excerpt: problem and position."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        what = " ".join(x for x in (exc.context, exc.problem) if x)
        return f"{what} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


def _refuse_duplicate_keys(node: yaml.Node, where: str, prefix: str) -> None:
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge":  # `<<: *base` overrides on purpose
                continue
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            line = key.start_mark.line + 1
            if name is not None and name in first:
                raise ConfigError(
                    f"{where} line {line}: key '{prefix}{name}' given twice (first on line "
                    f"{first[name]}); keep one"
                )
            if name is not None:
                first[name] = line
            _refuse_duplicate_keys(value, where, f"{prefix}{name}." if name else prefix)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, where, prefix)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate a plain mapping (e.g. a run's saved config) into a Config."""
    config = _build(Config, raw, prefix="")
    config.validate()
    return config


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str, base: Any = None) -> Any:
    """`cls` from the mapping `raw`; keys it leaves out keep `base`'s values (default: the
    class's defaults). A nested section given in part keeps the rest of *its own* default,
    e.g. `amn.train: {crop_size: 192}` keeps AMN's schedule (Adam 5e-6, 5 epochs), not the
    generic StageTrainConfig's."""
    if not isinstance(raw, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            valid = ", ".join(prefix + n for n in names)
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}; valid keys: {valid}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        tp, value = hints[f.name], raw[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            if base is not None:
                default = getattr(base, f.name)
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            kwargs[f.name] = _build(tp, value, f"{prefix}{f.name}.", default)
        else:
            kwargs[f.name] = _convert(tp, value, prefix + f.name)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"'{key}': invalid value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if value == choice and type(value) is type(choice):
                return choice
        raise ConfigError(
            f"'{key}': invalid value {value!r}; choose one of {', '.join(map(repr, choices))}"
        )
    if origin is list:
        (item_type,) = get_args(tp)
        if not isinstance(value, list):
            value = [value] if not isinstance(value, (dict, tuple)) else value
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}': expected a list, got {value!r}")
        return [_convert(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"'{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"'{key}': expected a string, got {value!r}")
    raise ConfigError(f"'{key}': unsupported type {tp}")  # a schema bug, not user input


def _resolve_paths(config: Config) -> Config:
    """Make every path absolute once, so stages never depend on the working directory."""

    def absolute(p: str | None) -> str | None:
        return None if p is None else str(Path(p).expanduser().resolve())

    config.output_dir = absolute(config.output_dir) or ""
    config.data.root = absolute(config.data.root)
    config.data.cache_dir = absolute(config.data.cache_dir)
    config.model.pretrained = absolute(config.model.pretrained)
    config.irn.pretrained = absolute(config.irn.pretrained)
    config.amn.pretrained = absolute(config.amn.pretrained)
    config.segment.pretrained = absolute(config.segment.pretrained)
    config.clip_es.tokenizer = absolute(config.clip_es.tokenizer)
    return config


def default_cache_dir() -> Path:
    env = os.environ.get("CPAL_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return (base / "cpal").resolve()
