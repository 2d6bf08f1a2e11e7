"""Two gloo processes launched the way torchrun launches them (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT in the environment) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cpal.config import load_config
from cpal.engine.checkpoint import latest_checkpoint, load_checkpoint
from cpal.engine.paths import RunPaths
from cpal.pipeline import stage_train
from tests.helpers import chain_overrides, tiny_overrides

PROTO = ["bank.size=16", "bank.clusters=3",
         "bank.recluster_every=2", "awareness.top_k=2"]
# Frozen BatchNorm: the network's output per image does not depend on its batch, so the
# split global batch can equal the whole one (unfrozen BN uses micro-batch statistics).
# A small learning rate: another summation order rounds differently, and a rounding-sized
# change can cross a ReLU kink (or a CAM threshold) and change a gradient by a finite
# amount; at lr 1e-3 that stays far below the tolerance, while a wrong split, loss weight
# or bank order would not.
EXACT = ["model.frozen_bn=true", "train.epochs=2", "train.lr=0.001"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, commands: list[list[str]], out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import cpal.engine.infer as infer_module
    import cpal.evaluation.scoring as scoring_module
    from cpal.cli import main
    from cpal.engine import distributed
    from cpal.engine.label_dirs import LabelFolder

    # Per command: the maps and the label PNGs this process wrote.
    real_write, real_label_write, written = infer_module._write_record, LabelFolder.write, []
    real_score = scoring_module.score_label_dir

    def recording_write(path, *record):
        written[-1].append(f"{path.parent.name}/{path.name}")
        real_write(path, *record)

    def recording_label_write(folder, image_id, label):
        written[-1].append(f"{folder.directory.parent.name}/{folder.directory.name}/{image_id}")
        real_label_write(folder, image_id, label)

    def recording_score(layout, ids, label_dir):
        written[-1].append(f"scored:{label_dir.parent.name}/{label_dir.name}")
        return real_score(layout, ids, label_dir)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(infer_module, "_write_record", recording_write)
            patch.setattr(scoring_module, "score_label_dir", recording_score)
            patch.setattr(LabelFolder, "write", recording_label_write)
            for argv in commands:
                written.append([])
                code = main([*argv, "--no-progress"])
                if code != 0:
                    raise SystemExit(f"rank {rank}: {argv[0]} exited {code}")
        Path(out, f"written{rank}.json").write_text(json.dumps(written))
    finally:
        distributed._destroy()


@pytest.fixture(scope="module")
def ddp_runs(tiny_dataset, tmp_path_factory):
    """One spawn of 2 processes for two runs. cam: 1 micro-batch of 4 per process, then its
    maps as shard 0/2 and then whole; cpal: grad_accum 2 (2 images per micro-batch), as the
    whole `cpal run` (sharded maps, rank-0 evaluation); then `cpal refine` (IRN) of the
    cam run."""
    root = tmp_path_factory.mktemp("ddp")
    runs = {
        "cam": [*tiny_overrides(tiny_dataset, root / "cam"), *EXACT],
        "cpal": [*tiny_overrides(tiny_dataset, root / "cpal"), *EXACT, *PROTO,
                 "method=cpal", "train.grad_accum=2"],
    }
    config = root / "empty.yaml"
    config.write_text("{}\n")
    commands = [["train", str(config), *runs["cam"]],
                ["infer", str(config), *runs["cam"], "--shard", "0/2"],
                ["infer", str(config), *runs["cam"]],
                ["run", str(config), *runs["cpal"]],
                ["refine", str(config), *runs["cam"], *chain_overrides("irn")]]
    mp.spawn(_worker, args=(2, _free_port(), commands, str(root)), nprocs=2, join=True)
    return root, runs


def _final(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(RunPaths(output_dir).checkpoints)).model


def _single(tiny_dataset, out: Path, overrides: list[str]) -> dict[str, torch.Tensor]:
    """The same run in this (single) process, without accumulation."""
    cfg = load_config(None, [*overrides, f"output_dir={out}", "train.grad_accum=1"])
    stage_train(cfg, progress=False)
    return _final(cfg.output_path)


def _assert_same_training(ddp: dict, single: dict) -> None:
    assert ddp.keys() == single.keys()
    for key, value in single.items():
        if value.is_floating_point():
            # gloo's all-reduce and the per-process halves sum the gradient in another order;
            # 6 SGD steps at lr 1e-3 (see EXACT) keep it far below this (measured <= 3e-7).
            torch.testing.assert_close(ddp[key], value, rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(ddp[key], value), key


@pytest.mark.distributed
def test_two_processes_train_like_one_with_the_same_global_batch(ddp_runs, tiny_dataset,
                                                                 tmp_path):
    root, runs = ddp_runs
    single = _single(tiny_dataset, tmp_path / "single", runs["cam"])
    _assert_same_training(_final(root / "cam"), single)
    # The run-level records are written once, by rank 0, with the global numbers.
    ddp_log = [json.loads(x) for x in (root / "cam/train_log.jsonl").read_text().splitlines()]
    one_log = [json.loads(x) for x in
               RunPaths(tmp_path / "single").train_log.read_text().splitlines()]
    assert [r["step"] for r in ddp_log] == [r["step"] for r in one_log] == [1, 2, 3, 3, 4, 5, 6, 6]
    for a, b in zip(ddp_log, one_log, strict=True):
        # The same steps' losses, summed over processes in another order (measured <= 1.2e-6).
        assert a.get("loss", a.get("mean_loss")) == pytest.approx(
            b.get("loss", b.get("mean_loss")), rel=1e-4)


@pytest.mark.distributed
def test_two_processes_with_accumulation_fill_the_bank_like_one(ddp_runs, tiny_dataset, tmp_path):
    root, runs = ddp_runs
    single = _single(tiny_dataset, tmp_path / "single", runs["cpal"])
    ddp = _final(root / "cpal")
    # Weights, every bank entry in order and the k-means context: the prototypes of both
    # processes and both micro-batches entered the queues in the global batch's order,
    # once per optimizer step.
    _assert_same_training(ddp, single)
    assert int(ddp["cpal.step"]) == 6
    assert int(single["cpal.bank.count"].sum()) > 48


def _written(root: Path, command: int, *, maps: bool = True) -> list[list[str]]:
    """The maps (or else the label PNGs) each of the 2 processes wrote in command
    `command` of the spawn."""
    every = [json.loads((root / f"written{r}.json").read_text())[command] for r in range(2)]
    return [[w for w in rank if w.endswith(".npz") == maps] for rank in every]


def _split_ids(tiny_dataset: Path) -> dict[str, list[str]]:
    return {s: (tiny_dataset / f"ImageSets/Segmentation/{s}.txt").read_text().split()
            for s in ("train", "val")}


@pytest.mark.distributed
def test_a_shard_is_the_same_images_whatever_the_process_count(ddp_runs, tiny_dataset):
    """`torchrun --nproc_per_node=2 cpal infer --shard 0/2` writes shard 0 of 2 (every
    second image from the first), as one process would; the rest of the split, inferred
    next, is dealt evenly although it is all in what was rank 1's half."""
    root, _ = ddp_runs
    ids = _split_ids(tiny_dataset)
    shard, rest = _written(root, 1), _written(root, 2)
    for part, start in ((shard, 0), (rest, 1)):
        assert not set(part[0]) & set(part[1])
        assert sorted(part[0] + part[1]) == sorted(
            f"{s}/{i}.npz" for s in ids for i in ids[s][start::2])
        assert len(part[0]) == len(part[1]) == 8  # (12 + 4) / 2: balanced
    stages = json.loads((root / "cam/stages.json").read_text())
    assert stages["infer"]["written"] == {"train": 12, "val": 4}
    assert stages["infer"]["missing"] == {"train": 0, "val": 0}


@pytest.mark.distributed
def test_sharded_maps_are_written_once_and_evaluated_by_rank_zero(ddp_runs, tiny_dataset):
    root, _ = ddp_runs
    per_rank = _written(root, 3)
    assert not set(per_rank[0]) & set(per_rank[1])
    ids = _split_ids(tiny_dataset)
    expected = {f"{s}/{i}.npz" for s in ids for i in ids[s]}
    assert sorted(per_rank[0] + per_rank[1]) == sorted(expected)
    assert len(per_rank[0]) == len(per_rank[1]) == 16  # 24 + 8 images, every second one
    stages = json.loads((root / "cpal/stages.json").read_text())
    assert stages["infer"]["written"] == {"train": 24, "val": 8}
    assert stages["infer"]["missing"] == {"train": 0, "val": 0}
    metrics = json.loads((root / "cpal/metrics.json").read_text())
    assert 0 <= metrics["pseudo_labels"]["miou"] <= 100


@pytest.mark.distributed
def test_refine_deals_its_images_to_the_processes(ddp_runs, tiny_dataset):
    """`torchrun ... cpal refine` (IRN): every process trains IRNet, and each image's IR
    label and random-walk label is made once, by one process, the two halves balanced;
    rank 0 alone scores them into metrics.json."""
    root, _ = ddp_runs
    train = _split_ids(tiny_dataset)["train"]
    per_rank = _written(root, 4, maps=False)
    for folder in ("ir_labels/train", "irn/train"):
        parts = [sorted(w.rsplit("/", 1)[1] for w in rank if w.startswith(folder + "/"))
                 for rank in per_rank]
        assert not set(parts[0]) & set(parts[1]), folder
        assert sorted(parts[0] + parts[1]) == sorted(train), folder
        assert len(parts[0]) == len(parts[1]) == 12, folder
    assert len(list((root / "cam/refine/irn/train").glob("*.png"))) == 24
    # Scored once, by rank 0: the IR labels and the walk's labels.
    every = [json.loads((root / f"written{r}.json").read_text())[4] for r in range(2)]
    scored = [[w for w in rank if w.startswith("scored:")] for rank in every]
    assert scored[1] == [] and {"scored:ir_labels/train", "scored:irn/train"} <= set(
        scored[0])
    metrics = json.loads((root / "cam/metrics.json").read_text())
    assert 0 <= metrics["refine"]["irn"]["labels"]["miou"] <= 100
    assert json.loads((root / "cam/stages.json").read_text())["refine"]["method"] == "irn"


def _train_worker(rank: int, world: int, port: int, argvs: list[list[str]], out: str) -> None:
    """Process `rank` runs `cpal train` with its own arguments; records its exit status."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from cpal.cli import main
    from cpal.engine import distributed

    try:
        Path(out, f"code{rank}").write_text(str(main(argvs[rank])))
    finally:
        distributed._destroy()


@pytest.mark.distributed
def test_processes_with_different_datasets_all_stop(tiny_dataset, tmp_path, capfd):
    """Node-local copies of a dataset that differ (here one id fewer) would cut different
    batches: every process stops with the one-line error instead of waiting forever."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_dataset, other)
    split = other / "ImageSets/Segmentation/train.txt"
    split.write_text("\n".join(split.read_text().split()[:-1]) + "\n")
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    argvs = [["train", str(config), *tiny_overrides(root, tmp_path / "run"), "--no-progress"]
             for root in (tiny_dataset, other)]
    mp.spawn(_train_worker, args=(2, _free_port(), argvs, str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"code{r}").read_text() for r in range(2)] == ["2", "2"]
    err = capfd.readouterr().err
    assert err.count("split 'train' (its ids or labels) differs between the torchrun "
                     "processes") == 2
    assert not (tmp_path / "run/checkpoints").exists()


@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_a_failed_collective_stage_aborts_an_nccl_group_at_exit(backend, monkeypatch):
    """NCCL's orderly teardown waits for the other processes: after a failure the group is
    aborted instead, so the process exits and torchrun stops the job. gloo's teardown is
    local and stays."""
    import torch.distributed.distributed_c10d as c10d

    from cpal.engine import distributed
    from cpal.errors import DatasetError

    calls = []
    monkeypatch.setattr(distributed, "_failed", False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: backend)
    monkeypatch.setattr(torch.distributed, "destroy_process_group",
                        lambda: calls.append("destroy"))
    monkeypatch.setattr(c10d, "_abort_process_group", lambda: calls.append("abort"))

    @distributed.collective
    def stage(fail: bool) -> int:
        if fail:
            raise DatasetError("broken image")
        return 7

    assert stage(False) == 7
    distributed._destroy()
    assert calls == ["destroy"]  # a clean exit leaves the group in order
    with pytest.raises(DatasetError):
        stage(True)
    distributed._destroy()
    assert calls == ["destroy", "abort" if backend == "nccl" else "destroy"]


def test_resuming_needs_the_checkpoint_rank_zero_chose(tmp_path):
    from cpal.engine import distributed
    from cpal.engine.identity import load_shared_checkpoint
    from cpal.errors import CheckpointError

    assert distributed.main_value(["a", 1]) == ["a", 1]  # one process: its own value
    missing = tmp_path / "checkpoints/step_00000200.json"
    with pytest.raises(CheckpointError, match=r"step_00000200\.json: not visible to process "
                                              r"0; output_dir must be on a file system"):
        load_shared_checkpoint(missing)
