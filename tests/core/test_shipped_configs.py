"""Every config under configs/ loads against the schema; the paper configs stay one recipe.

The six paper configs (configs/{voc12,coco14}/{cam,sipe,cpal}_r50.yaml) are full files
rather than a base + overlays (the loader has no includes), so these tests keep them from
drifting apart: within a dataset they may differ only in method-related keys, across
datasets only in the training split, and each states every setting that shapes a run.
"""

from pathlib import Path
from typing import Any

import pytest
import yaml

from cpal.config import Config, config_from_dict, load_config
from cpal.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.relative_to(REPO / "configs").as_posix()
                 for p in (REPO / "configs").rglob("*.yaml"))
DATASETS = ("voc12", "coco14")
METHODS = ("cam", "sipe", "cpal")
PAPER = [f"{d}/{m}_r50.yaml" for d in DATASETS for m in METHODS]
PROTOTYPE_SECTIONS = ("prototype", "bank", "awareness", "alignment", "loss")


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
    needs_root = bool(yaml.safe_load(path.read_text())["data"].get("require_root"))
    return load_config(path, ["data.root=/datasets/root"] if needs_root else [])


def resolved(name: str) -> dict[str, Any]:
    return flat(shipped(name).to_dict())


def differing(a: str, b: str) -> set[str]:
    x, y = resolved(a), resolved(b)
    return {k for k in x if x[k] != y[k]}


def test_paper_configs_exist():
    assert set(PAPER) <= set(CONFIGS)


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
    # No placeholder paths: both are absent and the header shows the exact override.
    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    assert raw["data"]["root"] is None and cfg.model.pretrained is None and cfg.data.require_root
    text = (REPO / "configs" / name).read_text()
    assert f"cpal run configs/{name} data.root=/path/" in text
    assert "model.pretrained=/path/resnet50-19c8e357.pth" in text


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_state_every_setting(name):
    """Nothing that shapes a paper run is left to a default that could change later."""
    raw = flat(yaml.safe_load((REPO / "configs" / name).read_text()))
    sections = ["model", "train", "infer", "labels"]
    if not name.split("/")[1].startswith("cam"):
        sections += PROTOTYPE_SECTIONS
    schema = flat(Config().to_dict())
    needed = {k for k in schema if k.split(".")[0] in sections}
    needed |= {"data.root", "data.train_split", "method", "seed"}
    assert needed - set(raw) == set()


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


def test_reference_numbers_are_the_same_in_every_header():
    def block(name: str) -> str:
        text = (REPO / "configs" / name).read_text()
        start = text.index("# What the references reported")
        return text[start:text.index("# What this config measures")]

    blocks = {block(name) for name in PAPER}
    assert len(blocks) == 1
    (text,) = blocks
    for number in ("48.3", "66.5", "63.5", "64.8", "58.6", "68.8", "69.7", "34.4", "40.6",
                   "71.9", "74.5", "74.7", "46.8"):
        assert number in text


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_refuse_a_missing_dataset_root(name):
    # A null root would otherwise select the built-in synthetic dataset without a word.
    with pytest.raises(ConfigError, match=r"'data.root': required"):
        load_config(REPO / "configs" / name)
