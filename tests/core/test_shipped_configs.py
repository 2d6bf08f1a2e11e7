"""Every config under configs/ loads; the paper configs are one recipe per dataset
(configs/_base_/{paper_r50,voc12,coco14,prototypes}.yaml) plus method overlays that state
only what differs, and together they state every setting that shapes a run."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from cpal.config import Config, config_from_dict, load_config, merge_configs, read_config_tree
from cpal.errors import ConfigError
from tests.helpers import REPO

CONFIGS = sorted(p.relative_to(REPO / "configs").as_posix()
                 for p in (REPO / "configs").rglob("*.yaml"))
DATASETS = ("voc12", "coco14")
METHODS = ("cam", "sipe", "cpal")
PAPER = [f"{d}/{m}_r50.yaml" for d in DATASETS for m in METHODS]
PROTOTYPE_SECTIONS = ("prototype", "bank", "awareness", "alignment", "loss")
ROOT = "data.root=/datasets/root"
WEIGHTS = "model.pretrained=/weights/file"
# Reference numbers as published, each stated in its dataset's base only.
NUMBERS = {"voc12": ("48.3", "66.5", "63.5", "64.8", "58.6", "68.8", "69.7", "71.9", "74.5",
                     "74.7", "72.2", "70.7", "70.6", "71.6", "70.8", "75.0", "71.1", "71.4",
                     "73.8", "73.9"),
           "coco14": ("34.4", "40.6", "46.8", "42.0", "45.4")}
# The transformer and CLIP bases: (overlay, method, its map section) per dataset.
BASES = (("mctformer_deit_s", "mctformer", "mctformer"),
         ("mctformer_cpal_deit_s", "mctformer-cpal", "mctformer"),
         ("clip_es_vit_b16", "clip-es", "clip_es"),
         ("clip_es_cpal_vit_b16", "clip-es-cpal", "clip_es"))
TRANSFORMER = [f"{d}/{name}.yaml" for d in DATASETS for name, _, _ in BASES]


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def shipped(name: str) -> Config:
    """A shipped config as a user runs it: paper configs need a dataset root."""
    path = REPO / "configs" / name
    tree = read_config_tree(path)
    needs_root = tree.get("data", {}).get("require_root", False)
    needs_weights = tree.get("model", {}).get("require_pretrained", False)
    return load_config(path, [ROOT] * needs_root + [WEIGHTS] * needs_weights)


def resolved(name: str) -> dict[str, Any]:
    return flat(shipped(name).to_dict())


def differing(a: str, b: str) -> set[str]:
    x, y = resolved(a), resolved(b)
    return {k for k in x if x[k] != y[k]}


def own_keys(name: str) -> tuple[dict[str, Any], list[str]]:
    """What a file itself says (without its bases), and its bases."""
    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    bases = raw.pop("_base_", [])
    return raw, [bases] if isinstance(bases, str) else bases


def text(name: str) -> str:
    return (REPO / "configs" / name).read_text()


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_and_round_trips(name):
    cfg = shipped(name)
    assert isinstance(cfg, Config)
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipe(name):
    dataset, method = name.split("/")[0], name.split("/")[1].split("_")[0]
    cfg = shipped(name)
    m, t, i = cfg.model, cfg.train, cfg.infer
    assert cfg.method == method
    assert (m.arch, m.width, m.output_stride, m.frozen_bn, m.frozen_stages) == (
        "resnet50", 1.0, 16, True, 3)
    assert (t.epochs, t.batch_size, t.crop_size, t.resize_long, t.hflip) == (
        5, 16, 512, [320, 640], True)
    assert (t.lr, t.head_lr_mult, t.momentum, t.weight_decay, t.poly_power) == (
        0.1, 10.0, 0.0, 1e-4, 0.9)
    assert t.grad_clip == (None if method == "cam" else 1.0)
    assert (i.scales, i.flip, i.splits) == ([1.0, 0.5, 1.5, 2.0], True, ["train", "val"])
    assert cfg.data.train_split == {"voc12": "train_aug", "coco14": "train"}[dataset]
    assert (cfg.labels.split, cfg.labels.threshold, cfg.labels.tune_split) == (
        "train", None, "val")
    assert not cfg.labels.allow_split_overlap  # the tuning split shares no training image
    # No placeholder paths: both are absent and the dataset base shows the exact override.
    tree = read_config_tree(REPO / "configs" / name)
    assert tree["data"]["root"] is None and cfg.model.pretrained is None
    assert cfg.data.require_root


@pytest.mark.parametrize("name", PAPER)
def test_paper_chain_recipe(name):
    """IRN's refinement and deeplab-pytorch's DeepLab-v2 VOC recipe (docs/pipeline.md)."""
    cfg = shipped(name)
    r, irn, seg = cfg.refine, cfg.irn, cfg.segment
    assert r.method == "irn" and r.threads == 1
    assert (irn.fg_threshold, irn.bg_threshold, irn.crf_preset, irn.trunk, irn.radius) == (
        0.30, 0.05, "irn", "pretrained", 10)
    t = irn.train
    assert (t.epochs, t.batch_size, t.crop_size, t.scale_range, t.lr, t.weight_decay) == (
        3, 32, 512, [0.5, 1.5], 0.1, 1e-4)
    assert (irn.walk_radius, irn.beta, irn.exp_times, irn.bg_score) == (5, 10.0, 8, 0.25)
    assert (seg.network, seg.arch, seg.output_stride, seg.msc_scales, seg.frozen_bn) == (
        "deeplab_v2", "resnet101", 8, [1.0, 0.75, 0.5], True)
    assert seg.trunk == "pretrained" and seg.pretrained is None  # required, no placeholder
    t = seg.train
    assert (t.steps, t.batch_size, t.grad_accum, t.crop_size, t.scale_range, t.hflip) == (
        20000, 10, 2, 321, [0.5, 1.5], True)
    assert (t.lr, t.momentum, t.weight_decay, t.poly_power) == (2.5e-4, 0.9, 5e-4, 0.9)
    assert seg.infer.crf == "deeplab" and seg.splits == ["val"]


@pytest.mark.parametrize("dataset", DATASETS)
def test_run_instructions_and_reference_numbers_are_stated_once_per_dataset(dataset):
    base = f"_base_/{dataset}.yaml"
    assert f"cpal run configs/{dataset}/cpal_r50.yaml data.root=/path/" in text(base)
    assert "model.pretrained=/path/resnet50-19c8e357.pth" in text(base)
    assert "segment.pretrained=/path/resnet101-63fe2227.pth" in text(base)
    for number in NUMBERS[dataset]:
        assert number in text(base)
        assert [n for n in CONFIGS if n != base and number in text(n)] == [], number
    overlays = [f"{dataset}/{m}_r50.yaml" for m in METHODS]
    overlays += [f"{dataset}/{name}.yaml" for name, _, _ in BASES]
    for overlay in overlays:  # every overlay points its reader at its dataset's base
        assert f"../_base_/{dataset}.yaml" in own_keys(overlay)[1]
        assert f"../_base_/{dataset}.yaml." in " ".join(text(overlay).split())


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_state_every_setting(name):
    """Nothing that shapes a paper run is left to a default that could change later."""
    stated = flat(read_config_tree(REPO / "configs" / name))
    sections = ["model", "train", "infer", "labels", "refine", "irn", "amn", "segment"]
    if not name.split("/")[1].startswith("cam"):
        sections += PROTOTYPE_SECTIONS
    schema = flat(Config().to_dict())
    needed = {k for k in schema if k.split(".")[0] in sections}
    needed |= {"data.root", "data.train_split", "method", "seed"}
    assert needed - set(stated) == set()


@pytest.mark.parametrize("name", PAPER)
def test_an_overlay_states_only_what_differs_from_its_bases(name):
    own, bases = own_keys(name)
    assert bases, "a paper config is an overlay"
    path = REPO / "configs" / name
    merged: dict[str, Any] = {}
    for base in bases:
        merged = merge_configs(merged, read_config_tree(path.parent / base))
    root = {"data": {"root": "/x"}}
    below = flat(config_from_dict(merge_configs(merged, root)).to_dict())
    above = flat(config_from_dict(merge_configs(read_config_tree(path), root)).to_dict())
    assert {k for k in below if below[k] != above[k]} == set(flat(own))


@pytest.mark.parametrize("dataset", DATASETS)
def test_paper_amn_recipe(dataset):
    """AMN's reference recipe (refine.method=amn reads it; the other configs carry it too)."""
    a = shipped(f"{dataset}/cpal_r50.yaml").amn
    assert (a.trunk, a.pretrained, a.eps, a.rates, a.dropout) == (
        "pretrained", None, 0.4, [6, 12, 18, 24], 0.1)
    assert (a.optimizer, a.head_lr_mult, a.raw_on_background) == ("adam", 20.0, True)
    t = a.train
    assert (t.epochs, t.batch_size, t.crop_size, t.scale_range, t.hflip) == (
        5, 16, 512, [0.5, 1.5], True)
    assert (t.lr, t.weight_decay, t.schedule, t.poly_power) == (5e-6, 1e-4, "poly", 0.0)
    assert (a.fg_threshold, a.bg_threshold, a.crf_preset, a.power) == (0.45, 0.15, "irn", 1.3)


@pytest.mark.parametrize("dataset", DATASETS)
def test_the_amn_overlay_is_cpal_refined_by_amn(dataset):
    own, bases = own_keys(f"{dataset}/cpal_amn_r50.yaml")
    assert bases == ["cpal_r50.yaml"]
    assert set(flat(own)) == {"output_dir", "refine.method"}
    assert differing(f"{dataset}/cpal_r50.yaml", f"{dataset}/cpal_amn_r50.yaml") == {
        "output_dir", "refine.method"}
    assert shipped(f"{dataset}/cpal_amn_r50.yaml").refine.method == "amn"
    # Reference numbers are the dataset base's, pointed at, not restated (VOC: AMN's rows;
    # COCO: none of AMN's is in the public facts, and the overlay says so).
    assert f"../_base_/{dataset}.yaml" in " ".join(text(f"{dataset}/cpal_amn_r50.yaml").split())
    if dataset == "voc12":
        assert "AMN R101" in text("_base_/voc12.yaml")


@pytest.mark.parametrize("dataset", DATASETS)
def test_configs_of_a_dataset_differ_only_in_method_keys(dataset):
    cam, sipe, cpal = (f"{dataset}/{m}_r50.yaml" for m in METHODS)
    assert differing(sipe, cpal) == {"output_dir", "method"}
    # cam leaves the prototype sections to defaults (it never reads them); they must
    # still equal the prototype methods' values, so a default change is caught here.
    assert differing(cam, sipe) == {"output_dir", "method", "train.grad_clip"}


@pytest.mark.parametrize("method", METHODS)
def test_datasets_differ_only_in_training_split(method):
    voc, coco = (f"{d}/{method}_r50.yaml" for d in DATASETS)
    assert differing(voc, coco) == {"output_dir", "data.train_split"}


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_refuse_a_missing_dataset_root(name):
    # A null root would otherwise select the built-in synthetic dataset without a word.
    with pytest.raises(ConfigError, match=r"'data.root': required"):
        load_config(REPO / "configs" / name)


@pytest.mark.parametrize("name", TRANSFORMER)
def test_transformer_overlays_state_only_what_differs_and_every_setting(name):
    own, bases = own_keys(name)
    path = REPO / "configs" / name
    merged: dict[str, Any] = {}
    for base in bases:
        merged = merge_configs(merged, read_config_tree(path.parent / base))
    given = {"data": {"root": "/x"}, "model": {"pretrained": "/w"}}  # required paths
    below = flat(config_from_dict(merge_configs(merged, given)).to_dict())
    above = flat(config_from_dict(merge_configs(read_config_tree(path), given)).to_dict())
    assert {k for k in below if below[k] != above[k]} == set(flat(own))
    method = shipped(name).method
    section = next(s for _, m, s in BASES if m == method)
    stated = flat(read_config_tree(REPO / "configs" / name))
    sections = ["model", "train", "infer", "labels", "vit", section]
    if method.endswith("-cpal"):
        sections += PROTOTYPE_SECTIONS
    schema = flat(Config().to_dict())
    needed = {k for k in schema if k.split(".")[0] in sections}
    needed |= {"data.root", "data.train_split", "method", "seed"}
    assert needed - set(stated) == set()
    tree = read_config_tree(REPO / "configs" / name)
    assert tree["data"]["root"] is None and tree["model"]["pretrained"] is None


@pytest.mark.parametrize("dataset", DATASETS)
def test_mctformer_recipe(dataset):
    cfg = shipped(f"{dataset}/mctformer_deit_s.yaml")
    m, t, v, i = cfg.model, cfg.train, cfg.vit, cfg.infer
    assert (m.arch, m.width, v.depth, v.drop_path) == ("deit_small", 1.0, None, 0.1)
    assert (t.optimizer, t.schedule, t.lr, t.lr_reference_batch, t.batch_size) == (
        "adamw", "cosine", 5e-4, 512, 64)
    assert (t.epochs, t.weight_decay, t.decay_norm_and_bias, t.crop_size) == (60, 0.05, False,
                                                                              224)
    assert (t.warmup_epochs, t.warmup_lr, t.min_lr, t.head_lr_mult) == (5, 1e-6, 1e-5, 1.0)
    mct = cfg.mctformer
    assert (mct.fusion, mct.class_attention_blocks, mct.patch_refine, mct.refine_blocks) == (
        "fused", 3, True, None)
    assert (i.scales, i.flip) == ([1.0], True)
    assert differing(f"{dataset}/mctformer_deit_s.yaml",
                     f"{dataset}/mctformer_cpal_deit_s.yaml") == {
        "output_dir", "method", "train.grad_clip"}


@pytest.mark.parametrize("dataset", DATASETS)
def test_clip_es_settings(dataset):
    cfg = shipped(f"{dataset}/clip_es_vit_b16.yaml")
    c = cfg.clip_es
    assert (cfg.model.arch, cfg.model.require_pretrained) == ("clip_vit_b16", True)
    assert (c.template, c.attention_blocks, c.box_threshold, c.refine) == (
        "a clean origami {}.", 8, 0.4, True)
    assert (c.sinkhorn_iterations, c.affinity_squarings) == (3, 1)
    assert len(c.background) == {"voc12": 25, "coco14": 23}[dataset]
    assert ("keyboard" in c.background) == (dataset == "voc12")  # a COCO class
    assert (cfg.infer.scales, cfg.infer.flip) == ([1.0], False)
    with pytest.raises(ConfigError, match=r"'model.pretrained': required"):
        load_config(REPO / "configs" / dataset / "clip_es_vit_b16.yaml", [ROOT])
    assert differing(f"{dataset}/clip_es_vit_b16.yaml",
                     f"{dataset}/clip_es_cpal_vit_b16.yaml") == {"output_dir", "method",
                                                                 "train.grad_clip"}


@pytest.mark.parametrize("name", [n for n, _, _ in BASES])
def test_transformer_datasets_differ_only_in_data_keys(name):
    voc, coco = (f"{d}/{name}.yaml" for d in DATASETS)
    extra = {"clip_es.background"} if name.startswith("clip") else set()
    assert differing(voc, coco) == {"output_dir", "data.train_split", *extra}
