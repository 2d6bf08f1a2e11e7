"""`cpal compare`: each base pipeline alone and with CPAL, on the same data and seeds, one table.

A base is a pair of arms that differ in the map network alone: the base as published
(`method=cam refine.method=irn`) and the same chain on CPAL's maps (`method=cpal
refine.method=irn`); the transformer bases pair their methods (`mctformer` /
`mctformer-cpal`, `clip-es` / `clip-es-cpal`) under the config's own refinement. Every
other setting is the config's, so a difference in the table is CPAL's.

Each arm and seed is an ordinary `cpal run` in OUTPUT/compare/<arm>/seed<k>/, so a
stopped comparison resumes where it stopped and every run can be inspected or rerun
alone; an arm that finished with the same settings is read back, not run again
(`compare_arm.json` in its folder records them), and two arms with identical settings
share one run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import statistics
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cpal.config import Config, load_config
from cpal.data.source import open_dataset
from cpal.engine import distributed
from cpal.engine.identity import fingerprint_digest, training_fingerprint
from cpal.engine.paths import RunPaths
from cpal.engine.refine import REFINEMENTS
from cpal.errors import ConfigError
from cpal.io import (
    link_tree,
    read_json,
    reraise_as_output_error,
    write_json_atomic,
    write_text_atomic,
)
from cpal.log import get_logger
from cpal.models.cam_net import network_spec
from cpal.pipeline import run
from cpal.registry import Registry

__all__ = ["BASES", "STAGES", "Base", "compare", "format_tables"]

_log = get_logger(__name__)
MARKER = "compare_arm.json"
STAGES: tuple[tuple[str, str], ...] = (
    ("seeds", "seeds"), ("pseudo_labels", "pseudo masks"), ("segmentation", "segmentation"))
"""metrics.json's keys of the numbers compared, and their column names."""


@dataclass(frozen=True)
class Arm:
    """One row of the table: its name, its folder under OUTPUT/compare/, its overrides."""

    name: str
    folder: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Base:
    """A base pipeline (`--bases NAME`): its overrides alone and with CPAL."""

    name: str
    summary: str
    alone: tuple[str, ...]
    with_cpal: tuple[str, ...]

    def arms(self) -> list[Arm]:
        return [Arm(self.name, self.name, self.alone),
                Arm(f"{self.name} + cpal", f"{self.name}-cpal", self.with_cpal)]


BASES: Registry[Base] = Registry("comparison base")
for _base in (
    Base("irn", "IRN (IR labels, IRNet, random walk) on the CAM / on CPAL's maps",
         ("method=cam", "refine.method=irn"), ("method=cpal", "refine.method=irn")),
    Base("amn", "AMN then IRN on the CAM / on CPAL's maps",
         ("method=cam", "refine.method=amn"), ("method=cpal", "refine.method=amn")),
    Base("crf", "the dense CRF of refine.preset on the CAM / on CPAL's maps",
         ("method=cam", "refine.method=crf"), ("method=cpal", "refine.method=crf")),
    Base("mctformer", "MCTformer-V2 / with CPAL's branch (the config's refinement)",
         ("method=mctformer",), ("method=mctformer-cpal",)),
    Base("clip-es", "CLIP-ES / with CPAL's branch (the config's refinement)",
         ("method=clip-es",), ("method=clip-es-cpal",)),
):
    BASES.register(_base.name, _base)


def parse_bases(text: str) -> list[str]:
    """'irn, amn' -> ['irn', 'amn'] (registered names, each once), or a ConfigError
    naming the unknown one."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--bases: no base named in {text!r}; choose from "
                          f"{', '.join(BASES.names())}")
    return list(dict.fromkeys(BASES.check(n, "--bases") for n in names))


def _settings(cfg: Config) -> str:
    """Everything that makes a run, its folder aside (two arms equal in it are one run)."""
    return json.dumps({**cfg.to_dict(), "output_dir": None}, sort_keys=True)


def _network_settings(cfg: Config) -> tuple[str, str]:
    """What a run's network and maps depend on: its training fingerprint (the checkpoint
    checks it on resume), and with the inference settings and the network's own map
    settings, its maps (whose folder record is checked before reuse). Arms of two bases
    that differ in refinement alone are equal in both."""
    training = fingerprint_digest(training_fingerprint(cfg))
    sections = {s: asdict(getattr(cfg, s)) for s in network_spec(cfg).map_sections}
    return training, fingerprint_digest([training, asdict(cfg.infer), sections])


def _share_network(cfg: Config, key: tuple[str, str],
                   trained: dict[tuple[str, str], Path]) -> Path | None:
    """Start a new arm from the checkpoints (and maps, when made alike) of an earlier arm
    trained with the same settings, instead of training the same network again; returns
    that arm's folder (None: nothing shared). The run then resumes past training, and its
    own checks (fingerprint, maps record) still decide what it reuses. Only into a folder
    that does not exist yet, which appears whole (linked in a temporary folder, then
    renamed), and by rank 0 alone under torchrun (the others take rank 0's choice of
    checkpoint when they train). `key`: the arm's `_network_settings`."""
    if not (distributed.ranks().is_main and cfg.train.resume) or cfg.output_path.exists():
        return None
    maps_donor = trained.get(key)  # the network and its maps from one arm, never mixed
    donor = maps_donor or next(
        (root for (training, _), root in trained.items() if training == key[0]), None)
    if donor is None:
        return None
    target = cfg.output_path
    for stale in target.parent.glob(f".{target.name}.*.tmp"):  # from a stopped comparison
        shutil.rmtree(stale, ignore_errors=True)
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    count = link_tree(RunPaths(donor).checkpoints, RunPaths(staging).checkpoints)
    shared = "checkpoints"
    if maps_donor is not None:
        source = RunPaths(donor)
        for split in sorted(p.name for p in (source.root / "maps").glob("*") if p.is_dir()):
            count += link_tree(source.maps(split), RunPaths(staging).maps(split))
        shared = "checkpoints and maps"
    if count == 0:  # a donor with nothing on disk (a method that does not train, no maps)
        return None
    try:
        staging.rename(target)
    except OSError as exc:
        reraise_as_output_error(target, exc)
    _log.info("compare: the %s of %s (same settings) reused: %d files", shared, donor, count)
    return donor


def _finished_metrics(cfg: Config, settings: str) -> dict[str, Any] | None:
    """metrics.json of a run this comparison finished earlier with these settings."""
    paths = RunPaths(cfg.output_path)
    marker = paths.root / MARKER
    if not (marker.is_file() and paths.metrics.is_file()):
        return None
    if read_json(marker).get("settings") != fingerprint_digest(settings):
        return None
    return read_json(paths.metrics)


def row_of(cfg: Config, metrics: dict[str, Any]) -> dict[str, Any]:
    """What the table takes from one run: each stage's mIoU, split and protocol."""
    row: dict[str, Any] = {"method": cfg.method, "refine": cfg.refine.method}
    for key, _ in STAGES:
        entry = metrics.get(key) or {}
        if entry.get("miou") is not None and "protocol" in entry:
            protocol = entry["protocol"]
            row[key] = {"miou": entry["miou"], "split": protocol["split"],
                        "protocol": protocol["description"]}
    return row


def compare(config_path: str | os.PathLike[str] | None, overrides: Sequence[str], *,
            bases: Sequence[str], seeds: int, progress: bool = True) -> Path:
    """Run both arms of every base for `seeds` seeds; write compare.md and compare.csv
    under OUTPUT/compare/; return the .md. Every arm's config and what its refinement
    needs are checked (and refused in one line) before the first run starts."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    base = load_config(config_path, list(overrides))
    root = base.output_path / "compare"
    plans: list[tuple[Arm, int, Config]] = []
    # Seed by seed, every arm of a seed before the next seed: a comparison stopped early
    # holds both arms of each base at the seeds it reached, so its rows stay paired.
    for i in range(seeds):
        seed = base.seed + i
        for name in bases:
            for arm in BASES.get(name).arms():
                try:
                    cfg = load_config(config_path, [
                        *overrides, *arm.overrides, f"seed={seed}",
                        f"output_dir={root / arm.folder / f'seed{seed}'}"])
                    if i == 0:  # what the refinement needs (IRN and AMN: a ResNet, a trunk)
                        refinement = REFINEMENTS.get(cfg.refine.method)
                        if refinement.check is not None:
                            refinement.check(cfg, open_dataset(cfg.data))
                except ConfigError as exc:
                    raise ConfigError(f"--bases {name} (arm '{arm.name}'): {exc}") from exc
                plans.append((arm, seed, cfg))
    results: dict[str, list[dict[str, Any]]] = {}
    done: dict[str, dict[str, Any]] = {}
    trained: dict[tuple[str, str], Path] = {}  # (training, maps) settings -> a finished run
    for arm, seed, cfg in plans:
        settings, network = _settings(cfg), _network_settings(cfg)
        if settings in done:
            _log.info("compare: %s, seed %d: same settings as an earlier arm, reused",
                      arm.name, seed)
        else:
            metrics = _finished_metrics(cfg, settings)
            if metrics is not None:
                _log.info("compare: %s, seed %d: finished earlier, read back", arm.name, seed)
            else:
                _log.info("compare: %s, seed %d", arm.name, seed)
                donor = _share_network(cfg, network, trained)
                metrics = run(cfg, progress=progress)  # {} on ranks other than 0
                if distributed.ranks().is_main:
                    write_json_atomic(RunPaths(cfg.output_path).root / MARKER, {
                        "arm": arm.name, "seed": seed, "overrides": list(arm.overrides),
                        "settings": fingerprint_digest(settings),
                        "network_from": None if donor is None else str(donor)})
            done[settings] = row_of(cfg, metrics)
            trained.setdefault(network, cfg.output_path)
        results.setdefault(arm.name, []).append(done[settings])
        # Rewritten after every run: a long comparison shows its progress, and a stopped
        # one keeps the table of what finished. Under torchrun rank 0 alone has the
        # numbers (and a marker only once its run has finished every stage).
        if distributed.ranks().is_main:
            md, table_csv = format_tables(results, base, seeds, [a for a, _, _ in plans])
            write_text_atomic(root / "compare.md", md)
            write_text_atomic(root / "compare.csv", table_csv)
    return root / "compare.md"


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1; None for one value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else None


def format_tables(results: dict[str, list[dict[str, Any]]], base: Config, seeds: int,
                  arms: Sequence[Arm]) -> tuple[str, str]:
    """Markdown and CSV: a row per arm, a column per stage some run produced, mean ± std
    over seeds, each number tagged with its protocol (listed below the table)."""
    stages = [(key, title) for key, title in STAGES
              if any(key in r for rows in results.values() for r in rows)]
    splits = {key: next(r[key]["split"] for rows in results.values() for r in rows if key in r)
              for key, _ in stages}
    header = ["arm", "method", "refinement", "runs",
              *(f"{title} mIoU, {splits[key]}" for key, title in stages)]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "---|" * 4 + "---:|" * len(stages)]
    protocols: dict[str, int] = {}
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["arm", "method", "refinement", "runs",
                     *(f"{key}_{part}" for key, _ in stages
                       for part in ("mean", "std", "values", "protocol"))])
    for name, rows in results.items():
        cells, fields = [], []
        for key, _ in stages:
            have = [r[key] for r in rows if key in r]
            if not have:
                cells.append("-")
                fields += ["", "", "", ""]
                continue
            values = [h["miou"] for h in have]
            mean, std = _mean_std(values)
            texts = list(dict.fromkeys(h["protocol"] for h in have))
            refs = [protocols.setdefault(t, len(protocols) + 1) for t in texts]
            shown = f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"
            if len(have) < len(rows):
                shown += f" ({len(have)} of {len(rows)} runs)"
            cells.append(f"{shown} [{', '.join(map(str, refs))}]")
            fields += [f"{mean:.2f}", "" if std is None else f"{std:.2f}",
                       " ".join(f"{v:.2f}" for v in values), " || ".join(texts)]
        first = rows[0]
        lines.append(f"| {name} | {first['method']} | {first['refine']} | {len(rows)} | "
                     + " | ".join(cells) + " |")
        writer.writerow([name, first["method"], first["refine"], len(rows), *fields])
    overrides = {a.name: " ".join(a.overrides) for a in arms}
    notes = [
        "",
        f"Runs per arm: {', '.join(str(len(r)) for r in results.values())} of {seeds} asked "
        f"(seed {base.seed}..{base.seed + seeds - 1}); mean ± sample standard deviation "
        "(one run: its number alone). Same data, config and stages for every arm; each "
        "arm's overrides: " + "; ".join(f"{n}: `{o}`" for n, o in overrides.items()) + ".",
        "",
        "Protocols (a number's [k]):",
        *(f"[{k}] {_escape(text)}" for text, k in protocols.items()),
    ]
    return "\n".join(lines + notes) + "\n", buffer.getvalue()


def _escape(text: str) -> str:
    """Protocol lines join their parts with ' | ': keep Markdown from reading a table."""
    return text.replace("|", "\\|")
