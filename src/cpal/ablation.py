"""`cpal ablate`: every variant (and optional sweeps) on the same data and seeds, one table.

Each run is an ordinary `cpal run` in its own output folder, so an interrupted ablation
resumes where it stopped (finished training and maps are skipped), and every run can be
inspected or rerun alone.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpal.config import Config, load_config
from cpal.io import write_text_atomic
from cpal.log import get_logger
from cpal.methods import ablation_ladder
from cpal.pipeline import run

_log = get_logger(__name__)


@dataclass(frozen=True)
class Arm:
    """One row of the table: a name and the overrides that make it."""

    name: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Sweep:
    """One `--sweep` over a key: `method=cpal` with `key` set to each value, plus `fixed`."""

    key: str
    values: tuple[Any, ...]
    fixed: tuple[str, ...] = ()

    def arms(self) -> list[Arm]:
        fixed = " ".join(o.split(".")[-1] for o in self.fixed)
        prefix = f"cpal {fixed} " if fixed else "cpal "
        return [Arm(f"{prefix}{self.key.split('.')[-1]}={v}",
                    ("method=cpal", *self.fixed, f"{self.key}={v}")) for v in self.values]


@dataclass(frozen=True)
class Choices:
    """One `--sweep` of named alternatives, each switched alone on top of `method`."""

    method: str
    choices: tuple[tuple[str, tuple[str, ...]], ...]

    def arms(self) -> list[Arm]:
        return [Arm(f"{self.method}: {name}", (f"method={self.method}", *overrides))
                for name, overrides in self.choices]


SWEEPS: dict[str, Sweep | Choices] = {
    # With unit prototypes (the default) dot and cosine give identical runs and l2 ranks the
    # same, so the score sweep uses raw prototypes, whose norms make the scores differ.
    "score": Sweep("awareness.score", ("dot", "cosine", "l2"), ("prototype.normalize=false",)),
    "k": Sweep("awareness.top_k", (1, 3, 5, 10)),
    # What each earlier choice of this library costs on the faithful SIPE, one at a time.
    "earlier": Choices("sipe", (
        ("seeds = CAM > 0.5 regions", ("prototype.region=threshold",)),
        ("empty seed -> CAM-weighted prototype", ("prototype.empty_region=cam",)),
        ("background from present classes", ("prototype.background_from=present",)),
        ("L_self over present channels", ("loss.self_average=present",)),
        ("no gradient clipping", ("train.grad_clip=null",)),
        ("projection 256 + Kaiming init", ("prototype.projection=256",
                                           "prototype.head_init=kaiming")),
        ("prototype head at 1x lr", ("prototype.lr_mult=1.0",)),
        ("side features align_corners", ("prototype.align_corners=true",)),
        ("trunk BN and layer1-2 trained", ("model.frozen_bn=false", "model.frozen_stages=0")),
        ("crop padding counts as image", ("prototype.mask_padding=false",)),
        ("inference: per-scale maps, backbone flip, layer4 seeds",
         ("infer.prototype_maps=per_scale", "infer.flip_fusion=backbone",
          "prototype.infer_seed_features=layer4")),
    )),
    # What CPAL's context does to the channels, each alone on the full method.
    "context": Choices("cpal", (
        ("background keeps its instance prototype", ("awareness.background=instance",)),
        ("context weight alpha 0.25", ("awareness.alpha=0.25",)),
    )),
    # SFC's additions (by CPAL's authors), each alone on the faithful SIPE.
    "sfc": Choices("sipe", (
        ("SFC PCM seeds (bg x 0.3)", ("prototype.seed_source=pcm", "prototype.bg_factor=0.3")),
        ("seed background x 0.3", ("prototype.bg_factor=0.3",)),
        ("fused CAM + PACAM map", ("infer.map=fused",)),
    )),
}


def arms(sweeps: Sequence[str] = (), *, variants: bool = True) -> list[Arm]:
    """The main ladder (unless `variants` is false), then each sweep's arms."""
    rows = [Arm(v, (f"method={v}",)) for v in ablation_ladder()] if variants else []
    for name in sweeps:
        rows += SWEEPS[name].arms()
    return rows


def _folder(arm: Arm) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in arm.name)


def ablate(
    config_path: str | os.PathLike[str] | None,
    overrides: Sequence[str],
    *,
    seeds: int,
    sweeps: Sequence[str] = (),
    variants: bool = True,
    progress: bool = True,
) -> Path:
    """Run every arm for `seeds` seeds; write ablation.md and ablation.csv; return the .md.

    An arm whose settings equal an earlier arm's (e.g. the K sweep's value that the config
    already uses) reuses that run instead of training the same network twice."""
    base = load_config(config_path, list(overrides))
    root = Path(base.output_dir) / "ablation"
    results: dict[str, list[dict[str, Any]]] = {}
    done: dict[str, dict[str, Any]] = {}  # settings (output_dir aside) -> row
    for arm in arms(sweeps, variants=variants):
        for i in range(seeds):
            seed = base.seed + i
            cfg = load_config(config_path, [
                *overrides, *arm.overrides, f"seed={seed}",
                f"output_dir={root / _folder(arm) / f'seed{seed}'}",
            ])
            settings = json.dumps({**cfg.to_dict(), "output_dir": None}, sort_keys=True)
            if settings in done:
                _log.info("ablation: %s, seed %d: same settings as an earlier arm, reused",
                          arm.name, seed)
            else:
                _log.info("ablation: %s, seed %d", arm.name, seed)
                done[settings] = _row(cfg, run(cfg, progress=progress))
            results.setdefault(arm.name, []).append(done[settings])
            # Rewritten after every run: a long ablation shows its progress, and a stopped
            # one keeps the table of what finished.
            md, table_csv = format_tables(results, base, seeds)
            write_text_atomic(root / "ablation.md", md)
            write_text_atomic(root / "ablation.csv", table_csv)
    return root / "ablation.md"


def _row(cfg: Config, metrics: dict[str, Any]) -> dict[str, Any]:
    split = cfg.labels.split
    maps = metrics["maps"][split]["oracle_best"]
    pseudo = metrics["pseudo_labels"]
    return {
        "map": metrics["maps"][split]["map"],
        "maps_oracle": maps["miou"],
        "maps_oracle_threshold": maps["threshold"],
        "maps_fg_precision": maps.get("foreground_precision"),
        "maps_fg_recall": maps.get("foreground_recall"),
        "maps_own_background": metrics["maps"][split].get("own_background", {}).get("miou"),
        "seeds": metrics["maps"][split].get("seeds", {}).get("miou"),
        "pseudo": pseudo["miou"],
        "pseudo_threshold": metrics["threshold"]["value"],
        "pseudo_protocol": pseudo["protocol"]["description"],
    }


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def _mean_std_or_none(values: Sequence[float | None]) -> tuple[float, float] | None:
    """`_mean_std`, or None when any run lacks the value (metrics from older runs, or a
    CAM, which has no background map of its own)."""
    if not values or any(v is None for v in values):
        return None
    return _mean_std(values)  # type: ignore[arg-type]


def format_tables(
    results: dict[str, list[dict[str, Any]]], base: Config, seeds: int
) -> tuple[str, str]:
    """Markdown and CSV: mean +- std over seeds (sample std, ddof 1)."""
    split, tune = base.labels.split, base.labels.tune_split
    header = (
        f"| variant | map | maps mIoU, {split} (ORACLE threshold) | "
        f"pseudo labels mIoU, {split} (threshold tuned on {tune} GT, held-out) | "
        f"maps object precision / recall | maps mIoU, {split} (own background, no threshold) "
        f"| seeds mIoU, {split} (diagnostic) | thresholds (oracle / tuned) |"
    )
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---|"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["variant", "map", "seeds", "maps_oracle_mean", "maps_oracle_std",
                     "pseudo_mean", "pseudo_std", "pseudo_values", "maps_values",
                     "maps_fg_precision_mean", "maps_fg_recall_mean", "maps_own_background_mean",
                     "maps_own_background_std", "seeds_mean", "seeds_std"])
    for name, rows in results.items():
        maps = [r["maps_oracle"] for r in rows]
        pseudo = [r["pseudo"] for r in rows]
        (mm, ms), (pm, ps) = _mean_std(maps), _mean_std(pseudo)
        thresholds = ", ".join(
            f"{r['maps_oracle_threshold']:g}/{r['pseudo_threshold']:g}" for r in rows
        )
        precision = _mean_std_or_none([r.get("maps_fg_precision") for r in rows])
        recall = _mean_std_or_none([r.get("maps_fg_recall") for r in rows])
        pr = "-" if precision is None or recall is None else f"{precision[0]:.1f} / {recall[0]:.1f}"
        own = _mean_std_or_none([r.get("maps_own_background") for r in rows])
        own_text = "-" if own is None else f"{own[0]:.1f} ± {own[1]:.1f}"
        seeds_ms = _mean_std_or_none([r.get("seeds") for r in rows])
        seeds_text = "-" if seeds_ms is None else f"{seeds_ms[0]:.1f} ± {seeds_ms[1]:.1f}"
        lines.append(
            f"| {name} | {rows[0]['map']} | {mm:.1f} ± {ms:.1f} | {pm:.1f} ± {ps:.1f} | "
            f"{pr} | {own_text} | {seeds_text} | {thresholds} |"
        )
        writer.writerow([name, rows[0]["map"], len(rows), f"{mm:.2f}", f"{ms:.2f}",
                         f"{pm:.2f}", f"{ps:.2f}", " ".join(f"{v:.2f}" for v in pseudo),
                         " ".join(f"{v:.2f}" for v in maps),
                         "" if precision is None else f"{precision[0]:.2f}",
                         "" if recall is None else f"{recall[0]:.2f}",
                         "" if own is None else f"{own[0]:.2f}",
                         "" if own is None else f"{own[1]:.2f}",
                         "" if seeds_ms is None else f"{seeds_ms[0]:.2f}",
                         "" if seeds_ms is None else f"{seeds_ms[1]:.2f}"])
    example = next(iter(results.values()))[0]["pseudo_protocol"]
    notes = [
        "",
        f"Seeds per variant: {', '.join(str(len(r)) for r in results.values())} of {seeds} "
        f"asked (seed {base.seed}..{base.seed + seeds - 1}); mean ± sample standard deviation. "
        "Same data for every run.",
        f"Maps column: the background threshold that is best on {split} GT itself "
        "(an oracle, as CAM quality is usually quoted).",
        "Object precision / recall: the maps at that threshold with every object class merged "
        "(precision: share of pixels predicted as an object that are an object in the GT; "
        "recall: share of GT object pixels found), mean over seeds.",
        "Own-background column: maps with a background channel of their own (PACAM's "
        "background prototype) labelled by argmax over it and the classes, as SIPE scores "
        "its IS-CAM: no threshold, no GT used; '-' for CAMs.",
        "Seeds column: the regions prototypes were pooled from (SIPE's seed rule, first scale) "
        "scored as labels, unseeded pixels as background: a diagnostic, not a result.",
        f"Pseudo-label column: threshold chosen on {tune} GT, then applied to {split}; "
        f"e.g. `{example}`.",
    ]
    return "\n".join(lines + notes) + "\n", buffer.getvalue()
