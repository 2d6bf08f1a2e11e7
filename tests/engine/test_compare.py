"""`cpal compare`: each base alone and with CPAL; every arm an ordinary run under
OUTPUT/compare/<arm>/seed<k>/, one table with a column per stage and each number's
protocol, finished arms read back on a rerun, bad bases refused in one line."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

import cpal.compare as compare_module
from cpal.cli import main
from cpal.compare import BASES, compare, parse_bases
from cpal.errors import ConfigError
from cpal.io import write_json_atomic
from tests.helpers import chain_overrides, cli_error, tiny_overrides


def test_each_base_pairs_its_pipeline_with_cpal():
    by_name = {name: [(a.name, a.folder, a.overrides) for a in base.arms()]
               for name, base in BASES.items()}
    assert by_name["irn"] == [("irn", "irn", ("method=cam", "refine.method=irn")),
                              ("irn + cpal", "irn-cpal", ("method=cpal", "refine.method=irn"))]
    assert by_name["amn"][1][2] == ("method=cpal", "refine.method=amn")
    assert by_name["crf"][0][2] == ("method=cam", "refine.method=crf")
    assert by_name["mctformer"] == [
        ("mctformer", "mctformer", ("method=mctformer",)),
        ("mctformer + cpal", "mctformer-cpal", ("method=mctformer-cpal",))]
    assert by_name["clip-es"][1][2] == ("method=clip-es-cpal",)
    assert parse_bases(" irn,amn ,irn") == ["irn", "amn"]
    with pytest.raises(ConfigError, match=r"'--bases': unknown comparison base 'inr' \(did "
                                          r"you mean 'irn'\?\)"):
        parse_bases("inr")


def _protocol(split: str, what: str) -> dict:
    return {"split": split, "description": f"{split} (24 images) | {what}"}


def _fake_run(calls: list[str]):
    """A stand-in for `cpal.pipeline.run` that writes metrics.json as a run does."""

    def fake(cfg, **_):
        calls.append(cfg.output_dir)
        bump = 10.0 if cfg.method == "cpal" else 0.0
        metrics = {
            "seeds": {"miou": 40.0 + bump + cfg.seed, "protocol": _protocol("train", "seeds")},
            "pseudo_labels": {"miou": 50.0 + bump + 2 * cfg.seed,
                              "protocol": _protocol("train", f"{cfg.refine.method} labels")},
            "segmentation": {"miou": 45.0 + bump, "protocol": _protocol("val", "deeplab")},
        }
        write_json_atomic(Path(cfg.output_dir) / "metrics.json", metrics)
        return metrics

    return fake


def test_table_has_a_row_per_arm_a_column_per_stage_and_protocols(tiny_dataset, tmp_path,
                                                                  monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(compare_module, "run", _fake_run(calls))
    given = [f"data.root={tiny_dataset}", f"output_dir={tmp_path}", "irn.trunk=cam",
             "amn.trunk=cam"]
    md_path = compare(None, given, bases=["irn", "amn"], seeds=2)
    root = tmp_path / "compare"
    assert md_path == root / "compare.md"
    # Seed by seed: every arm of seed 0 runs before any arm of seed 1, so a comparison
    # stopped early keeps its rows paired.
    assert calls == [str(root / arm / f"seed{s}") for s in (0, 1)
                     for arm in ("irn", "irn-cpal", "amn", "amn-cpal")]
    md = md_path.read_text()
    assert ("| arm | method | refinement | runs | seeds mIoU, train | pseudo masks mIoU, train "
            "| segmentation mIoU, val |") in md
    # Seeds 0 and 1: seeds 40/41 (cam), pseudo 50/52; sample std of (40, 41) is 0.707.
    assert "| irn | cam | irn | 2 | 40.5 ± 0.7 [1] | 51.0 ± 1.4 [2] | 45.0 ± 0.0 [3] |" in md
    assert ("| amn + cpal | cpal | amn | 2 | 50.5 ± 0.7 [1] | 61.0 ± 1.4 [4] | 55.0 ± 0.0 [3] |"
            in md)
    assert "[2] train (24 images) \\| irn labels" in md
    assert "[4] train (24 images) \\| amn labels" in md
    assert "irn + cpal: `method=cpal refine.method=irn`" in md
    rows = list(csv.DictReader(io.StringIO((root / "compare.csv").read_text())))
    assert [r["arm"] for r in rows] == ["irn", "irn + cpal", "amn", "amn + cpal"]
    assert rows[1]["pseudo_labels_mean"] == "61.00" and rows[1]["pseudo_labels_std"] == "1.41"
    assert rows[1]["pseudo_labels_values"] == "60.00 62.00"
    assert rows[1]["segmentation_protocol"] == "val (24 images) | deeplab"
    marker = json.loads((root / "irn" / "seed1" / "compare_arm.json").read_text())
    assert marker["arm"] == "irn" and marker["seed"] == 1

    # A rerun reads every finished arm back and runs nothing; a third seed runs alone.
    calls.clear()
    assert compare(None, given, bases=["irn", "amn"], seeds=2).read_text() == md
    assert calls == []
    compare(None, given, bases=["irn"], seeds=3)
    assert sorted(calls) == sorted([str(root / "irn" / "seed2"), str(root / "irn-cpal" / "seed2")])
    # Other settings are another run: the folder's run resumes under them.
    calls.clear()
    compare(None, [*given, "labels.threshold=0.3"], bases=["irn"], seeds=1)
    assert len(calls) == 2


def test_a_stage_no_run_produced_has_no_column(tiny_dataset, tmp_path, monkeypatch):
    def fake(cfg, **_):
        metrics = {"seeds": {"miou": 40.0, "protocol": _protocol("train", "seeds")},
                   "pseudo_labels": {"miou": 40.0, "protocol": _protocol("train", "seeds")}}
        write_json_atomic(Path(cfg.output_dir) / "metrics.json", metrics)
        return metrics

    monkeypatch.setattr(compare_module, "run", fake)
    md = compare(None, [f"data.root={tiny_dataset}", f"output_dir={tmp_path}"], bases=["crf"],
                 seeds=1).read_text()
    assert "segmentation" not in md.splitlines()[0]
    assert "| crf | cam | crf | 1 | 40.0 [1] | 40.0 [1] |" in md  # one run: no std


def test_compare_runs_every_arm_on_tiny_data_and_reuses_them(tiny_dataset, tmp_path, capsys,
                                                              monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    out = tmp_path / "run"
    args = ["compare", str(config), *tiny_overrides(tiny_dataset, out), "--bases", "crf",
            "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for arm, method in (("crf", "cam"), ("crf-cpal", "cpal")):
        folder = out / "compare" / arm / "seed0"  # an ordinary run of its own
        stages = json.loads((folder / "stages.json").read_text())
        assert stages["refine"]["method"] == "crf" and "figures" in stages
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["pseudo_labels"]["source"] == "crf"
        assert metrics["maps"]["train"]["map"] == ("cam" if method == "cam" else "pacam")
        assert json.loads((folder / "compare_arm.json").read_text())["overrides"] == [
            f"method={method}", "refine.method=crf"]
    md = (out / "compare" / "compare.md").read_text()
    assert md in printed
    lines = md.splitlines()
    assert lines[0] == ("| arm | method | refinement | runs | seeds mIoU, train | pseudo masks "
                        "mIoU, train |")
    assert lines[2].startswith("| crf | cam | crf | 1 | ")
    assert lines[3].startswith("| crf + cpal | cpal | crf | 1 | ")
    protocols = [line for line in lines if line.startswith("[")]
    assert any("refinement: dense CRF (irn: 10 iterations" in p for p in protocols)
    assert all("train (24 images)" in p for p in protocols)

    def no_run(cfg, **_):
        raise AssertionError(f"{cfg.output_dir} was run again")

    monkeypatch.setattr(compare_module, "run", no_run)
    assert main(args) == 0
    assert (out / "compare" / "compare.md").read_text() == md


def test_bases_that_do_not_fit_the_config_are_refused_before_any_run(tiny_dataset, tmp_path,
                                                                      capsys):
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    out = tmp_path / "run"
    data = f"data.root={tiny_dataset}"
    assert main(["compare", str(config), data, f"output_dir={out}", "irn.trunk=cam",
                 "--bases", "irn,mctformer"]) == 2
    line = cli_error(capsys.readouterr().err)
    assert "--bases mctformer (arm 'mctformer'): 'model.arch': method mctformer runs on" in line
    assert not (out / "compare").exists()
    # A transformer config whose refinement builds a ResNet: refused before the first arm.
    assert main(["compare", str(config), data, f"output_dir={out}", "method=mctformer",
                 "model.arch=deit_tiny", "refine.method=irn", "--bases", "mctformer"]) == 2
    assert ("--bases mctformer (arm 'mctformer'): 'refine.method': irn builds IRNet on "
            "model.arch, which must be a ResNet, not deit_tiny") in cli_error(
        capsys.readouterr().err)
    assert not out.exists()
    assert main(["compare", str(config), f"output_dir={out}", "--bases", "amn,inr"]) == 2
    assert "'--bases': unknown comparison base 'inr' (did you mean 'irn'?)" in cli_error(
        capsys.readouterr().err)
    assert main(["compare", str(config), f"output_dir={out}", "--seeds", "0"]) == 2
    assert "--seeds must be >= 1, got 0" in cli_error(capsys.readouterr().err)


def test_bases_that_differ_in_refinement_alone_share_the_trained_network(tiny_dataset,
                                                                         tmp_path):
    """irn and crf train the same cam (and cpal) network: the second base's arms start from
    the first's checkpoints and maps (hard links) and train nothing themselves."""
    out = tmp_path / "run"
    overrides = [*tiny_overrides(tiny_dataset, out), *chain_overrides(), "segment.network=null"]
    md = compare(None, overrides, bases=["crf", "irn"], seeds=1, progress=False).read_text()
    root = out / "compare"
    for donor, reuser in (("crf", "irn"), ("crf-cpal", "irn-cpal")):
        first, second = root / donor / "seed0", root / reuser / "seed0"
        assert (first / "train_log.jsonl").is_file()  # trained here ...
        assert not (second / "train_log.jsonl").exists()  # ... and not again here
        ckpts = sorted(p.name for p in (first / "checkpoints").iterdir())
        assert ckpts and ckpts == sorted(p.name for p in (second / "checkpoints").iterdir())
        assert all((first / "checkpoints" / n).samefile(second / "checkpoints" / n)
                   for n in ckpts)
        maps = sorted((first / "maps" / "train").glob("*.npz"))
        assert maps and all(m.samefile(second / "maps" / "train" / m.name) for m in maps)
        stages = json.loads((second / "stages.json").read_text())
        assert stages["refine"]["method"] == "irn"
        assert json.loads((second / "compare_arm.json").read_text())["network_from"] == str(
            first)
        assert json.loads((first / "compare_arm.json").read_text())["network_from"] is None
    assert "| irn | cam | irn | 1 | " in md and "| irn + cpal | cpal | irn | 1 | " in md


def _share(cfg, trained):
    return compare_module._share_network(cfg, compare_module._network_settings(cfg), trained)


def test_a_shared_network_appears_whole_or_not_at_all(tiny_dataset, tmp_path, monkeypatch):
    """The donor's files are linked in a temporary folder renamed into place: a link that
    fails (a full disk) leaves no arm folder behind, and the rerun shares afresh; maps are
    taken only from an arm whose maps settings match, and nothing is shared when the arm
    may not resume (train.resume=false would refuse the linked checkpoints)."""
    from cpal.config import load_config
    from cpal.errors import OutputError

    donor = tmp_path / "compare" / "crf" / "seed0"
    (donor / "checkpoints").mkdir(parents=True)
    (donor / "checkpoints" / "epoch_001.safetensors").write_bytes(b"w")
    (donor / "checkpoints" / "epoch_001.json").write_text("{}")
    (donor / "maps" / "train").mkdir(parents=True)
    (donor / "maps" / "train" / "a.npz").write_bytes(b"m")
    target = tmp_path / "compare" / "irn" / "seed0"
    cfg = load_config(None, [f"data.root={tiny_dataset}", f"output_dir={target}"])
    trained = {compare_module._network_settings(cfg): donor}

    real = compare_module.link_tree
    calls = []

    def failing(source, dest):
        calls.append(source)
        if len(calls) == 2:
            raise OutputError(f"{dest}: cannot write (No space left on device)")
        return real(source, dest)

    monkeypatch.setattr(compare_module, "link_tree", failing)
    with pytest.raises(OutputError):
        _share(cfg, trained)
    assert not target.exists()
    monkeypatch.setattr(compare_module, "link_tree", real)
    assert _share(cfg, trained) == donor
    assert (target / "maps" / "train" / "a.npz").samefile(donor / "maps" / "train" / "a.npz")
    assert [p.name for p in target.parent.iterdir()] == ["seed0"]  # the stale staging: gone
    assert _share(cfg, trained) is None  # the folder exists now

    other = tmp_path / "compare" / "amn" / "seed0"  # same training, maps made otherwise
    cfg = load_config(None, [f"data.root={tiny_dataset}", f"output_dir={other}",
                             "infer.flip=false"])
    assert _share(cfg, trained) == donor
    assert (other / "checkpoints" / "epoch_001.json").is_file()
    assert not (other / "maps").exists()
    fresh = tmp_path / "compare" / "amn" / "seed1"
    cfg = load_config(None, [f"data.root={tiny_dataset}", f"output_dir={fresh}",
                             "train.resume=false"])
    assert _share(cfg, trained) is None and not fresh.exists()
    # Network and maps come from one arm: the one whose maps match, not the first trained.
    cfg = load_config(None, [f"data.root={tiny_dataset}", f"output_dir={fresh}"])
    key = compare_module._network_settings(cfg)
    assert _share(cfg, {(key[0], "maps made otherwise"): other,
                                               key: donor}) == donor
