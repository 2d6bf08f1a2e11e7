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
from cpal.data.synthetic.store import sample_id
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
    count = {"train": s.num_train, "val": s.num_val}.get(split)
    if count is None:
        raise CpalError(f"split {split!r}: the built-in data has train and val")
    label_dir = run_dir / (sub or f"labels/{split}")
    recall = PartBodyRecall()
    for index in range(1, count + 1):
        path = label_dir / f"{sample_id(split, index)}.png"
        if not path.is_file():
            raise CpalError(f"{path}: label PNG not found")
        sample = render_sample(s.seed, split, index, s.image_size, s.family)
        recall.update(load_mask(path, len(CLASS_NAMES)), sample.mask, sample.parts)
    return {"images": count, **recall.to_dict()}


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
