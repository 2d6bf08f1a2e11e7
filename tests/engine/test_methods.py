"""The prototype methods end to end: training, checkpointed bank, PACAM maps, ablation."""

import json

import numpy as np
import pytest
import torch

from cpal.ablation import ablate, format_tables
from cpal.config import load_config
from cpal.engine.checkpoint import latest_checkpoint, load_checkpoint
from cpal.engine.infer import load_trained_model
from cpal.engine.paths import RunPaths
from cpal.io import load_maps
from cpal.methods import ablation_ladder
from cpal.pipeline import run, stage_infer, stage_train
from tests.helpers import killed_in_second_epoch, tiny_overrides

PROTO = ["bank.size=16", "bank.clusters=3", "bank.recluster_every=2",
         "awareness.top_k=2"]


def _cfg(tiny_dataset, out, *extra):
    return load_config(None, [*tiny_overrides(tiny_dataset, out), *PROTO, *extra])


@pytest.mark.slow
def test_cpal_run_writes_pacam_maps_and_comparison_figure(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path / "run", "method=cpal")
    metrics = run(cfg, progress=False)
    paths = RunPaths(cfg.output_path)
    identity = json.loads((paths.maps("train") / "_maps.json").read_text())
    assert (identity["map"], identity["method"]) == ("pacam", "cpal")
    assert metrics["pseudo_labels"]["protocol"]["source"] == "labels:pacam (method cpal)"
    # PACAM maps carry their background channel: scored by argmax, no threshold, no GT.
    own = metrics["maps"]["train"]["own_background"]
    assert own["protocol"]["threshold_choice"] == "none" and own["miou"] is not None
    assert not own["protocol"]["gt_used_for_tuning"]
    record = load_maps(next(paths.maps("train").glob("*.npz")))
    assert record.background is not None and record.background.shape == record.maps.shape[1:]
    # The seeds are recorded as class indices of the image (or 255: no seed) and scored.
    assert record.seeds is not None and record.seeds.shape == record.maps.shape[1:]
    assert set(np.unique(record.seeds)) <= {0, 255, *record.classes.tolist()}
    seeds = metrics["maps"]["train"]["seeds"]
    assert seeds["protocol"]["threshold_choice"] == "none" and seeds["miou"] is not None
    assert (paths.figures / "cam_vs_pacam_train.png").stat().st_size > 10_000
    ckpt = load_checkpoint(latest_checkpoint(paths.checkpoints))
    bank_keys = [k for k in ckpt.model if k.startswith("cpal.bank.")]
    assert bank_keys, "the support bank must be saved with the model"


def test_bank_restored_from_checkpoint_and_frozen_at_inference(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path / "run", "method=cpal")
    stage_train(cfg, progress=False)
    ckpt = load_checkpoint(latest_checkpoint(RunPaths(cfg.output_path).checkpoints))
    model = load_trained_model(ckpt, cfg, 10, torch.device("cpu"))
    restored = {k: v for k, v in model.state_dict().items() if k.startswith("cpal.bank.")}
    for key, value in restored.items():
        assert torch.equal(value, ckpt.model[key]), key
    assert int(model.cpal.bank.counts().sum()) > 0
    stage_infer(cfg, progress=False)
    model_after = load_trained_model(ckpt, cfg, 10, torch.device("cpu"))
    for key, value in model_after.state_dict().items():
        if key.startswith("cpal.bank."):
            assert torch.equal(value, restored[key]), key


@pytest.mark.parametrize("method", ["sipe", "cpal"])
def test_resume_is_exact_with_prototypes(method, tiny_dataset, tmp_path):
    straight = _cfg(tiny_dataset, tmp_path / "a", f"method={method}")
    stage_train(straight, progress=False)
    crashed = _cfg(tiny_dataset, tmp_path / "b", f"method={method}")
    with pytest.raises(KeyboardInterrupt):
        stage_train(crashed, progress=False, hooks=killed_in_second_epoch())
    stage_train(crashed, progress=False)
    a = load_checkpoint(latest_checkpoint(RunPaths(straight.output_path).checkpoints)).model
    b = load_checkpoint(latest_checkpoint(RunPaths(crashed.output_path).checkpoints)).model
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_self_loss_is_logged_for_prototype_methods(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path / "run", "method=sipe", "train.epochs=1")
    stage_train(cfg, progress=False)
    log = RunPaths(cfg.output_path).train_log.read_text().splitlines()
    rows = [json.loads(line) for line in log]
    assert any("loss_self" in row and row["loss_self"] > 0 for row in rows)


def test_cam_method_rejects_pacam_map():
    from cpal.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'infer\.map': method cam writes cam, not pacam"):
        load_config(None, ["method=cam", "infer.map=pacam"])
    with pytest.raises(ConfigError, match=r"'infer\.map': invalid value 'pcam'; choose one of"):
        load_config(None, ["method=sipe", "infer.map=pcam"])


@pytest.mark.slow
def test_ablate_runs_every_variant_and_writes_tables(tiny_dataset, tmp_path):
    overrides = [*tiny_overrides(tiny_dataset, tmp_path / "abl"), *PROTO, "train.epochs=1",
                 "infer.scales=[1.0]", "viz.num_images=1"]
    md_path = ablate(None, overrides, seeds=1, progress=False)
    md = md_path.read_text()
    for variant in ablation_ladder():
        assert f"| {variant} |" in md
    assert "ORACLE" in md and "held-out" in md
    rows = (md_path.parent / "ablation.csv").read_text().splitlines()
    assert len(rows) == 1 + len(ablation_ladder())


def test_ablation_table_mean_and_std_by_hand():
    cfg = load_config(None, [])
    row = {"map": "pacam", "maps_oracle_threshold": 0.3, "pseudo_threshold": 0.35,
           "pseudo_protocol": "p"}
    results = {"cpal": [{**row, "maps_oracle": 50.0, "pseudo": 40.0,
                         "maps_fg_precision": 60.0, "maps_fg_recall": 70.0,
                         "maps_own_background": 30.0},
                        {**row, "maps_oracle": 54.0, "pseudo": 44.0,
                         "maps_fg_precision": 64.0, "maps_fg_recall": 80.0,
                         "maps_own_background": 34.0}],
               "old": [{**row, "maps_oracle": 50.0, "pseudo": 40.0}]}
    md, table_csv = format_tables(results, cfg, seeds=2)
    # mean 52, sample std sqrt(((50-52)^2 + (54-52)^2) / 1) = 2.83
    assert "| cpal | pacam | 52.0 ± 2.8 | 42.0 ± 2.8 | 62.0 / 75.0 | 32.0 ± 2.8 |" in md
    assert "52.00,2.83,42.00,2.83" in table_csv and ",62.00,75.00" in table_csv
    # Runs whose metrics predate object precision / recall show a dash, not a number.
    assert "| old | pacam | 50.0 ± 0.0 | 40.0 ± 0.0 | - | - |" in md


def test_self_detach_cam_keeps_l_self_out_of_the_cam():
    from cpal.engine.train import compute_loss
    from cpal.models.cam_net import build_network, classification_loss

    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    grads = {}
    for detach in (True, False):
        cfg = load_config(None, ["method=sipe", "model.arch=resnet18", "model.width=0.125",
                                 "model.frozen_bn=false",
                                 f"loss.self_detach_cam={str(detach).lower()}"])
        torch.manual_seed(1)
        net, _ = build_network(cfg, 3)
        loss, parts = compute_loss(net, images, labels, cfg)
        assert parts["self"] > 0
        loss.backward()
        grads[detach] = net.classifier.weight.grad.clone()
        net.zero_grad()
        classification_loss(net(images).logits, labels).backward()
        grads[f"cls{detach}"] = net.classifier.weight.grad.clone()
    # Default tolerance: the same classifier ops either way (measured bit-equal), while
    # the undetached gradient differs by O(10 %) of its largest entry, far beyond it.
    torch.testing.assert_close(grads[True], grads["clsTrue"])
    assert not torch.allclose(grads[False], grads["clsFalse"])
