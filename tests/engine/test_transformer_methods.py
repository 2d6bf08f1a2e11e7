"""The transformer and CLIP methods through `cpal run` on tiny data: mctformer and
mctformer-cpal train and make maps; clip-es makes maps, labels and scores without a
training stage; clip-es-cpal trains only its prototype branch (checkpoints without the
frozen CLIP). Plus the config checks that keep each method on its own trunk."""

import json

import pytest
import torch

from cpal.config import load_config
from cpal.engine.checkpoint import latest_checkpoint, load_checkpoint
from cpal.engine.paths import RunPaths
from cpal.errors import ConfigError
from cpal.io import load_maps
from cpal.pipeline import run, stage_train
from tests.helpers import killed_in_second_epoch, tiny_overrides

TRUNKS = {"mctformer": ["model.arch=deit_tiny", "model.width=0.25", "vit.depth=2",
                        "train.optimizer=adamw", "train.schedule=cosine", "train.lr=1e-3",
                        "train.weight_decay=0.05", "train.decay_norm_and_bias=false"],
          "clip_es": ["model.arch=clip_vit_b16", "model.width=0.125", "vit.depth=2"]}
PROTO = ["bank.size=16", "bank.clusters=3", "bank.recluster_every=2", "awareness.top_k=2"]


def _cfg(tiny_dataset, out, method, *extra):
    trunk = TRUNKS["clip_es" if method.startswith("clip") else "mctformer"]
    return load_config(None, [*tiny_overrides(tiny_dataset, out), f"method={method}", *trunk,
                              *PROTO, *extra])


def _identity(cfg, split="train"):
    return json.loads((RunPaths(cfg.output_path).maps(split) / "_maps.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mctformer", "mctformer-cpal"])
def test_mctformer_methods_run_end_to_end(tiny_dataset, tmp_path, method):
    cfg = _cfg(tiny_dataset, tmp_path / "run", method)
    metrics = run(cfg, progress=False)
    identity = _identity(cfg)
    assert identity["map"] == ("cam" if method == "mctformer" else "pacam")
    assert identity["map_settings"]["mctformer"]["class_attention_blocks"] == 3
    assert metrics["pseudo_labels"]["miou"] is not None
    assert metrics["maps"]["train"]["oracle_best"]["miou"] is not None
    log = (RunPaths(cfg.output_path).train_log).read_text().splitlines()
    terms = set(json.loads(log[0]))
    assert {"loss_cls", "loss_patch"} <= terms
    assert ("loss_self" in terms) == (method == "mctformer-cpal")


@pytest.mark.slow
def test_clip_es_makes_maps_labels_and_scores_without_training(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path / "run", "clip-es")
    metrics = run(cfg, progress=False)
    paths = RunPaths(cfg.output_path)
    assert not paths.checkpoints.exists()
    stages = json.loads(paths.stages.read_text())
    assert "train" not in stages and {"infer", "evaluate", "labels", "figures"} <= set(stages)
    identity = _identity(cfg)
    assert identity["weights"] == "random initialisation" and "checkpoint" not in identity
    assert identity["map_settings"]["clip_es"]["template"] == "a clean origami {}."
    assert metrics["pseudo_labels"]["miou"] is not None
    record = load_maps(next(paths.maps("train").glob("*.npz")))
    assert record.maps.min() >= 0 and record.maps.max() <= 1
    with pytest.raises(ConfigError, match="clip-es makes its maps from pretrained weights"):
        stage_train(cfg, progress=False)
    # The same configuration again reuses the maps; other settings are refused.
    run(cfg, progress=False)
    other = _cfg(tiny_dataset, tmp_path / "run", "clip-es", "clip_es.box_threshold=0.5")
    with pytest.raises(ConfigError, match=r"maps made with other settings \(map_settings"):
        run(other, progress=False)


@pytest.mark.slow
def test_clip_es_cpal_trains_its_branch_only(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path / "run", "clip-es-cpal")
    metrics = run(cfg, progress=False)
    paths = RunPaths(cfg.output_path)
    ckpt = load_checkpoint(latest_checkpoint(paths.checkpoints))
    assert ckpt.model and all(k.startswith("cpal.") for k in ckpt.model)
    assert any(k.startswith("cpal.bank.") for k in ckpt.model)
    assert _identity(cfg)["map"] == "pacam"
    assert metrics["maps"]["train"]["own_background"]["miou"] is not None
    terms = set(json.loads(paths.train_log.read_text().splitlines()[0]))
    assert "loss_self" in terms and "loss_cls" not in terms


def test_each_method_runs_on_its_own_trunks():
    with pytest.raises(ConfigError, match=r"'model.arch': method mctformer runs on transformer "
                       r"archs \(deit_tiny, deit_small, deit_base\), not resnet50"):
        load_config(None, ["method=mctformer"])
    with pytest.raises(ConfigError, match=r"'model.arch': method cam runs on backbones"):
        load_config(None, ["model.arch=deit_small"])
    with pytest.raises(ConfigError, match=r"'model.pretrained': required by this config"):
        load_config(None, ["method=clip-es", "model.arch=clip_vit_b16",
                           "model.require_pretrained=true"])


def test_a_clip_file_needs_its_vocabulary(tmp_path):
    from cpal.models.cam_net import build_network

    path = tmp_path / "ViT-B-16.pt"
    path.write_bytes(b"\x80")
    cfg = load_config(None, ["method=clip-es", "model.arch=clip_vit_b16",
                             f"model.pretrained={path}"])
    with pytest.raises(ConfigError, match=r"'clip_es.tokenizer': required with model.pretrained"):
        build_network(cfg, 3, class_names=["a", "b", "c"])


def test_mctformer_resume_is_exact_with_stochastic_depth(tiny_dataset, tmp_path):
    """ViT's drop path draws from the global generator, which the trainer seeds per step:
    killed in its second epoch and resumed, the run ends with the uninterrupted one's
    weights."""
    runs = []
    for name, hooks in (("a", None), ("b", killed_in_second_epoch())):
        cfg = _cfg(tiny_dataset, tmp_path / name, "mctformer", "vit.drop_path=0.5")
        if hooks is not None:
            with pytest.raises(KeyboardInterrupt):
                stage_train(cfg, progress=False, hooks=hooks)
        stage_train(cfg, progress=False)
        runs.append(load_checkpoint(latest_checkpoint(RunPaths(cfg.output_path).checkpoints)))
    a, b = (run.model for run in runs)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
