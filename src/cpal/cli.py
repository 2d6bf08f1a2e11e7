"""The `cpal` command: one subcommand per stage, and `run` to chain them.

Every subcommand takes the same CONFIG [KEY=VALUE ...] arguments, so a stage can be
rerun alone on the files of a previous run. Errors in user input print one line and exit
with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cpal import __version__
from cpal.config import Config, load_config
from cpal.errors import ConfigError, CpalError

_STAGE_HELP = {
    "run": "train -> maps -> evaluation -> pseudo labels -> figures",
    "train": "train the CAM network (resumes from the newest checkpoint)",
    "infer": "multi-scale + flip maps, one .npz per image (skips finished images)",
    "evaluate": "score maps against GT over all background thresholds",
    "labels": "export pseudo labels as palette PNGs and score them",
    "figures": "overlay grid, threshold-sweep curve, per-class IoU chart",
    "config": "print the resolved configuration",
}


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override config keys, e.g. train.epochs=2 output_dir=runs/x")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


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
    ablate = sub.add_parser(
        "ablate", help="train every variant on the same data and seeds; write a table",
        description="Runs cam, sipe, cpal-mean, cpal-topk and cpal (and optional sweeps) "
        "under OUTPUT_DIR/ablation/ and writes ablation.md and ablation.csv there.",
    )
    _add_config_args(ablate)
    ablate.add_argument("--seeds", type=int, default=1, help="seeds per variant (default 1)")
    ablate.add_argument("--sweep", action="append", default=[], choices=["score", "k"],
                        help="also sweep the positiveness score (dot/cosine/l2) or K")
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
    return parser


def _cmd_run(cfg: Config, args: argparse.Namespace) -> Any:
    from cpal.pipeline import run

    run(cfg, progress=not args.no_progress)


def _cmd_train(cfg: Config, args: argparse.Namespace) -> Any:
    from cpal.pipeline import stage_train

    return stage_train(cfg, progress=not args.no_progress)


def _cmd_infer(cfg: Config, args: argparse.Namespace) -> Any:
    from cpal.pipeline import stage_infer

    return {"images_written": stage_infer(cfg, progress=not args.no_progress)}


def _cmd_evaluate(cfg: Config, args: argparse.Namespace) -> Any:
    from cpal.pipeline import evaluate_label_dir, stage_evaluate, summary_table

    if args.labels is not None:
        result = evaluate_label_dir(cfg, args.labels.resolve(), args.split or cfg.labels.split)
        print(f"mIoU {result['miou']:.2f}  [{result['protocol']['description']}]")
        return result
    stage_evaluate(cfg)
    print(summary_table(cfg))


def _cmd_labels(cfg: Config, args: argparse.Namespace) -> Any:
    from cpal.pipeline import stage_labels, summary_table

    stage_labels(cfg, progress=not args.no_progress)
    print(summary_table(cfg))


def _cmd_figures(cfg: Config, args: argparse.Namespace) -> Any:
    from cpal.pipeline import stage_figures

    return {"figures": [str(p) for p in stage_figures(cfg)]}


def _cmd_ablate(cfg: Config, args: argparse.Namespace) -> Any:
    from cpal.ablation import ablate

    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    path = ablate(args.config, list(args.overrides), seeds=args.seeds, sweeps=args.sweep,
                  progress=not args.no_progress)
    return {"table": str(path)}


def _cmd_config(cfg: Config, args: argparse.Namespace) -> Any:
    print(cfg.to_yaml(), end="")


def _cmd_data(cfg: Config, args: argparse.Namespace) -> Any:
    from cpal.data.source import dataset_root, open_dataset

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


_COMMANDS: dict[str, Callable[[Config, argparse.Namespace], Any]] = {
    "run": _cmd_run,
    "train": _cmd_train,
    "infer": _cmd_infer,
    "evaluate": _cmd_evaluate,
    "labels": _cmd_labels,
    "figures": _cmd_figures,
    "config": _cmd_config,
    "ablate": _cmd_ablate,
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
    try:
        cfg = load_config(args.config, list(args.overrides))
        result = _COMMANDS[args.command](cfg, args)
    except CpalError as exc:
        print(f"cpal: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cpal: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
