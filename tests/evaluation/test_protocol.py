from __future__ import annotations

import json

import numpy as np
import pytest

from cpal.evaluation.protocol import Protocol, results_table


def _tuned() -> Protocol:
    return Protocol(
        split="train",
        num_images=2000,
        source="maps:cam",
        threshold=0.25,
        threshold_choice="tuned",
        tuned_on="val",
        inference="scales 1.0,0.5 + flip",
    )


def test_describe_tuned() -> None:
    assert _tuned().describe() == (
        "train (2000 images) | maps:cam, scales 1.0,0.5 + flip | "
        "bg threshold 0.25 tuned on val GT (held-out) | image labels: ground truth | "
        "refinement: none"
    )
    assert _tuned().gt_used_for_tuning


def test_describe_oracle_fills_tuned_on_and_says_oracle() -> None:
    protocol = Protocol("train", 1464, "maps:cam", 0.15000000000000002, "oracle")
    assert protocol.tuned_on == "train"
    assert protocol.gt_used_for_tuning
    assert protocol.describe() == (
        "train (1464 images) | maps:cam | "
        "bg threshold 0.15 ORACLE: tuned on train GT (the evaluated split) | "
        "image labels: ground truth | refinement: none"
    )


def test_describe_fixed_and_none() -> None:
    fixed = Protocol(
        "val",
        1,
        "maps:cam",
        0.3,
        "fixed",
        image_labels="classifier predictions",
        refinement="dense CRF",
    )
    assert not fixed.gt_used_for_tuning
    assert fixed.describe() == (
        "val (1 image) | maps:cam | bg threshold 0.3 fixed in advance | "
        "image labels: classifier predictions | refinement: dense CRF"
    )
    none = Protocol("val", 1449, "labels:png", None, "none")
    assert not none.gt_used_for_tuning
    assert "| no bg threshold |" in none.describe()


def test_numpy_scalars_are_normalised() -> None:
    protocol = Protocol("val", np.int64(12), "maps:cam", np.float32(0.25), "fixed")
    assert type(protocol.num_images) is int and type(protocol.threshold) is float
    with pytest.raises(ValueError, match="num_images"):
        Protocol("val", 12.0, "maps:cam", 0.25, "fixed")  # type: ignore[arg-type]


def test_to_dict_is_json_ready_and_flags_gt_use() -> None:
    data = _tuned().to_dict()
    json.dumps(data)
    assert data["gt_used_for_tuning"] is True
    assert data["tuned_on"] == "val"
    assert data["threshold"] == 0.25
    assert data["description"] == _tuned().describe()
    assert Protocol("val", 3, "maps:cam", 0.3, "fixed").to_dict()["gt_used_for_tuning"] is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold_choice": "tuned", "tuned_on": None}, "requires tuned_on"),
        ({"threshold_choice": "tuned", "tuned_on": "train"}, "oracle"),
        ({"threshold_choice": "oracle", "tuned_on": "val"}, "tuned"),
        ({"threshold_choice": "fixed", "tuned_on": "val"}, "involves no tuning"),
        ({"threshold_choice": "none", "threshold": None, "tuned_on": "val"}, "no tuning"),
        ({"threshold_choice": "none"}, "no threshold"),
        ({"threshold_choice": "fixed", "threshold": None}, "requires a threshold"),
        ({"threshold_choice": "fixed", "threshold": 1.5}, r"\[0, 1\]"),
        ({"threshold_choice": "fixed", "threshold": -0.1}, r"\[0, 1\]"),
        ({"threshold_choice": "guessed"}, "threshold_choice"),
        ({"threshold_choice": "fixed", "num_images": -1}, "num_images"),
    ],
)
def test_validation_errors(kwargs: dict, message: str) -> None:
    fields = {
        "split": "train",
        "num_images": 10,
        "source": "maps:cam",
        "threshold": 0.25,
    }
    fields.update(kwargs)
    with pytest.raises(ValueError, match=message):
        Protocol(**fields)


def test_results_table_format() -> None:
    fixed = Protocol("val", 1449, "maps:cam", 0.3, "fixed")
    table = results_table([("CAM", 0.48361, _tuned()), ("CAM | val", 0.5, fixed)])
    lines = table.splitlines()
    assert lines[0] == "| result | mIoU (%) | protocol |"
    assert lines[1] == "|---|---:|---|"
    assert lines[2] == (
        "| CAM | 48.4 | train (2000 images) \\| maps:cam, scales 1.0,0.5 + flip \\| "
        "bg threshold 0.25 tuned on val GT (held-out) \\| image labels: ground truth \\| "
        "refinement: none |"
    )
    assert lines[3].startswith("| CAM \\| val | 50.0 | val (1449 images) \\| ")
    assert len(lines) == 4
    # Unescaped pipes delimit exactly three cells on every row.
    for line in lines:
        assert line.replace("\\|", "").count("|") == 4


def test_results_table_rejects_percentages() -> None:
    with pytest.raises(ValueError, match="fraction"):
        results_table([("CAM", 48.4, _tuned())])
    assert "| n/a |" in results_table([("empty", float("nan"), _tuned())])


def test_from_dict_round_trip():
    p = Protocol(split="train", num_images=5, source="labels:cam", threshold=0.3,
                 threshold_choice="tuned", tuned_on="val", inference="scales 1 + flip")
    assert Protocol.from_dict(p.to_dict()) == p


def test_a_tuning_split_that_shares_images_is_not_called_held_out():
    tuned = Protocol(split="train", num_images=24, source="labels:cam", threshold=0.3,
                     threshold_choice="tuned", tuned_on="val", tuning_overlap=2)
    assert "tuned on val GT (NOT held out: 2 of its images are also in train)" in (
        tuned.describe())
    assert Protocol.from_dict(tuned.to_dict()) == tuned
    held_out = Protocol(split="train", num_images=24, source="labels:cam", threshold=0.3,
                        threshold_choice="tuned", tuned_on="val")
    assert "tuned on val GT (held-out)" in held_out.describe()
    with pytest.raises(ValueError, match="tuning_overlap"):
        Protocol(split="train", num_images=24, source="labels:cam", threshold=0.3,
                 threshold_choice="fixed", tuning_overlap=1)
