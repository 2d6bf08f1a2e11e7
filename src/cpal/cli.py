"""The `cpal` command: one subcommand per stage, and `run` to chain them.

Every subcommand takes the same CONFIG [KEY=VALUE ...] arguments, so a stage can be
rerun alone on the files of a previous run. Errors in user input print one line and exit
with status 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpal import __version__
from cpal.config import Config, load_config
from cpal.errors import ConfigError, CpalError, DatasetError, warn
from cpal.log import get_logger
from cpal.methods import ablation_ladder

_log = get_logger(__name__)

_STAGE_HELP = {
    "run": "train -> maps -> evaluation -> refinement -> pseudo masks -> segmentation "
           "network -> its evaluation -> figures",
    "train": "train the CAM network (resumes from the newest checkpoint)",
    "infer": "multi-scale + flip maps, one .npz per image (skips finished images)",
    "evaluate": "score maps against GT over all background thresholds",
    "refine": "refine the maps by refine.method (crf, irn, amn) into label PNGs and score them",
    "labels": "seeds and final pseudo masks (OUT/labels/<split>/) as palette PNGs, scored",
    "segment": "train segment.network on the pseudo masks (resumes)",
    "segment-eval": "predict segment.splits with the segmentation network and score them",
    "figures": "overlay grid, threshold-sweep curve, per-class IoU chart",
    "config": "print the resolved configuration",
}


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override config keys, e.g. train.epochs=2 output_dir=runs/x")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--force", action="store_true",
                        help="write into an output_dir that holds other files than a cpal "
                             "run (same as output_dir_force=true)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpal", description="Weakly supervised semantic segmentation with CPAL."
    )
    parser.add_argument("--version", action="version", version=f"cpal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in _STAGE_HELP.items():
        stage = sub.add_parser(name, help=text, description=text)
        _add_config_args(stage)
        if name == "infer":
            stage.add_argument("--shard", metavar="I/N", default=None,
                               help="write only shard I (0-based) of N of every split "
                                    "(same as infer.shard=I/N)")
        if name == "evaluate":
            stage.add_argument("--labels", type=Path, metavar="DIR",
                               help="score the label PNGs in DIR instead of the run's maps")
            stage.add_argument("--split", default=None,
                               help="split of the --labels images (default: labels.split)")
    predict = sub.add_parser(
        "predict", help="a run's trained network on a folder of new images",
        description="Writes OUT/<stem>.png (palette labels), <stem>_overlay.png and <stem>.json "
                    "(classes found) per image of --images, with the run's segmentation "
                    "network, or its CAM network and the image labels it predicts when there "
                    "is none (predict.source). Skips images already done; names unreadable "
                    "files in one line each and exits with status 2 if there was any.")
    _add_config_args(predict)
    predict.add_argument("--images", type=Path, required=True, metavar="DIR",
                         help="folder of images (no labels or masks needed)")
    predict.add_argument("--out", type=Path, required=True, metavar="DIR",
                         help="where the predictions go")
    ablate = sub.add_parser(
        "ablate", help="train every variant on the same data and seeds; write a table",
        description=f"Runs {', '.join(ablation_ladder())} (and optional sweeps) "
        "under OUTPUT_DIR/ablation/ and writes ablation.md and ablation.csv there.",
    )
    _add_config_args(ablate)
    ablate.add_argument("--seeds", type=int, default=1, help="seeds per variant (default 1)")
    ablate.add_argument("--sweeps-only", action="store_true",
                        help="run only the --sweep arms, not the five variants")
    ablate.add_argument("--sweep", action="append", default=[],
                        choices=["score", "k", "earlier", "sfc", "context"],
                        help="also sweep the positiveness score (dot/cosine/l2, on raw "
                        "prototypes: prototype.normalize=false), K, this library's earlier "
                        "choices on the faithful sipe (one at a time), SFC's additions, or "
                        "what cpal's context does (background without context, alpha 0.25)")
    compare = sub.add_parser(
        "compare", help="each base pipeline alone and with CPAL on the same data and seeds; "
                        "one table",
        description="For each base (irn, amn, crf: method=cam vs method=cpal with that "
        "refinement; mctformer, clip-es: the method vs its -cpal variant) runs both arms for "
        "--seeds seeds under OUTPUT_DIR/compare/<arm>/seed<k>/ (resumable; finished arms are "
        "read back) and writes compare.md and compare.csv there: seeds, pseudo masks and "
        "segmentation mIoU, mean ± std, each with its protocol.",
    )
    _add_config_args(compare)
    compare.add_argument("--bases", default="irn", metavar="NAME[,NAME...]",
                         help="comma-separated bases: irn, amn, crf, mctformer, clip-es "
                              "(default irn)")
    compare.add_argument("--seeds", type=int, default=1, help="seeds per arm (default 1)")
    data = sub.add_parser("data", help="dataset utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    gen = data_sub.add_parser("generate", help="generate the built-in dataset; print its root")
    _add_config_args(gen)
    check = data_sub.add_parser("check", help="validate a dataset split by split")
    _add_config_args(check)
    check.add_argument("--decode", action="store_true", help="decode every image and mask")
    check.add_argument("--masks", action="store_true",
                       help="require a GT mask for every image (default: check masks of the "
                            "splits that have them all)")
    _add_prepare_parsers(data_sub)
    return parser


def _add_prepare_parsers(data_sub: Any) -> None:
    """`cpal data prepare voc|coco` and `cpal data verify`: they take a dataset root, not a
    config (the defaults below keep `main`'s config handling uniform)."""
    no_config = {"config": None, "overrides": []}
    prepare = data_sub.add_parser(
        "prepare", help="turn VOC 2012 (+SBD) or COCO 2014 into a root cpal reads",
        description="Adds lists, labels, masks and cpal_manifest.json under --root; never "
                    "modifies the files already there.")
    datasets = prepare.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    voc = datasets.add_parser(
        "voc", help="PASCAL VOC 2012, optionally with SBD (train_aug)",
        description="Checks a VOC2012 folder and writes image_labels.json from Annotations; "
                    "with --sbd also train_aug.txt (10,582 ids) and SegmentationClassAug/.")
    voc.add_argument("--root", type=Path, required=True,
                     help="the VOC2012 folder (JPEGImages, SegmentationClass, Annotations, "
                          "ImageSets/Segmentation)")
    voc.add_argument("--sbd", type=Path, metavar="DIR",
                     help="SBD's benchmark_RELEASE/dataset folder (cls/*.mat, train.txt, val.txt)")
    coco = datasets.add_parser(
        "coco", help="COCO 2014: semantic masks from instances_{train,val}2014.json",
        description="Writes a VOC-layout root inside the COCO2014 folder: classes.txt, "
                    "JPEGImages/ (links), SegmentationClass/, lists, image_labels.json.")
    coco.add_argument("--root", type=Path, required=True,
                      help="the COCO2014 folder (train2014/, val2014/, annotations/)")
    coco.add_argument("--link", choices=["symlink", "hardlink"], default="symlink",
                      help="how JPEGImages/ refers to the images (default: relative symlinks)")
    verify = data_sub.add_parser(
        "verify", help="re-check a prepared root against its cpal_manifest.json",
        description="Checks list and label checksums, counts, every listed image and mask, "
                    "mask values and sizes; prints every problem, exits 2 if there is any.")
    verify.add_argument("--root", type=Path, required=True, help="a prepared dataset root")
    for parser in (voc, coco, verify):
        parser.add_argument("--workers", type=int, default=None,
                            help="processes for per-image work (default: CPUs, at most 8)")
        parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
        parser.set_defaults(**no_config)
    for parser in (voc, coco):
        parser.add_argument("--checksum-images", action="store_true",
                            help="also record the SHA-256 of every image (slow: reads them all)")


def _cmd_run(cfg: Config, args: argparse.Namespace) -> Any:
    from cpal.pipeline import run, summary_table

    if run(cfg, progress=not args.no_progress):  # {} on processes other than rank 0
        print(summary_table(cfg))


def _cmd_train(cfg: Config, args: argparse.Namespace) -> Any:
    from cpal.pipeline import stage_train

    return stage_train(cfg, progress=not args.no_progress)


def _cmd_infer(cfg: Config, args: argparse.Namespace) -> Any:
    from cpal.pipeline import stage_infer

    return {"images_written": stage_infer(cfg, progress=not args.no_progress)}


def _cmd_evaluate(cfg: Config, args: argparse.Namespace) -> Any:
    from cpal.data.source import open_dataset
    from cpal.evaluation.scoring import evaluate_label_dir
    from cpal.pipeline import stage_evaluate, summary_table

    if args.labels is not None:
        result = evaluate_label_dir(open_dataset(cfg.data), args.labels.resolve(),
                                    args.split or cfg.labels.split).to_dict()
        print(f"mIoU {result['miou']:.2f}  [{result['protocol']['description']}]")
        return result
    stage_evaluate(cfg)
    print(summary_table(cfg))


def _cmd_labels(cfg: Config, args: argparse.Namespace) -> Any:
    from cpal.pipeline import stage_labels, summary_table

    stage_labels(cfg, progress=not args.no_progress)
    print(summary_table(cfg))


def _cmd_refine(cfg: Config, args: argparse.Namespace) -> Any:
    from cpal.pipeline import stage_refine, summary_table

    stage_refine(cfg, progress=not args.no_progress)
    print(summary_table(cfg))


def _cmd_segment(cfg: Config, args: argparse.Namespace) -> Any:
    from cpal.pipeline import stage_segment

    return stage_segment(cfg, progress=not args.no_progress)


def _cmd_segment_eval(cfg: Config, args: argparse.Namespace) -> Any:
    from cpal.pipeline import stage_segment_eval, summary_table

    stage_segment_eval(cfg, progress=not args.no_progress)
    print(summary_table(cfg))


@dataclass(frozen=True)
class ExitWith:
    """A command's result printed as usual, then exit with `code` (partial failures)."""

    result: Any
    code: int


def _cmd_predict(cfg: Config, args: argparse.Namespace) -> Any:
    from cpal.predict import predict_folder

    done = predict_folder(cfg, args.images, args.out, progress=not args.no_progress)
    return ExitWith(done.to_dict(), 2 if done.failed else 0)


def _cmd_figures(cfg: Config, args: argparse.Namespace) -> Any:
    from cpal.pipeline import stage_figures

    return {"figures": [str(p) for p in stage_figures(cfg)]}


def _cmd_ablate(cfg: Config, args: argparse.Namespace) -> Any:
    from cpal.ablation import ablate

    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    if args.sweeps_only and not args.sweep:
        raise ConfigError("--sweeps-only needs at least one --sweep (score, k, earlier, sfc "
                          "or context)")
    path = ablate(args.config, list(args.overrides), seeds=args.seeds, sweeps=args.sweep,
                  variants=not args.sweeps_only,
                  progress=not args.no_progress)
    print(path.read_text(encoding="utf-8"))
    return {"table": str(path)}


def _cmd_compare(cfg: Config, args: argparse.Namespace) -> Any:
    from cpal.compare import compare, parse_bases
    from cpal.engine import distributed

    path = compare(args.config, list(args.overrides), bases=parse_bases(args.bases),
                   seeds=args.seeds, progress=not args.no_progress)
    if distributed.ranks().is_main:  # the table is rank 0's (torchrun)
        print(path.read_text(encoding="utf-8"))
    return {"table": str(path)}


def _cmd_config(cfg: Config, args: argparse.Namespace) -> Any:
    print(cfg.to_yaml(), end="")


def _cmd_data(cfg: Config, args: argparse.Namespace) -> Any:
    from cpal.data.source import dataset_root, open_dataset

    if args.data_command in ("prepare", "verify"):
        return _cmd_data_prepare(args)
    if args.data_command == "generate":
        print(dataset_root(cfg.data))
        return None
    layout = open_dataset(cfg.data)
    splits = dict.fromkeys([cfg.data.train_split, *cfg.infer.splits])
    for split in splits:
        masks = args.masks or layout.has_masks(layout.split_ids(split))
        count = layout.check(split, masks=masks, decode=args.decode)
        checked = "images, labels" + (", masks" if masks else "")
        checked += " (decoded)" if args.decode else ""
        print(f"{split}: {count} images OK ({checked})")
    return None


def _cmd_data_prepare(args: argparse.Namespace) -> None:
    from cpal.data.prepare.common import check_workers, default_workers
    from cpal.data.prepare.manifest import MANIFEST_FILE, verify

    workers = check_workers(default_workers() if args.workers is None else args.workers)
    progress = not args.no_progress
    root = args.root.expanduser().resolve()
    if args.data_command == "verify":
        problems, summary = verify(root, workers=workers, progress=progress)
        for line in summary:
            print(line)
        for problem in problems:
            print(f"problem: {problem}")
        if problems:
            raise DatasetError(f"{len(problems)} problem(s) found in {root}")
        print(f"{root}: OK, matches {MANIFEST_FILE}")
        return None
    if args.dataset == "voc":
        from cpal.data.prepare.voc2012 import prepare_voc

        manifest = prepare_voc(root, sbd=args.sbd, workers=workers, progress=progress,
                               checksum_images=args.checksum_images)
    else:
        from cpal.data.prepare.coco2014 import prepare_coco

        manifest = prepare_coco(root, workers=workers, progress=progress, link=args.link,
                                checksum_images=args.checksum_images)
    for warning in manifest["warnings"]:
        warn(warning)
    for split, entry in manifest["splits"].items():
        standard = f" (standard {entry['standard']:,})" if entry["standard"] else ""
        masks = f"masks in {manifest['mask_dir']}" if entry["masks"] else "no masks"
        print(f"{split}: {entry['count']:,} ids{standard}, {masks}")
    print(f"manifest: {root / MANIFEST_FILE}")
    return None


# OSError numbers a user fixes (space, quota, permissions), not bugs.
_USER_FIXABLE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM,
                 errno.EROFS}

_COMMANDS: dict[str, Callable[[Config, argparse.Namespace], Any]] = {
    "run": _cmd_run,
    "train": _cmd_train,
    "infer": _cmd_infer,
    "evaluate": _cmd_evaluate,
    "refine": _cmd_refine,
    "labels": _cmd_labels,
    "segment": _cmd_segment,
    "segment-eval": _cmd_segment_eval,
    "predict": _cmd_predict,
    "figures": _cmd_figures,
    "config": _cmd_config,
    "ablate": _cmd_ablate,
    "compare": _cmd_compare,
    "data": _cmd_data,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides after an option (`a=1 --no-progress b=2`) arrive as leftovers: keep them.
    args, rest = parser.parse_known_args(argv)
    unknown = [item for item in rest if item.startswith("-") or "=" not in item]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    if getattr(args, "shard", None) is not None:
        args.overrides = [*args.overrides, f"infer.shard={args.shard}"]
    if getattr(args, "force", False):
        args.overrides = [*args.overrides, "output_dir_force=true"]
    try:
        cfg = load_config(args.config, list(args.overrides))
        result = _COMMANDS[args.command](cfg, args)
    except CpalError as exc:
        _log.error("%s", exc)
        return 2
    except OSError as exc:
        # A full disk or a folder that cannot be written, met where no stage names it
        # better: still one line naming the file.
        if exc.errno not in _USER_FIXABLE:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        _log.error("%s%s", where, exc.strerror or exc)
        return 2
    except KeyboardInterrupt:
        print("cpal: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    code = 0
    if isinstance(result, ExitWith):
        result, code = result.result, result.code
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
