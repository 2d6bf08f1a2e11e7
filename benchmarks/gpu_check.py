"""Every CUDA path of cpal, checked against the CPU path on small synthetic data.

Run it first whenever a machine with a CUDA GPU is available (it takes well under 5
minutes on one GPU); paste its output into the note of the session. Stages:

  reference  CPU, fp32: 1 epoch of `cam` and of `cpal` (a prototype method), and their maps
  train      CUDA: fp32, bf16 and fp16 (GradScaler) autocast training steps of cam and cpal,
             compared with the CPU run; channels-last compared with contiguous
  pinned     the DataLoader's pinned batches and non-blocking copies
  module     the CPAL module under CUDA autocast (bf16, fp16): finite, absent classes zero
  maps       map generation on CUDA (fp32, channels-last, bf16, fp16) from the CPU
             checkpoints, compared with the CPU maps
  nccl       a 1-process NCCL group (torchrun): barrier, the collectives' NCCL branches,
             DistributedDataParallel with device ids, the abort at exit; `torchrun
             --nproc_per_node=1 -m cpal train` against the in-process CUDA run
  ddp2       with >= 2 GPUs: 2-process NCCL training and sharded maps against 1 process,
             and a failing process (a corrupt image) ending the job instead of hanging

Each stage prints its time and peak CUDA memory; every comparison states its tolerance and
why. Exit status 0 when every stage passed, 1 otherwise. Without CUDA only the reference
runs and the script says so, exiting 0 (this is how it runs on the development machine).

    python benchmarks/gpu_check.py [--work DIR] [--threads N] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO / "src"))

from cpal.config import Config, load_config  # noqa: E402
from cpal.engine.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from cpal.engine.paths import RunPaths  # noqa: E402
from cpal.evaluation.metrics import labels_from_maps  # noqa: E402
from cpal.io import load_maps  # noqa: E402

# Unit roundoffs: bf16 keeps 8 significant bits, fp16 11, TF32 (cuDNN's default for fp32
# convolutions on Ampere and later) 11 as well.
U_BF16, U_FP16, U_TF32 = 2.0**-8, 2.0**-11, 2.0**-11
PROTO = ["bank.size=16", "bank.clusters=3", "bank.recluster_every=2",
         "awareness.top_k=2"]


def tiny_overrides(data: Path, out: Path, threads: int) -> list[str]:
    """A CPU-sized run (as tests/conftest.py): frozen BN and a small learning rate, so runs
    whose arithmetic differs only in rounding stay comparable weight by weight."""
    return [
        f"data.root={data}", f"output_dir={out}", "model.arch=resnet18", "model.width=0.25",
        "model.frozen_bn=true", "train.epochs=1", "train.batch_size=8", "train.crop_size=64",
        "train.resize_long=[64, 96]", "train.lr=0.001", "train.momentum=0.9",
        "train.head_lr_mult=1.0", "train.log_every=1", "infer.scales=[1.0, 0.5]",
        "infer.batch_size=4", "viz.num_images=3", f"threads={threads}",
    ]


# ---------------------------------------------------------------------------------------
# Bookkeeping


@dataclass
class Result:
    stage: str
    seconds: float
    peak_mib: float | None
    ok: bool
    detail: str


@dataclass
class Checker:
    cuda: bool
    results: list[Result] = field(default_factory=list)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[list[str]]:
        """Time a stage and record its peak CUDA memory; an exception fails the stage (the
        others still run). Lines appended to the yielded list become its detail."""
        notes: list[str] = []
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        ok, detail = True, ""
        try:
            yield notes
        except Exception as exc:  # a failed check or a crash: report it, keep going
            ok = False
            detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            traceback.print_exc(file=sys.stderr)
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None
        detail = "; ".join([*notes, detail] if detail else notes)
        self.results.append(Result(name, seconds, peak, ok, detail))
        mark = "ok  " if ok else "FAIL"
        memory = f"{peak:8.1f} MiB" if peak is not None else "       - MiB"
        print(f"[{mark}] {name:<34} {seconds:7.1f} s {memory}  {detail}", flush=True)

    def summary(self) -> int:
        failed = [r for r in self.results if not r.ok]
        total = sum(r.seconds for r in self.results)
        print(f"\n{len(self.results) - len(failed)} of {len(self.results)} stages passed "
              f"in {total:.1f} s")
        for r in failed:
            print(f"FAILED: {r.stage}: {r.detail}")
        return 1 if failed else 0


def close(name: str, actual: float, expected: float, rel: float, why: str) -> str:
    """Assert |actual - expected| <= rel * |expected|; return a note with the margin."""
    diff = abs(actual - expected) / max(abs(expected), 1e-12)
    if diff > rel:
        raise AssertionError(f"{name}: relative difference {diff:.2e} > {rel:.0e} ({why})")
    return f"{name} rel {diff:.1e} <= {rel:.0e}"


def weights_close(name: str, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                  rtol: float, atol: float, why: str) -> str:
    """Every floating-point tensor within rtol/atol, integer buffers equal."""
    assert a.keys() == b.keys(), f"{name}: different tensors"
    worst = 0.0
    for key, value in a.items():
        other = b[key].to(value.device)
        if not value.is_floating_point():
            assert torch.equal(value, other), f"{name}: {key} differs"
            continue
        assert torch.isfinite(value).all(), f"{name}: {key} is not finite"
        excess = ((value - other).abs() - (atol + rtol * other.abs())).max().item()
        used = ((value - other).abs() / (atol + rtol * other.abs())).max().item()
        worst = max(worst, used)
        if excess > 0:
            raise AssertionError(f"{name}: {key} beyond rtol {rtol:g} / atol {atol:g} ({why})")
    return f"{name} within {worst:.2f} of rtol {rtol:g}/atol {atol:g}"


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(RunPaths(out).checkpoints)).model


def log_rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in RunPaths(out).train_log.read_text().splitlines()]


def first_step(out: Path) -> dict[str, Any]:
    return next(r for r in log_rows(out) if r.get("step") == 1 and "loss" in r)


def maps_agree(name: str, ours: Path, reference: Path, mean_bound: float,
               agreement: float, why: str) -> str:
    """Maps of every image: same classes, finite, in [0, 1]; mean |difference| over all
    values <= mean_bound; pseudo labels (threshold 0.25) equal on >= `agreement` of pixels."""
    diffs, same, pixels = [], 0, 0
    for split_dir in sorted(reference.iterdir()):
        for path in sorted(split_dir.glob("*.npz")):
            got, want = load_maps(ours / split_dir.name / path.name), load_maps(path)
            assert np.array_equal(got.classes, want.classes), f"{name}: {path.name} classes"
            for a, b in ((got.maps, want.maps), (got.background, want.background)):
                if a is None or b is None:
                    continue
                assert np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1, path.name
                diffs.append(np.abs(a - b).ravel())
            same += int((labels_from_maps(got, 0.25) == labels_from_maps(want, 0.25)).sum())
            pixels += got.maps.shape[1] * got.maps.shape[2]
    mean = float(np.concatenate(diffs).mean())
    share = same / pixels
    if mean > mean_bound or share < agreement:
        raise AssertionError(f"{name}: mean |diff| {mean:.2e} (<= {mean_bound:.1e}?), labels "
                             f"agree on {share:.2%} (>= {agreement:.0%}?) ({why})")
    return f"{name} mean {mean:.1e} <= {mean_bound:.1e}, labels {share:.2%}"


# ---------------------------------------------------------------------------------------
# Runs


@dataclass
class Workspace:
    root: Path
    data: Path
    threads: int

    def config(self, name: str, *extra: str) -> Config:
        return load_config(None, [*tiny_overrides(self.data, self.root / name, self.threads),
                                  *extra])

    def copy_checkpoints(self, source: str, name: str) -> Path:
        out = self.root / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(self.root / source / "checkpoints", out / "checkpoints")
        return out


def train(ws: Workspace, name: str, *extra: str) -> Path:
    from cpal.pipeline import stage_train

    cfg = ws.config(name, *extra)
    stage_train(cfg, progress=False)
    return cfg.output_path


def infer(ws: Workspace, name: str, *extra: str) -> Path:
    from cpal.pipeline import stage_infer

    cfg = ws.config(name, *extra)
    stage_infer(cfg, progress=False)
    return cfg.output_path / "maps"


def reference(check: Checker, ws: Workspace) -> None:
    with check.stage("reference: cpu fp32 cam train+maps") as notes:
        train(ws, "cpu_cam", "device=cpu")
        infer(ws, "cpu_cam", "device=cpu")
        notes.append(f"loss {first_step(ws.root / 'cpu_cam')['loss']:.4f} at step 1")
    with check.stage("reference: cpu fp32 cpal train+maps") as notes:
        train(ws, "cpu_cpal", "device=cpu", "method=cpal", *PROTO)
        infer(ws, "cpu_cpal", "device=cpu", "method=cpal", *PROTO)
        notes.append(f"loss {first_step(ws.root / 'cpu_cpal')['loss']:.4f} at step 1")


def cuda_training(check: Checker, ws: Workspace) -> None:
    why_tf32 = "cuDNN convolutions run in TF32 by default: 11-bit mantissa"
    for method, extra in (("cam", []), ("cpal", ["method=cpal", *PROTO])):
        ref = ws.root / f"cpu_{method}"
        for precision in ("fp32", "bf16", "fp16"):
            name = f"cuda_{method}_{precision}"
            with check.stage(f"train: cuda {precision} {method}") as notes:
                out = train(ws, name, "device=cuda", f"train.precision={precision}", *extra)
                rows = first_step(out), first_step(ref)
                # Step 1 runs the same weights on the same images: only rounding differs.
                # L_cls is a mean of O(1) terms, so ~5 unit roundoffs of the precision bound
                # it; the whole loss only loosely for cpal (PACAM normalises each map by its
                # peak + 1e-5, which amplifies rounding where the peak is small).
                u = {"fp32": U_TF32, "bf16": U_BF16, "fp16": U_FP16}[precision]
                notes.append(close("L_cls", rows[0]["loss_cls"], rows[1]["loss_cls"], 5 * u,
                                   f"5 unit roundoffs of {precision}"))
                if method == "cpal":
                    notes.append(close("loss", rows[0]["loss"], rows[1]["loss"], 0.05,
                                       "L_self amplifies rounding"))
                weights = final_weights(out)
                bad = [k for k, v in weights.items() if v.is_floating_point()
                       and not torch.isfinite(v).all()]
                assert not bad, f"not finite after training: {bad[:3]}"
                if precision == "fp32":
                    # 4 SGD steps at lr 1e-3: TF32-sized gradient differences move weights
                    # by ~1e-6; 1e-4 catches a wrong device placement or a missed sync.
                    notes.append(weights_close("weights", weights, final_weights(ref), 1e-3,
                                               1e-4, why_tf32))
                if precision == "fp16":
                    meta = load_checkpoint(latest_checkpoint(out / "checkpoints")).meta
                    scaler = meta.get("grad_scaler")
                    assert scaler and scaler["scale"] > 0, "GradScaler state not checkpointed"
                    summary = [r for r in log_rows(out) if "mean_loss" in r][-1]
                    assert "skipped_steps" in summary, "fp16 summary lacks skipped_steps"
                    notes.append(f"GradScaler scale {scaler['scale']:g}, "
                                 f"{summary['skipped_steps']} skipped")
                if method == "cpal":
                    count = int(weights["cpal.bank.count"].sum())
                    assert count > 0, "the support bank stayed empty"
                    for key in ("cpal.bank.queue", "cpal.bank.context"):
                        if key in weights:
                            assert torch.isfinite(weights[key]).all(), f"{key} holds inf/NaN"
                    notes.append(f"bank {count} entries")
    with check.stage("train: cuda channels-last cam") as notes:
        out = train(ws, "cuda_cam_cl", "device=cuda", "train.channels_last=true")
        # NHWC picks other cuDNN kernels (another summation order, TF32 as well).
        notes.append(weights_close("weights", final_weights(out),
                                   final_weights(ws.root / "cuda_cam_fp32"), 1e-3, 1e-4,
                                   why_tf32))


def pinned_memory(check: Checker, ws: Workspace) -> None:
    from torch.utils.data import DataLoader

    from cpal.data.datasets import ClassificationDataset
    from cpal.data.source import open_dataset
    from cpal.data.transforms import TrainTransform

    with check.stage("pinned: DataLoader + non_blocking") as notes:
        cfg = ws.config("pinned")
        layout = open_dataset(cfg.data)
        dataset = ClassificationDataset(layout, "train", TrainTransform(64, (64, 96), True), 0)
        for workers in (0, 2):
            loader = DataLoader(dataset, batch_size=4, num_workers=workers, pin_memory=True)
            batch = next(iter(loader))
            assert batch["image"].is_pinned(), f"batch not pinned ({workers} workers)"
            fast = batch["image"].to("cuda", non_blocking=True)
            torch.cuda.synchronize()
            assert torch.equal(fast.cpu(), batch["image"]), "non_blocking copy differs"
        notes.append("pinned with 0 and 2 workers; non_blocking copies exact")


def cpal_module_autocast(check: Checker, ws: Workspace) -> None:
    from cpal.models.cam_net import build_network

    cfg = ws.config("module", "method=cpal", *PROTO)
    torch.manual_seed(0)
    net, _ = build_network(cfg, 4)
    state = final_weights(ws.root / "cpu_cpal")  # a trained bank, so the context path runs
    if {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in
                                                  net.state_dict().items()}:
        net.load_state_dict(state)
    net.eval()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])  # absent classes
    with torch.no_grad():
        want = net(images, labels).cpal
    gpu = net.to("cuda")
    for precision, dtype, u in (("bf16", torch.bfloat16, U_BF16),
                                ("fp16", torch.float16, U_FP16)):
        with check.stage(f"module: CPAL under cuda {precision}") as notes:
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
                got = gpu(images.cuda(), labels.cuda()).cpal
            pacam = got.pacam.float().cpu()
            assert torch.isfinite(pacam).all(), "PACAM holds inf/NaN"
            assert torch.isfinite(got.prototypes.float()).all(), "prototypes hold inf/NaN"
            absent = ~got.valid.cpu()
            # CUDA autocast runs norms in float32: the zero prototypes of absent classes
            # stay zero (CPU fp16 would normalise them to NaN, which is why it is refused).
            assert torch.all(pacam[absent] == 0), "absent classes are not zero"
            assert torch.equal(got.valid.cpu(), want.valid), "valid channels differ"
            mean = (pacam - want.pacam).abs().mean().item()
            bound = 10 * u  # ~5u through the trunk, doubled for the peak normalisation
            assert mean <= bound, f"PACAM mean |diff| {mean:.2e} > {bound:.1e}"
            notes.append(f"PACAM mean |diff| {mean:.1e} <= {bound:.1e}; absent classes zero")


def cuda_maps(check: Checker, ws: Workspace) -> None:
    cases = [
        ("cam", "fp32", [], 5 * U_TF32, 0.98),
        ("cam", "fp32-channels-last", ["train.channels_last=true"], 5 * U_TF32, 0.98),
        ("cpal", "fp32", [], 5 * U_TF32, 0.98),
        ("cpal", "bf16", ["infer.precision=bf16"], 5 * U_BF16, 0.95),
        ("cpal", "fp16", ["infer.precision=fp16"], 5 * U_FP16, 0.98),
        ("cam", "bf16", ["infer.precision=bf16"], 5 * U_BF16, 0.95),
    ]
    for method, label, extra, bound, agreement in cases:
        with check.stage(f"maps: cuda {label} {method}") as notes:
            name = f"maps_{method}_{label}"
            ws.copy_checkpoints(f"cpu_{method}", name)
            method_args = ["method=cpal", *PROTO] if method == "cpal" else []
            maps = infer(ws, name, "device=cuda", *method_args, *extra)
            # The CPU checkpoint's weights: only the inference path differs. Bounds: 5 unit
            # roundoffs of the arithmetic on values in [0, 1]; labels may change only at
            # pixels within that error of the threshold or of another class.
            notes.append(maps_agree("maps", maps, ws.root / f"cpu_{method}" / "maps", bound,
                                    agreement, "rounding of the CUDA arithmetic"))


# ---------------------------------------------------------------------------------------
# torchrun


def _torchrun(ws: Workspace, nproc: int, args: list[str], timeout: int = 240,
              ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}",
           "OMP_NUM_THREADS": str(ws.threads)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={nproc}", *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )


def _config_file(ws: Workspace) -> Path:
    path = ws.root / "empty.yaml"
    path.write_text("{}\n")
    return path


def nccl_worker(out: Path) -> None:
    """Under `torchrun --nproc_per_node=1`: a 1-process NCCL group. cpal skips the group
    for one process, so the helpers' world-size guards are lifted here to run their NCCL
    branches (NCCL itself reduces over the one process)."""
    import torch.distributed as dist
    from torch import nn

    from cpal.engine import distributed

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    record: dict[str, Any] = {"backend": dist.get_backend()}
    start = time.perf_counter()
    distributed.barrier()  # dist.barrier(device_ids=[current device])
    record["barrier_s"] = time.perf_counter() - start
    real_world = dist.get_world_size
    dist.get_world_size = lambda *a, **k: 2  # type: ignore[assignment]
    try:
        cpu = torch.tensor([1.0, 2.0])
        record["all_reduce_cpu"] = distributed.all_reduce_sum(cpu).tolist()  # via the GPU
        record["all_reduce_cuda"] = distributed.all_reduce_sum(
            torch.tensor([3.0], device="cuda")).tolist()
        record["main_value"] = distributed.main_value({"checkpoint": "epoch_001.json"})
    finally:
        dist.get_world_size = real_world  # type: ignore[assignment]
    # same_everywhere sizes its gather by the world size, so it keeps its 1-process
    # shortcut here; the 2-GPU stage runs it over NCCL (every training start calls it).
    record["same_everywhere"] = distributed.same_everywhere("digest")
    # DistributedDataParallel as `distributed.wrap` builds it (device ids, no forward
    # buffer sync), with no_sync for a first micro-batch: its gradient must equal a plain
    # model's (averaged over 1 process).
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)).cuda()
    x = torch.randn(4, 3, 8, 8, device="cuda")
    plain(x)  # materialise the lazy layer
    twin = copy.deepcopy(plain)
    ddp_cls = nn.parallel.DistributedDataParallel
    no_forward_sync = ({"forward_sync_buffers": False}
                       if "forward_sync_buffers" in inspect.signature(ddp_cls.__init__).parameters
                       else {"broadcast_buffers": False})
    ddp = ddp_cls(twin, device_ids=[torch.cuda.current_device()], **no_forward_sync)
    with distributed.no_sync(ddp, sync=False):
        ddp(x[:2]).sum().backward()
    with distributed.no_sync(ddp, sync=True):
        ddp(x[2:]).sum().backward()
    ddp_grads = [p.grad.clone() for p in ddp.module.parameters()]
    for p in plain.parameters():
        p.grad = None
    plain(x[:2]).sum().backward()
    plain(x[2:]).sum().backward()
    record["ddp_grad_max_diff"] = max(
        (a - p.grad).abs().max().item() for a, p in zip(ddp_grads, plain.parameters(),
                                                        strict=True))
    # The abort after a failure (engine.distributed.collective): must return at once.
    distributed._failed = True
    start = time.perf_counter()
    distributed._destroy()
    record["abort_s"] = time.perf_counter() - start
    record["abort_api"] = hasattr(dist.distributed_c10d, "_abort_process_group")
    distributed._failed = False
    (out / "nccl_worker.json").write_text(json.dumps(record))


def nccl(check: Checker, ws: Workspace) -> None:
    with check.stage("nccl: 1-process group helpers") as notes:
        done = _torchrun(ws, 1, [str(Path(__file__).resolve()), "--nccl-worker",
                                 str(ws.root)], timeout=180)
        assert done.returncode == 0, done.stderr[-1500:]
        record = json.loads((ws.root / "nccl_worker.json").read_text())
        assert record["backend"] == "nccl"
        assert record["all_reduce_cpu"] == [1.0, 2.0] and record["all_reduce_cuda"] == [3.0]
        assert record["main_value"] == {"checkpoint": "epoch_001.json"}
        assert record["same_everywhere"] is True
        # DDP over one process averages over one: the same gradient up to rounding of the
        # bucketed copy (exact in practice).
        assert record["ddp_grad_max_diff"] <= 1e-6, record
        assert record["abort_s"] < 30, f"abort took {record['abort_s']:.0f} s"
        notes.append(f"barrier {record['barrier_s']:.2f} s, abort {record['abort_s']:.2f} s "
                     f"(_abort_process_group: {record['abort_api']}), DDP grad diff "
                     f"{record['ddp_grad_max_diff']:.1e}")
    with check.stage("nccl: torchrun -m cpal train, 1 proc") as notes:
        out = ws.root / "torchrun1"
        shutil.rmtree(out, ignore_errors=True)
        done = _torchrun(ws, 1, ["-m", "cpal", "train", str(_config_file(ws)),
                                 *tiny_overrides(ws.data, out, ws.threads), "device=cuda",
                                 "--no-progress"])
        assert done.returncode == 0, done.stderr[-1500:]
        # The same process layout as the in-process CUDA run; cuDNN may pick other
        # (nondeterministic) algorithms in another process.
        notes.append(weights_close("weights", final_weights(out),
                                   final_weights(ws.root / "cuda_cam_fp32"), 1e-4, 1e-5,
                                   "cuDNN algorithm choice"))


def ddp_two(check: Checker, ws: Workspace) -> None:
    config = str(_config_file(ws))
    with check.stage("ddp2: 2-process nccl train + maps") as notes:
        out = ws.root / "ddp2"
        shutil.rmtree(out, ignore_errors=True)
        args = [*tiny_overrides(ws.data, out, ws.threads), "device=cuda", "method=cpal",
                *PROTO, "train.grad_accum=2"]
        done = _torchrun(ws, 2, ["-m", "cpal", "train", config, *args, "--no-progress"])
        assert done.returncode == 0, done.stderr[-1500:]
        # NCCL's ring sums the halves in another order; TF32 as everywhere on CUDA.
        single = ws.root / "cuda_cpal_fp32"
        notes.append(weights_close("weights", final_weights(out), final_weights(single), 1e-3,
                                   1e-4, "NCCL summation order, TF32"))
        done = _torchrun(ws, 2, ["-m", "cpal", "infer", config, *args, "--no-progress"])
        assert done.returncode == 0, done.stderr[-1500:]
        stages = json.loads((out / "stages.json").read_text())
        assert stages["infer"]["missing"] == {"train": 0, "val": 0}, stages["infer"]
        notes.append(f"maps written {stages['infer']['written']}")
    with check.stage("ddp2: a failing process ends the job") as notes:
        data = ws.root / "broken_data"
        shutil.rmtree(data, ignore_errors=True)
        shutil.copytree(ws.data, data)
        from cpal.engine.trainer import epoch_order

        ids = (data / "ImageSets/Segmentation/train.txt").read_text().split()
        first = epoch_order(len(ids), seed=0, epoch=0)[:8]  # the first global batch
        broken = next((data / "JPEGImages").glob(f"{ids[first[5]]}.*"))  # process 1's part
        broken.write_bytes(b"not an image")
        start = time.perf_counter()
        done = _torchrun(ws, 2, ["-m", "cpal", "train", config,
                                 *tiny_overrides(data, ws.root / "ddp2_broken", ws.threads),
                                 "device=cuda", "--no-progress"], timeout=300)
        seconds = time.perf_counter() - start
        assert done.returncode != 0, "the job succeeded with a corrupt image"
        assert f"cpal: error: cannot read image {broken}" in done.stderr, done.stderr[-1500:]
        # Without the abort, process 1 would wait for NCCL's watchdog (10 minutes).
        assert seconds < 180, f"the job took {seconds:.0f} s to stop"
        notes.append(f"stopped after {seconds:.0f} s with the one-line error")


# ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None,
                        help="working folder (default: a temporary one, removed after)")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1),
                        help="CPU threads of the reference runs")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    parser.add_argument("--nccl-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nccl_worker is not None:
        nccl_worker(args.nccl_worker)
        return 0
    from cpal.data.synthetic import generate

    # The tiny runs freeze BN without ImageNet weights on purpose: each says so in one
    # `cpal: warning:` line, which is expected here.
    cuda = torch.cuda.is_available()
    work = args.work or Path(tempfile.mkdtemp(prefix="cpal_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version() if cuda else None}, "
          f"{torch.cuda.device_count() if cuda else 0} GPU(s)"
          + (f": {torch.cuda.get_device_name(0)}" if cuda else "") + f"; work in {work}")
    check = Checker(cuda=cuda)
    try:
        data = work / "data"
        if not data.exists():
            generate(data, seed=3, num_train=32, num_val=8, image_size=64)
        ws = Workspace(work, data, args.threads)
        reference(check, ws)
        if not cuda:
            print("\nno CUDA device here: only the CPU reference ran; run this script on a "
                  "machine with a CUDA GPU to check the CUDA paths")
            return 1 if any(not r.ok for r in check.results) else 0
        stages: list[Callable[[Checker, Workspace], None]] = [
            cuda_training, pinned_memory, cpal_module_autocast, cuda_maps, nccl]
        for stage in stages:
            stage(check, ws)
        if torch.cuda.device_count() >= 2:
            ddp_two(check, ws)
        else:
            print("[skip] ddp2: one GPU (2-process NCCL needs two: NCCL refuses two ranks "
                  "on one device)")
        return check.summary()
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
