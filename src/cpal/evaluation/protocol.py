"""The evaluation protocol, printed beside every number.

WSSS papers report pseudo-mask mIoU on the *train* split with a background threshold
that is often chosen by looking at that very split's ground truth. Such a number is an
upper bound, not a result. `Protocol` records how a number was produced (which split,
which maps, how the threshold was chosen, which image labels gated the classes) and
refuses contradictory descriptions, so that an oracle number cannot be printed as if it
were a held-out one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from numbers import Integral
from typing import Any, Literal

__all__ = ["THRESHOLD_CHOICES", "Protocol", "results_table"]

ThresholdChoice = Literal["fixed", "tuned", "oracle", "none"]
THRESHOLD_CHOICES: tuple[str, ...] = ("fixed", "tuned", "oracle", "none")


def _format_threshold(value: float) -> str:
    return f"{value:g}"  # 0.15000000000000002 -> 0.15


@dataclass(frozen=True)
class Protocol:
    """How one reported number was obtained.

    threshold_choice:
      fixed  -- set in advance, no ground truth involved;
      tuned  -- chosen by a sweep on the ground truth of a different (held-out) split;
      oracle -- chosen on the ground truth of the evaluated split itself (an upper bound);
      none   -- no threshold (e.g. evaluating finished label maps).
    """

    split: str
    num_images: int
    source: str
    threshold: float | None
    threshold_choice: ThresholdChoice
    tuned_on: str | None = None
    image_labels: str = "ground truth"
    inference: str = ""
    refinement: str = "none"
    tuning_overlap: int = 0
    """Images the tuning split shares with the evaluated one (threshold_choice 'tuned'):
    0 for a held-out split; more, accepted with labels.allow_split_overlap, is reported as
    not held out."""

    def __post_init__(self) -> None:
        if not self.split:
            raise ValueError("Protocol.split must name the evaluated split")
        if not self.source:
            raise ValueError("Protocol.source must say what was evaluated")
        if isinstance(self.num_images, bool) or not isinstance(self.num_images, Integral):
            raise ValueError(f"Protocol.num_images must be an int, got {self.num_images!r}")
        object.__setattr__(self, "num_images", int(self.num_images))  # numpy ints -> int
        if self.num_images < 0:
            raise ValueError(f"Protocol.num_images must be >= 0, got {self.num_images}")
        choice = self.threshold_choice
        if choice not in THRESHOLD_CHOICES:
            raise ValueError(
                f"Protocol.threshold_choice must be one of {THRESHOLD_CHOICES}, got {choice!r}"
            )
        if choice == "none":
            if self.threshold is not None:
                raise ValueError(
                    "threshold_choice 'none' means no threshold, but threshold="
                    f"{self.threshold} was given"
                )
        else:
            if self.threshold is None:
                raise ValueError(f"threshold_choice {choice!r} requires a threshold")
            value = float(self.threshold)
            if math.isnan(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")
            object.__setattr__(self, "threshold", value)  # numpy floats -> float
        if choice == "tuned":
            if self.tuned_on is None:
                raise ValueError("threshold_choice 'tuned' requires tuned_on (the held-out split)")
            if self.tuned_on == self.split:
                raise ValueError(
                    f"threshold tuned on {self.split!r}, the evaluated split itself: "
                    "that is threshold_choice 'oracle', not 'tuned'"
                )
        elif choice == "oracle":
            if self.tuned_on is None:
                object.__setattr__(self, "tuned_on", self.split)
            elif self.tuned_on != self.split:
                raise ValueError(
                    f"threshold_choice 'oracle' means tuned on the evaluated split "
                    f"{self.split!r}, but tuned_on={self.tuned_on!r}; use 'tuned'"
                )
        elif self.tuned_on is not None:
            raise ValueError(
                f"threshold_choice {choice!r} involves no tuning, but tuned_on="
                f"{self.tuned_on!r} was given"
            )
        overlap = self.tuning_overlap
        if isinstance(overlap, bool) or not isinstance(overlap, Integral) or overlap < 0:
            raise ValueError(f"Protocol.tuning_overlap must be an int >= 0, got {overlap!r}")
        object.__setattr__(self, "tuning_overlap", int(overlap))
        if overlap and choice != "tuned":
            raise ValueError(
                f"tuning_overlap counts images shared with a tuning split; threshold_choice "
                f"{choice!r} has none"
            )

    @property
    def gt_used_for_tuning(self) -> bool:
        """Whether any ground-truth mask influenced the number (through the threshold)."""
        return self.threshold_choice in ("tuned", "oracle")

    def _threshold_text(self) -> str:
        if self.threshold_choice == "none":
            return "no bg threshold"
        assert self.threshold is not None  # guaranteed by __post_init__
        text = f"bg threshold {_format_threshold(self.threshold)}"
        if self.threshold_choice == "fixed":
            return f"{text} fixed in advance"
        if self.threshold_choice == "tuned":
            if self.tuning_overlap:
                shared = f"{self.tuning_overlap} of its images are also in {self.split}"
                return f"{text} tuned on {self.tuned_on} GT (NOT held out: {shared})"
            return f"{text} tuned on {self.tuned_on} GT (held-out)"
        return f"{text} ORACLE: tuned on {self.split} GT (the evaluated split)"

    def describe(self) -> str:
        """One line, e.g. 'train (2000 images) | maps:cam, scales 1.0 + flip | bg threshold
        0.25 tuned on val GT (held-out) | image labels: ground truth | refinement: none'."""
        noun = "image" if self.num_images == 1 else "images"
        what = f"{self.source}, {self.inference}" if self.inference else self.source
        return " | ".join(
            [
                f"{self.split} ({self.num_images} {noun})",
                what,
                self._threshold_text(),
                f"image labels: {self.image_labels}",
                f"refinement: {self.refinement}",
            ]
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Protocol:
        """Inverse of `to_dict` (derived entries are recomputed, not trusted)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus `gt_used_for_tuning` and the one-line description."""
        data = asdict(self)
        data["gt_used_for_tuning"] = self.gt_used_for_tuning
        data["description"] = self.describe()
        return data


def _cell(text: str) -> str:
    """Escape a Markdown table cell: describe() itself uses ' | ' separators."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def results_table(rows: Sequence[tuple[str, float, Protocol]]) -> str:
    """A Markdown table | result | mIoU (%) | protocol |.

    mIoU is given as a fraction (as `SegmentationScores.miou`) and printed in percent
    with one decimal; a value above 1 raises, because it is almost surely a percentage
    passed twice. NaN prints as 'n/a'.
    """
    lines = ["| result | mIoU (%) | protocol |", "|---|---:|---|"]
    for name, miou, protocol in rows:
        value = float(miou)
        if math.isnan(value):
            shown = "n/a"
        elif not 0.0 <= value <= 1.0:
            raise ValueError(
                f"mIoU for {name!r} is {miou}; results_table expects a fraction in [0, 1]"
            )
        else:
            shown = f"{100.0 * value:.1f}"
        lines.append(f"| {_cell(name)} | {shown} | {_cell(protocol.describe())} |")
    return "\n".join(lines) + "\n"
