"""Loading local ImageNet weight files into our backbones, by key, safely.

One place reads every container (torchvision files of 2017 without BatchNorm step
counters and newer ones with them, timm `pytorch_model.bin` / `model.safetensors`,
wrappers such as {"state_dict": ...} or a "module." prefix), and one `WeightLayout` per
model family states how its files' keys map onto ours (ResNet here; DeiT and CLIP beside
their models), so models never special-case files. Files are read with
`torch.load(weights_only=True)` or safetensors, and TorchScript archives (OpenAI's CLIP
files) by a reader that rebuilds tensors only (`cpal.models.torchscript`): never
unpickled, never executed.

Weakly supervised results are only meaningful from an ImageNet *classification* start:
a file that has seen VOC/COCO pixel labels (DeepLab COCO inits and the like) inflates
every number downstream. Such files are detected from their name, their keys and their
metadata, and are never used silently (see `leak_reasons`).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from cpal.errors import CheckpointError, warn
from cpal.log import NOTE, get_logger
from cpal.models.torchscript import is_torchscript_archive, read_torchscript_tensors

_log = get_logger(__name__)

# Keys of ImageNet classifier heads: present in torchvision/timm files, never in a trunk.
_IGNORED_PREFIXES = ("fc.",)
# Training scripts wrap the state dict: {"state_dict": ...} (Lightning, mmcv), {"model": ...}
# (DeiT, detectron), {"net": ...} (IRN/SIPE checkpoints).
_WRAPPER_KEYS = ("state_dict", "model", "model_state", "net")
_STRIPPED_PREFIXES = ("module.", "backbone.", "encoder.")
# cpal's own training checkpoints: "model.<module>..." and "optim.<param id>..." tensors.
_CPAL_SECTIONS = ("model.", "optim.")
_CPAL_TRUNK = "model.backbone."
# BatchNorm step counters: absent from files saved before PyTorch 0.4 (torchvision's v1
# ImageNet files); frozen or not, nothing in a forward pass reads them.
_OPTIONAL_SUFFIX = "num_batches_tracked"

# Dense-prediction heads that an ImageNet classification ResNet never has: DeepLab's
# ASPP ("aspp.", "layer5." in the Caffe-converted DeepLab-v2 files), torchvision's
# segmentation models ("classifier.", "aux_classifier."), decoders.
_DENSE_HEAD_PREFIXES = (
    "classifier.", "aux_classifier.", "aspp.", "decoder.", "layer5.", "seg_head.",
    "segmentation_head.", "auxlayer.", "head.aspp", "decode_head.", "auxiliary_head.",
)
# Name tokens that reveal segmentation training or the evaluation datasets: a token
# *starting* with one of these ("voc2012", "segmentation", "cocostuff") or equal to one of
# the exact ones. Tokens are the runs of letters of a lower-cased name, after dropping
# hex digests ("cd0a2569", a 40-digit hub snapshot or git commit): their letter runs are
# noise, and "ade" is spelt with hex letters only.
_LEAK_TOKEN_PREFIXES = ("coco", "voc", "pascal", "sbd", "deeplab", "seg")
_LEAK_TOKENS_EXACT = ("ade", "cityscapes")
_HEX_DIGEST = re.compile(r"(?=[0-9a-f]*[0-9])[0-9a-f]{6,}")
# Names that say nothing about a file (hub caches, training scripts): for these the parent
# folders are read instead, e.g. models--org--deeplab_r50/snapshots/<hash>/model.safetensors.
_GENERIC_NAME_WORDS = frozenset((
    "pytorch", "model", "models", "checkpoint", "checkpoints", "ckpt", "weights", "weight",
    "best", "final", "last", "latest", "state", "dict", "iter", "epoch", "step", "bin", "pth",
    "pt", "tar", "safetensors", "open", "clip", "snapshots", "blobs", "pretrained", "hub",
))
# Parent folders read at most: a hub file sits 3 levels under the folder that names it.
_GENERIC_PARENT_LEVELS = 3
_METADATA_SCAN_LIMIT = 2000  # string leaves inspected per file (metadata can be large)


@dataclass
class WeightFile:
    """What a weight file holds: its tensors (layout-normalised) and its other entries."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadReport:
    path: Path
    loaded: int = 0
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    """Why the file may have seen pixel labels (empty for a clean ImageNet file)."""
    ignored_what: str = "ImageNet head"

    def summary(self) -> str:
        text = (
            f"{self.path.name}: loaded {self.loaded} tensors, ignored {len(self.ignored)} "
            f"({self.ignored_what}), missing {len(self.missing)}, "
            f"unexpected {len(self.unexpected)}"
        )
        if self.leaks:
            text += f"; POSSIBLE PIXEL-LABEL LEAK: {'; '.join(self.leaks)}"
        return text


# ---------------------------------------------------------------------------------------
# Reading


def read_weight_file(path: str | Path) -> WeightFile:
    """Read tensors (and metadata) from .safetensors or a torch file, refusing pickles."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    metadata: dict[str, Any] = {}
    if path.suffix != ".safetensors":
        _refuse_non_torch_file(path)
        if is_torchscript_archive(path):
            # OpenAI's CLIP files: read by our restricted reader, never torch.jit.load.
            return WeightFile(read_torchscript_tensors(path), {"format": "TorchScript archive"})
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused, {_unpickling_reason(exc)}") from exc
    except (OSError, RuntimeError, ValueError, EOFError, KeyError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: cannot read weights ({_first_line(exc)})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    state = _cpal_trunk(state, metadata)
    for key in _WRAPPER_KEYS:
        if isinstance(state.get(key), dict):
            metadata.update({k: v for k, v in state.items() if k != key})
            state = state[key]
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: entry {_clean(str(key))!r} is a {type(value).__name__}, not a tensor"
            )
        key = str(key)
        for prefix in _STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        tensors[key] = value
    return WeightFile(tensors, metadata)


def _cpal_trunk(state: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    """A cpal training checkpoint (`model.*` and `optim.*` tensors, engine/checkpoint.py)
    initialises only the trunk: its `model.backbone.*` tensors. Its CAM classifier and
    prototype head were trained for another run (and would look like a dense head)."""
    keys = [str(k) for k in state]
    if not keys or not all(k.startswith(_CPAL_SECTIONS) for k in keys):
        return state
    trunk = {k[len(_CPAL_TRUNK):]: v for k, v in state.items() if str(k).startswith(_CPAL_TRUNK)}
    if not trunk:
        return state
    metadata["format"] = "cpal training checkpoint (trunk only)"
    return trunk


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weight file, keys normalised (wrappers and prefixes removed)."""
    return read_weight_file(path).tensors


# How torch files begin: a zip archive (torch >= 1.6) or a pickle (protocol 2+: 0x80).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")
_LFS_POINTER = b"version https://git-lfs"


def _refuse_non_torch_file(path: Path) -> None:
    """A file that is neither a zip nor a pickle is not a torch file: say what it is (text,
    a Git LFS pointer) instead of passing it to torch.load, whose errors on such files are
    a KeyError or a page that recommends weights_only=False."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read weights ({exc.strerror})") from exc
    if not head:
        raise CheckpointError(f"{path}: cannot read weights (the file is empty)")
    if head.startswith(_TORCH_MAGIC):
        return
    if head.startswith(_LFS_POINTER):
        raise CheckpointError(
            f"{path}: a Git LFS pointer, not the weights; fetch them (git lfs pull)"
        )
    try:
        text: str | None = head.decode("utf-8")
    except UnicodeDecodeError as exc:  # text cut inside a character by the 512 bytes?
        text = head[: exc.start].decode("utf-8") if exc.start > len(head) - 4 else None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        first = _clean(text.strip().splitlines()[0][:40]) if text.strip() else ""
        raise CheckpointError(
            f"{path}: a text file ({first!r}...), not a torch or safetensors weight file"
        )
    raise CheckpointError(
        f"{path}: not a torch (zip or pickle) or safetensors weight file (it starts with "
        f"bytes {head[:4].hex(' ')})"
    )


def _first_line(exc: BaseException) -> str:
    """The first line of an error, never torch's advice to load with weights_only=False."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if "weights_only" not in line]
    return lines[0] if lines else type(exc).__name__


def _unpickling_reason(exc: pickle.UnpicklingError) -> str:
    """torch's weights_only message is a page long and recommends weights_only=False (which
    would run code from the file); keep the one fact that matters, never that advice."""
    text = str(exc)
    match = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if match:
        return (
            f"the file holds pickled Python objects ({match.group(1)}), not plain tensors; "
            "cpal never unpickles"
        )
    match = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    detail = match.group(1).strip() if match else _first_line(exc)
    return f"not a readable weight file ({detail}); cpal reads only plain tensors"


# ---------------------------------------------------------------------------------------
# Leak detection


def _tokens(text: str) -> list[str]:
    """Letter runs of `text`, lower-cased, hex digests left out ('resnet50-19c8e357.pth'
    gives ['resnet', 'pth'])."""
    words = re.split(r"[^a-z0-9]+", text.lower())
    return [run for word in words if not _HEX_DIGEST.fullmatch(word)
            for run in re.findall(r"[a-z]+", word)]


def _leak_words(text: str) -> list[str]:
    """The leak words in `text`, in order ('deeplab', 'coco' for 'DeepLabV3_COCO')."""
    found: list[str] = []
    for token in _tokens(text):
        word = next((w for w in _LEAK_TOKEN_PREFIXES if token.startswith(w)), None)
        if word is None and token in _LEAK_TOKENS_EXACT:
            word = token
        if word is not None and word not in found:
            found.append(word)
    return found


def _is_generic(name: str) -> bool:
    return all(token in _GENERIC_NAME_WORDS for token in _tokens(name))


def _names_to_check(path: Path) -> list[str]:
    """The file name; for a generic name (model.safetensors, final.pth, ...) also its
    folders, walking up through generic ones (<hash>/, snapshots/, ckpt/) to the first
    folder that names something, and no further.

    Folders are not read for a specific file name, so that /data/voc/resnet50.pth is not
    flagged for where it happens to be stored, nor folders above the one that names the
    file (voc_project/pretrained/timm_resnet50/model.safetensors is a timm file).
    """
    names = [path.name]
    if _is_generic(path.name):
        for parent in path.resolve().parents[:_GENERIC_PARENT_LEVELS]:
            names.append(parent.name)
            if not _is_generic(parent.name):
                break
    return names


def _string_leaves(value: Any, key: str, out: list[tuple[str, str]]) -> None:
    if len(out) >= _METADATA_SCAN_LIMIT:
        return
    if isinstance(value, str):
        out.append((key, value))
    elif isinstance(value, dict):
        for k, v in value.items():
            _string_leaves(v, f"{key}.{k}" if key else str(k), out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _string_leaves(v, f"{key}[{i}]", out)


def leak_reasons(path: str | Path, weights: WeightFile) -> list[str]:
    """Why a file may have seen VOC/COCO (or other) pixel labels; empty when nothing says so.

    Three independent signs: a name (of the file, or of its folders when the file name is
    generic) with a token such as coco/voc/deeplab/seg...; a dense-prediction head among
    the keys (classifier/aspp/decoder: an ImageNet ResNet has only `fc`); a metadata string
    (a stored 'dataset', training arguments, safetensors metadata) naming such a dataset.
    """
    path = Path(path)
    reasons = []
    for name in _names_to_check(path):
        words = _leak_words(name)
        if words:
            listed = ", ".join(map(repr, words))
            reasons.append(f"its name {_clean(name)!r} contains {listed}")
            break
    heads: dict[str, int] = {}
    for key in weights.tensors:
        for prefix in _DENSE_HEAD_PREFIXES:
            # Also behind a foreign prefix: 'Scale.layer5.' in Caffe-converted DeepLab-v2.
            if key.startswith(prefix) or f".{prefix}" in key:
                heads[prefix] = heads.get(prefix, 0) + 1
    if heads:
        listed = ", ".join(f"{p}* ({n} tensors)" for p, n in heads.items())
        reasons.append(
            f"it holds a dense-prediction head ({listed}) that ImageNet classifiers lack"
        )
    leaves: list[tuple[str, str]] = []
    _string_leaves(weights.metadata, "", leaves)
    for key, value in leaves:
        if _leak_words(value):
            reasons.append(f"its metadata has {_clean(key)}={_clean(value)[:60]!r}")
            break
    return reasons


def _announce_leak(path: Path, reasons: list[str], allow_leak: bool) -> None:
    """One `cpal: warning:` line; an acknowledged leak is still a `cpal: note:` line."""
    what = f"{path}: possible pixel-label leak: {'; '.join(reasons)}"
    if allow_leak:
        _log.log(NOTE, "%s (allowed: results are not weakly supervised)", what)
        return
    warn(
        f"{what}. Weakly supervised results must start from ImageNet classification weights "
        "(e.g. torchvision resnet50-19c8e357.pth); a file that saw VOC/COCO masks inflates "
        "every number"
    )


# ---------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class WeightLayout:
    """How a family of files maps onto one of our models: the heads a trunk does not
    have (ignored, counted), model keys a file may lack, a conversion of the file's
    tensors to our names and shapes (the one place a format's differences live), and
    the hint that explains a key mismatch."""

    name: str
    """What the files are, for messages ("ImageNet ResNet", "timm DeiT", "CLIP")."""
    ignored_prefixes: tuple[str, ...] = _IGNORED_PREFIXES
    ignored_what: str = "ImageNet head"
    optional_suffixes: tuple[str, ...] = (_OPTIONAL_SUFFIX,)
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    """file tensors -> tensors under our names (may raise CheckpointError naming a key)."""
    hint: Callable[[list[str], list[str], dict[str, Any]], str] | None = None


def load_backbone_weights(
    model: nn.Module, path: str | Path, *, strict: bool = True, allow_leak: bool = False
) -> LoadReport:
    """An ImageNet ResNet file (torchvision or timm) into our ResNet; see `load_weights`."""
    return load_weights(model, path, RESNET_LAYOUT, strict=strict, allow_leak=allow_leak)


def load_weights(
    model: nn.Module, path: str | Path, layout: WeightLayout, *, strict: bool = True,
    allow_leak: bool = False,
) -> LoadReport:
    """Copy matching tensors into `model`; with `strict`, any mismatch is an error that
    lists the missing and unexpected keys (so a wrong file never half-loads silently).

    A file that may have seen pixel labels is announced before anything else (a warning,
    or with `allow_leak` a printed note only); see `leak_reasons`.
    """
    path = Path(path)
    weights = read_weight_file(path)
    report = LoadReport(path=path, leaks=leak_reasons(path, weights),
                        ignored_what=layout.ignored_what)
    if report.leaks:
        _announce_leak(path, report.leaks, allow_leak)
    tensors = weights.tensors
    kept = {k: v for k, v in tensors.items() if not k.startswith(layout.ignored_prefixes)}
    report.ignored = [k for k in tensors if k not in kept]
    if layout.convert is not None:
        kept = layout.convert(kept)
    own = model.state_dict()
    usable: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # key: (file, model)
    for key, value in kept.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            shapes[key] = (tuple(value.shape), tuple(own[key].shape))
        else:
            usable[key] = value
    report.missing = [
        k for k in own
        if k not in usable and k not in shapes and not k.endswith(layout.optional_suffixes)
    ]
    arch = getattr(model, "arch", type(model).__name__)
    if strict and (report.missing or report.unexpected):
        also = f"; {len(shapes)} more with other shapes" if shapes else ""
        hint = (layout.hint or _mismatch_hint)(report.missing, report.unexpected, own)
        raise CheckpointError(
            f"{path}: keys do not match the {arch} model: missing {_preview(report.missing)}; "
            f"unexpected {_preview(report.unexpected)}{also}{hint}"
        )
    if shapes:
        listed = [f"{_clean(k)} file {f} vs model {m}" for k, (f, m) in list(shapes.items())[:3]]
        more = f"; ... (+{len(shapes) - 3} more)" if len(shapes) > 3 else ""
        raise CheckpointError(
            f"{path}: shape mismatch for {len(shapes)} tensors: {'; '.join(listed)}{more}"
            f" - check model.arch ({arch}) and model.width"
        )
    model.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    return report


def _mismatch_hint(missing: list[str], unexpected: list[str], own: dict[str, Any]) -> str:
    """The likely cause of a key mismatch, in words (deep stem, a prefix, another depth)."""
    if any(k.startswith("conv1.0.") for k in unexpected):
        return (
            " - the file has a deep stem (conv1.0/conv1.1/...: timm's resnet*c/*d/*s "
            "variants), which cpal's ResNet does not implement; use a plain torchvision or "
            "timm resnet50/resnet101 file"
        )
    if any(k.startswith(_DENSE_HEAD_PREFIXES) for k in unexpected):
        return (
            " - the file holds a segmentation head: it is a segmentation model, not an "
            "ImageNet classification file"
        )
    heads = sorted({k.split(".", 1)[0] for k in unexpected if "." in k})
    for head in heads:
        inner = [k[len(head) + 1:] for k in unexpected if k.startswith(head + ".")]
        if inner and sum(k in own for k in inner) >= len(inner) // 2 + 1:
            return f" - the file's keys carry a {head + '.'!r} prefix (not a plain ResNet file)"
    layers = re.compile(r"layer\d+\.\d+\.")
    if (missing or unexpected) and all(layers.match(k) for k in missing + unexpected):
        return " - the file has another depth: check model.arch (resnet50 vs resnet101)"
    return " - check model.arch and that the file is a plain torchvision/timm ResNet"


RESNET_LAYOUT = WeightLayout("ImageNet ResNet", hint=_mismatch_hint)


def _clean(text: str) -> str:
    """One printable line, whatever a file's keys contain."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _preview(keys: list[str], groups: int = 4, width: int = 220) -> str:
    """'N (a.weight, b.{weight,bias}, ... +K more)': keys grouped by module, one short line."""
    if not keys:
        return "none"
    grouped: dict[str, list[str]] = {}
    for key in keys:
        module, _, leaf = _clean(key).rpartition(".")
        grouped.setdefault(module, []).append(leaf)
    parts = []
    shown = 0
    for module, leaves in grouped.items():
        if len(parts) == groups:
            break
        prefix = f"{module}." if module else ""
        text = prefix + (leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}")
        if parts and sum(map(len, parts)) + len(text) > width:
            break
        parts.append(text if len(text) <= width else text[: width - 3] + "...")
        shown += len(leaves)
    more = f", ... +{len(keys) - shown} more" if shown < len(keys) else ""
    return f"{len(keys)} ({', '.join(parts)}{more})"
