from pathlib import Path

import pytest

from cpal.config import Config, config_from_dict, load_config, merge_configs, read_config_tree
from cpal.errors import ConfigError
from tests.helpers import REPO


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
        ("model.arch=resnet99", r"'model\.arch': unknown arch 'resnet99' \(did you mean "
                                r"'resnet50'\?\); choose one of resnet18, resnet34, "),
        ("method=cpall", r"'method': unknown method 'cpall' \(did you mean 'cpal'\?\); choose "
                         r"one of cam, sipe, cpal-mean, cpal-topk, cpal, mctformer, "
                         r"mctformer-cpal, clip-es, clip-es-cpal$"),
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


def _cli_error(argv: list[str], capsys) -> str:
    """Run the CLI, expect exit 2, return its one-line error."""
    from cpal.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cpal: error: ") and "\n" not in err, err
    return err


def test_unparsable_override_value_names_the_override(tmp_path, capsys):
    path = _write(tmp_path, "seed: 1\n")
    err = _cli_error(["config", str(path), "infer.scales=[1.0,"], capsys)
    assert "override 'infer.scales=[1.0,': invalid YAML" in err and "line 1, column 6" in err


def test_config_that_is_not_utf8_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes("seed: 1\n# caf\u00e9 au lait\n".encode("latin-1"))
    err = _cli_error(["config", str(path)], capsys)
    assert f"{path} line 2: not UTF-8 text (byte 0xe9)" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  epochs: 1\nseed: 2\ntrain:\n  lr: 0.1\n",
         r"line 4: key 'train' given twice \(first on line 1\)"),
        ("train:\n  epochs: 1\n  epochs: 2\n",
         r"line 3: key 'train\.epochs' given twice \(first on line 2\)"),
        ("infer:\n  splits: [train, val]\n  scales: [1.0]\n  splits: [val]\n",
         r"line 4: key 'infer\.splits' given twice"),
    ],
)
def test_a_key_given_twice_is_an_error_naming_key_and_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=r"c\.yaml " + message):
        load_config(_write(tmp_path, text))


def test_yaml_merge_keys_still_override():
    from cpal.config import parse_yaml

    # `<<: *anchor` then one of the anchor's keys is a deliberate override, not a duplicate.
    text = "base: &b {a: 1, b: 2}\nx:\n  <<: *b\n  a: 3\n"
    assert parse_yaml(text, "t") == {"base": {"a": 1, "b": 2}, "x": {"a": 3, "b": 2}}


def test_a_config_inherits_its_bases_in_order(tmp_path):
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "recipe.yaml").write_text(
        "seed: 1\ntrain:\n  epochs: 3\n  lr: 0.5\n  resize_long: [100, 200]\n"
        "infer:\n  scales: [1.0, 0.5]\n")
    (tmp_path / "bases" / "more.yaml").write_text(
        "_base_: recipe.yaml\ntrain:\n  epochs: 4\nviz:\n  num_images: 2\n")
    (tmp_path / "bases" / "other.yaml").write_text("seed: 2\ninfer:\n  scales: [2.0]\n")
    child = tmp_path / "run.yaml"
    child.write_text("_base_: [bases/more.yaml, bases/other.yaml]\ntrain:\n  lr: 0.25\n"
                     "  resize_long: [50, 60]\n")
    cfg = load_config(child, ["train.hflip=false"])
    # Later bases win over earlier ones, the file over its bases, overrides over all;
    # mappings merge key by key, lists are replaced whole.
    assert (cfg.seed, cfg.train.epochs, cfg.train.lr, cfg.viz.num_images) == (2, 4, 0.25, 2)
    assert cfg.train.resize_long == [50, 60] and cfg.infer.scales == [2.0]
    assert cfg.train.hflip is False
    tree = read_config_tree(child)
    assert "_base_" not in tree and tree["train"] == {"epochs": 4, "lr": 0.25,
                                                      "resize_long": [50, 60]}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("_base_: missing.yaml\n", r"c\.yaml: _base_ 'missing\.yaml' not found \(looked for "),
        ("_base_: 3\n", r"c\.yaml: '_base_' must be a path or a list of paths, got 3"),
        ("_base_: []\n", r"'_base_' must be a path or a list of paths"),
        ("_base_: c.yaml\n", r"c\.yaml: _base_ files include each other \(.*c\.yaml -> "),
    ],
)
def test_bad_bases_are_one_line_naming_the_file(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text))


def test_an_error_in_a_base_names_the_base(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 1\ntrain:\n  lr: 1\n")
    child = _write(tmp_path, "_base_: base.yaml\n")
    with pytest.raises(ConfigError, match=r"base\.yaml line 3: key 'train' given twice"):
        load_config(child)


def test_merge_configs_replaces_lists_and_merges_mappings():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    assert merge_configs(base, {"a": {"y": [3]}, "c": None}) == {
        "a": {"x": 1, "y": [3]}, "b": 1, "c": None}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1}  # inputs untouched


def test_a_section_given_in_part_keeps_the_rest_of_its_own_default(tmp_path):
    """`amn.train: {crop_size: 192}` (as configs/demo.yaml writes it) changes the crop and
    keeps AMN's schedule: Adam at 5e-6 for 5 epochs of batch 16, not the generic stage
    schedule's SGD-style 0.01 for 1 epoch (which made AMN diverge on the demo)."""
    from cpal.config import load_config

    amn = load_config(None, []).amn.train
    for cfg in (load_config(None, ["amn.train.crop_size=192"]),
                load_config(_write(tmp_path, "amn:\n  train:\n    crop_size: 192\n"), [])):
        given = cfg.amn.train
        assert given.crop_size == 192
        assert (given.epochs, given.batch_size, given.lr, given.momentum, given.poly_power) == (
            amn.epochs, amn.batch_size, amn.lr, amn.momentum, amn.poly_power) == (
            5, 16, 5e-6, 0.0, 0.0)
    irn = load_config(None, ["irn.train.batch_size=8"]).irn.train
    assert (irn.batch_size, irn.epochs, irn.crop_size, irn.lr) == (8, 3, 512, 0.1)
    # The shipped demo recipe: AMN's own schedule on the demo's crops.
    demo = load_config(str(Path(__file__).parents[2] / "configs" / "demo.yaml"), []).amn.train
    assert (demo.crop_size, demo.scale_range, demo.lr, demo.epochs) == (
        192, [0.75, 1.25], 5e-6, 5)
