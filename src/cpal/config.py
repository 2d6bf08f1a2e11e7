"""Typed run configuration: YAML files plus `KEY=VALUE` overrides, validated against a schema.

The schema is a tree of dataclasses. Loading converts each value to the declared type and
rejects unknown keys naming the valid ones, so that a typo fails before hours of training
instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from cpal.errors import ConfigError
from cpal.methods import DEFAULT_METHOD, MAP_KINDS, METHODS, method_spec


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
    num_workers: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    """A registered backbone (`cpal.models.registry.BACKBONES`: resnet18/34/50/101)."""
    width: float = 1.0
    """Channel multiplier of the backbone (1.0 = torchvision widths; <1 for CPU-sized runs)."""
    output_stride: Literal[8, 16] = 16
    frozen_bn: bool = True
    """BatchNorm running statistics never update (affine parameters still train)."""
    frozen_stages: int = 0
    """0: train everything; 1: freeze the stem; 2: + layer1; 3: + layer2 (IRN/SIPE)."""
    pretrained: str | None = None
    """A local torchvision/timm ResNet checkpoint, loaded by key."""
    pretrained_allow_leak: bool = False
    """Acknowledge a `pretrained` file that looks trained on VOC/COCO pixel labels: the
    warning becomes a printed note (results are then not weakly supervised)."""


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


@dataclass
class BankConfig:
    """Support bank of past instance prototypes and its context clusters (steps 4-5)."""

    size: int = 512
    """FIFO capacity per class (background included)."""
    recluster_every: int = 50
    clusters: int = 16
    """Spherical k-means centroids per class; 0 uses the raw queue entries."""
    kmeans_iters: int = 10


@dataclass
class AwarenessConfig:
    """Prototype awareness: positiveness, top-K soft selection (step 6)."""

    score: Literal["dot", "cosine", "l2"] = "dot"
    top_k: int = 5
    temperature: float = 0.1
    alpha: float = 0.5
    """Weight of the selected context in the context-aware prototype."""


@dataclass
class AlignmentConfig:
    """Feature distribution alignment (step 7)."""

    beta: float = 1.0
    loss_weight: float = 0.0
    """Weight of the optional compactness loss L_fda (0 = off)."""


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
    optimizer: Literal["sgd", "adam"] = "sgd"
    """sgd (the references': momentum below, poly schedule) or adam (betas 0.9/0.999, the
    same poly schedule and weight decay as L2 in the gradient, like torch.optim.Adam)."""
    lr: float = 0.1
    """Backbone learning rate; the classifier uses lr * head_lr_mult."""
    head_lr_mult: float = 10.0
    momentum: float = 0.0
    """The references' SGD wrapper passed weight decay into the momentum slot, so their
    published numbers used (almost) no momentum; 0.9 is the usual choice elsewhere."""
    weight_decay: float = 1e-4
    poly_power: float = 0.9
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


@dataclass
class EvalConfig:
    thresholds: list[float] = field(
        default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)]
    )
    """Background thresholds swept when evaluating maps."""
    diagnostic_images: int = 64
    """Images per split for the prototype-separation diagnostic (prototype methods; 0 off)."""


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


@dataclass
class VizConfig:
    num_images: int = 8
    split: str = "train"


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
    cpal (the ablation ladder)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prototype: PrototypeConfig = field(default_factory=PrototypeConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    awareness: AwarenessConfig = field(default_factory=AwarenessConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    viz: VizConfig = field(default_factory=VizConfig)

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


# ---------------------------------------------------------------------------------------
# Loading and validation


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] = ()) -> Config:  # type: ignore[assignment]
    """Read a YAML file (or start from defaults), apply `KEY=VALUE` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
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
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        raw = loaded
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form KEY=VALUE")
        parsed = parse_yaml(value, f"override '{item}'") if value.strip() else None
        _set_dotted(raw, key.strip(), parsed)
    config = _build(Config, raw, prefix="")
    _check_values(config)
    return _resolve_paths(config)


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
    _check_values(config)
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


def _build(cls: type, raw: Any, prefix: str) -> Any:
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
    for name in names:
        if name in raw:
            kwargs[name] = _convert(hints[name], raw[name], prefix + name)
    return cls(**kwargs)


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


def _check_values(config: Config) -> None:
    """Range checks that types alone cannot express."""

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"'{key}': {message}")

    t, m, i, s = config.train, config.model, config.infer, config.data.synthetic
    need(config.data.root is not None or not config.data.require_root, "data.root",
         "required by this config (data.require_root=true): pass data.root=/path/to/dataset")
    from cpal.models.registry import BACKBONES  # builds torch modules: imported on use

    m.arch = BACKBONES.check(m.arch, "model.arch")
    need(m.width > 0, "model.width", "must be > 0")
    need(0 <= m.frozen_stages <= 3, "model.frozen_stages", "must be 0, 1, 2 or 3")
    need(t.epochs >= 1, "train.epochs", "must be >= 1")
    need(t.steps is None or t.steps >= 1, "train.steps", "must be >= 1 or null")
    need(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(t.crop_size == "auto" or t.crop_size >= 16, "train.crop_size", "must be >= 16 or auto")
    need(
        t.resize_long == "auto"
        or (len(t.resize_long) == 2 and 0 < t.resize_long[0] <= t.resize_long[1]),
        "train.resize_long",
        "must be [min, max] with 0 < min <= max, or auto",
    )
    need(t.lr > 0, "train.lr", "must be > 0")
    need(t.head_lr_mult > 0, "train.head_lr_mult", "must be > 0")
    need(0 <= t.momentum < 1, "train.momentum", "must be in [0, 1)")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(t.poly_power >= 0, "train.poly_power", "must be >= 0")
    need(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", "must be > 0 or null")
    need(t.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    need(t.batch_size % t.grad_accum == 0, "train.batch_size",
         f"{t.batch_size} is not divisible by train.grad_accum ({t.grad_accum})")
    need(t.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
    need(t.checkpoint_every_steps is None or t.checkpoint_every_steps >= 1,
         "train.checkpoint_every_steps", "must be >= 1 or null")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    need(t.log_every >= 1, "train.log_every", "must be >= 1")
    need(config.viz.num_images >= 1, "viz.num_images", "must be >= 1")
    need(config.threads is None or config.threads >= 1, "threads", "must be >= 1 or null")
    need(len(i.scales) >= 1 and all(x > 0 for x in i.scales), "infer.scales", "must be > 0")
    need(i.batch_size >= 1, "infer.batch_size", "must be >= 1")
    need(i.shard_spec[1] >= 1, "infer.shard", "needs N >= 1")  # shard_spec checks the form
    config.method = METHODS.check(config.method, "method")
    spec = method_spec(config.method)
    need(i.map == "auto" or i.map in MAP_KINDS, "infer.map",
         f"invalid value {i.map!r}; choose one of auto, {', '.join(MAP_KINDS)}")
    need(i.map == "auto" or i.map in spec.maps, "infer.map",
         f"method {config.method} writes {', '.join(spec.maps)}, not {i.map}")
    pc, bc, ac = config.prototype, config.bank, config.awareness
    need(pc.projection is None or pc.projection >= 1, "prototype.projection",
         "must be >= 1 or null")
    need(pc.lr_mult is None or pc.lr_mult > 0, "prototype.lr_mult", "must be > 0 or null")
    need(pc.bg_factor >= 0, "prototype.bg_factor", "must be >= 0")
    need(0 <= pc.tau < 1, "prototype.tau", "must be in [0, 1)")
    need(0 <= pc.tau_bg < 1, "prototype.tau_bg", "must be in [0, 1)")
    need(bc.size >= 1, "bank.size", "must be >= 1")
    need(bc.recluster_every >= 1, "bank.recluster_every", "must be >= 1")
    need(0 <= bc.clusters <= bc.size, "bank.clusters", "must be in [0, bank.size]")
    need(bc.kmeans_iters >= 1, "bank.kmeans_iters", "must be >= 1")
    need(ac.top_k >= 1, "awareness.top_k", "must be >= 1")
    need(ac.temperature > 0, "awareness.temperature", "must be > 0")
    need(0 <= ac.alpha <= 1, "awareness.alpha", "must be in [0, 1]")
    need(config.alignment.beta >= 0, "alignment.beta", "must be >= 0")
    need(config.alignment.loss_weight >= 0, "alignment.loss_weight", "must be >= 0")
    need(config.loss.self_weight >= 0, "loss.self_weight", "must be >= 0")
    need(bool(config.eval.thresholds), "eval.thresholds", "must not be empty")
    need(config.eval.diagnostic_images >= 0, "eval.diagnostic_images", "must be >= 0")
    need(
        all(0 <= x <= 1 for x in config.eval.thresholds), "eval.thresholds", "must lie in [0, 1]"
    )
    th = config.labels.threshold
    need(th is None or 0 <= th <= 1, "labels.threshold", "must lie in [0, 1]")
    # Later stages read the maps of these splits: catch a missing one before training.
    inferred = ", ".join(i.splits)
    for key, split in (("labels.split", config.labels.split), ("viz.split", config.viz.split),
                       ("labels.tune_split", config.labels.tune_split if th is None else None)):
        need(split is None or split in i.splits, key,
             f"split '{split}' has no maps: add it to infer.splits (now: {inferred})")
    need(s.num_train >= 1 and s.num_val >= 1, "data.synthetic", "needs >= 1 image per split")
    need(s.image_size >= 32, "data.synthetic.image_size", "must be >= 32")
    need(config.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    dev = config.device
    need(
        dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:"),
        "device",
        "choose auto, cpu, cuda or cuda:N",
    )


def _resolve_paths(config: Config) -> Config:
    """Make every path absolute once, so stages never depend on the working directory."""

    def absolute(p: str | None) -> str | None:
        return None if p is None else str(Path(p).expanduser().resolve())

    config.output_dir = absolute(config.output_dir) or ""
    config.data.root = absolute(config.data.root)
    config.data.cache_dir = absolute(config.data.cache_dir)
    config.model.pretrained = absolute(config.model.pretrained)
    return config


def default_cache_dir() -> Path:
    env = os.environ.get("CPAL_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return (base / "cpal").resolve()
