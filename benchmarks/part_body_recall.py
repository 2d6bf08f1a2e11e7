"""Which object pixels a labelling of the built-in data finds: class parts or bodies.

The built-in generator knows each object's class part (the small patch that tells the
class); the rest of the body shares its appearance with other classes, distractors or the
background (docs/synthetic.md). This script re-renders each image's part mask from the
run's own data settings and scores label folders of runs against it: recall of part
pixels, recall of the rest of the body, and object precision, over a split's images. It
tests the explanation that a prototype map loses on `parts` because it misses the bodies
(docs/results.md).

    python benchmarks/part_body_recall.py RUN_DIR[:LABEL_SUBDIR] [...] [--split train]

LABEL_SUBDIR defaults to `labels/<split>` (the run's pseudo masks). GT masks and parts are
for this diagnostic only; nothing here feeds training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cpal.config import load_config
from cpal.data.images import load_mask
from cpal.data.synthetic import CLASS_NAMES, render_sample
from cpal.errors import CpalError
from cpal.evaluation.diagnostics import PartBodyRecall


def score_run(spec: str, split: str) -> dict[str, float | None]:
    run, _, sub = spec.partition(":")
    run_dir = Path(run)
    config = load_config(run_dir / "config.yaml")
    if config.data.root is not None:
        raise CpalError(f"{run_dir / 'config.yaml'}: data.root is set; part masks exist "
                        "only for the built-in data")
    s = config.data.synthetic
    label_dir = run_dir / (sub or f"labels/{split}")
    ids = sorted(p.stem for p in label_dir.glob(f"{split}_*.png"))
    if not ids:
        raise CpalError(f"{label_dir}: no label PNGs of split {split!r}")
    recall = PartBodyRecall()
    for image_id in ids:
        index = int(image_id.rsplit("_", 1)[1])
        sample = render_sample(s.seed, split, index, s.image_size, s.family)
        prediction = load_mask(label_dir / f"{image_id}.png", len(CLASS_NAMES))
        recall.update(prediction, sample.mask, sample.parts)
    return {"images": len(ids), **recall.to_dict()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR[:LABEL_SUBDIR]")
    parser.add_argument("--split", default="train")
    args = parser.parse_args()
    print(f"split {args.split}; recall = object pixels labelled with their GT class "
          "(GT ignore pixels left out)")
    print(f"{'run':60s} {'images':>6s} {'part R':>7s} {'body R':>7s} {'obj P':>7s} "
          f"{'part %':>7s}")
    for spec in args.runs:
        try:
            r = score_run(spec, args.split)
        except CpalError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{spec:60s} {r['images']:6d} {r['part_recall']:7.1f} {r['body_recall']:7.1f} "
              f"{r['object_precision']:7.1f} {r['part_share_of_objects']:7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
