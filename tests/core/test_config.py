from pathlib import Path

import pytest

from cpal.config import Config, config_from_dict, load_config
from cpal.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides_are_typed(tmp_path):
    path = _write(tmp_path, "train:\n  epochs: 3\nmodel:\n  arch: resnet18\n")
    cfg = load_config(path, ["train.lr=1e-3", "infer.scales=[1.0, 0.5]", "model.width=0.5",
                             "labels.threshold=null", "output_dir=out"])
    assert cfg.train.epochs == 3 and cfg.model.arch == "resnet18"
    # approx: 1e-3 parsed from text is exact up to float repr.
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.infer.scales == [1.0, 0.5]
    assert cfg.labels.threshold is None
    assert Path(cfg.output_dir).is_absolute() and cfg.output_dir.endswith("out")


def test_unknown_key_names_valid_choices(tmp_path):
    path = _write(tmp_path, "train:\n  epoch: 3\n")
    expected = r"unknown key 'train\.epoch' \(did you mean 'train\.epochs'\?\)"
    with pytest.raises(ConfigError, match=expected):
        load_config(path)
    with pytest.raises(ConfigError, match=r"valid keys: .*train\.batch_size"):
        load_config(None, ["train.bogus=1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.arch=resnet999", r"'model\.arch': invalid value 'resnet999'; choose one of"),
        ("train.epochs=two", r"'train\.epochs': expected an integer"),
        ("train.hflip=maybe", r"'train\.hflip': expected true or false"),
        ("model.output_stride=32", r"'model\.output_stride'"),
        ("train.momentum=1.5", r"'train\.momentum': must be in \[0, 1\)"),
        ("labels.threshold=2", r"'labels\.threshold': must lie in \[0, 1\]"),
        ("train.resize_long=[10, 5]", r"'train\.resize_long'"),
        ("device=tpu", r"'device'"),
        ("train", r"KEY=VALUE"),
        ("train.epochs.x=1", r"'train\.epochs': expected an integer"),
        ("train.log_every=0", r"'train\.log_every': must be >= 1"),
        ("viz.num_images=0", r"'viz\.num_images': must be >= 1"),
        ("threads=-1", r"'threads': must be >= 1 or null"),
        ("train.weight_decay=-1", r"'train\.weight_decay'"),
        ("infer.splits=[val]", r"'labels\.split': split 'train' has no maps: add it to infer"),
    ],
)
def test_bad_values_fail_with_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_yaml_names_file(tmp_path):
    path = _write(tmp_path, "train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_through_yaml():
    import yaml

    cfg = load_config(None, ["seed=7", "viz.num_images=3"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert isinstance(cfg, Config)
