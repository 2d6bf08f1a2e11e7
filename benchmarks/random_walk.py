"""Random walk: IRN's dense matrix squaring against the banded stencil, on the same maps.

For each grid (default 32x32, 64x64 and VOC's stride-4 grid 128x160 of a ~512x640 image)
prints time and peak memory per image of the dense one-image-at-a-time reference
(`random_walk_dense`, IRN's propagate_to_edge) and of the fast version (`random_walk`,
one image and a batch), their ratio, the label agreement and the largest map difference.
A benchmark, not a test: it prints figures, it asserts nothing.

Where the dense reference has more than --dense-full-max pixels it would not finish in a
few minutes (one squaring of a 20k x 20k matrix is 1.7e13 flop), so its matrices are built
(memory measured) and the time of 1/--dense-blocks of one squaring is measured and scaled
to exp_times squarings: the output says "extrapolated", and label agreement is then taken
from the smaller grids. Every case runs in a fresh process so that peak RSS is its own.

    OMP_NUM_THREADS=1 python benchmarks/random_walk.py [--device cuda] [--grids 32x32 ...]
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from cpal.refine.irn import affinity_from_boundary, pair_offsets
from cpal.refine.random_walk import (
    RandomWalkParams,
    random_walk,
    random_walk_dense,
    random_walk_labels,
)

CHANNELS = 3  # foreground classes per image: VOC images have 1-3


def _inputs(height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps with a few Gaussian blobs and a boundary map with a few straight walls."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(height, dtype=torch.float32)[:, None]
    xs = torch.arange(width, dtype=torch.float32)[None, :]
    maps = torch.zeros(CHANNELS, height, width)
    for c in range(CHANNELS):
        cy = float(torch.rand(1, generator=g)) * height
        cx = float(torch.rand(1, generator=g)) * width
        sigma = 0.1 * min(height, width) * (1 + float(torch.rand(1, generator=g)))
        maps[c] = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma**2))
    boundary = 0.2 * torch.rand(height, width, generator=g)
    for _ in range(4):
        if float(torch.rand(1, generator=g)) < 0.5:
            boundary[int(torch.randint(height, (1,), generator=g)), :] = 0.95
        else:
            boundary[:, int(torch.randint(width, (1,), generator=g))] = 0.95
    return maps, boundary


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_start(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return float(torch.cuda.memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def _peak_mb(device: torch.device, start: float) -> float:
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - start) / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0 - start) / 2**20


def _fast_case(height: int, width: int, batch: int, device_name: str, threads: int,
               params: RandomWalkParams) -> dict[str, Any]:
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    items = [_inputs(height, width, seed) for seed in range(batch)]
    maps = torch.stack([m for m, _ in items]).to(device)
    boundary = torch.stack([b for _, b in items]).to(device)
    random_walk(maps[:, :, :8, :8], boundary[:, :8, :8], RandomWalkParams(exp_times=1))
    _sync(device)
    start = _peak_start(device)
    begin = time.perf_counter()
    out = random_walk(maps, boundary, params)
    _sync(device)
    seconds = time.perf_counter() - begin
    return {"seconds_per_image": seconds / batch,
            "peak_mb_per_image": _peak_mb(device, start) / batch, "first": out[0].cpu()}


def _dense_case(height: int, width: int, device_name: str, threads: int,
                params: RandomWalkParams, full_max: int, blocks: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    maps, boundary = _inputs(height, width, seed=0)
    maps, boundary = maps.to(device), boundary.to(device)
    n = height * width
    start = _peak_start(device)
    if n <= full_max:
        begin = time.perf_counter()
        out = random_walk_dense(maps, boundary, params)
        _sync(device)
        return {"seconds_per_image": time.perf_counter() - begin, "extrapolated": False,
                "peak_mb_per_image": _peak_mb(device, start), "out": out.cpu()}
    # Too large to finish: build T exactly as random_walk_dense does, time one block of
    # rows of one squaring, and scale.
    begin = time.perf_counter()
    aff = affinity_from_boundary(boundary, params.radius)
    index = torch.arange(n, device=device).reshape(height, width)
    dense = torch.eye(n, device=device)
    for p, (dy, dx) in enumerate(pair_offsets(params.radius).offsets.tolist()):
        xs = slice(max(0, -dx), width - max(0, dx))
        src = index[: height - dy, xs].reshape(-1)
        dst = index[dy:, max(0, -dx) + dx: width - max(0, dx) + dx].reshape(-1)
        value = aff[p, : height - dy, xs].reshape(-1)
        dense[src, dst] = value
        dense[dst, src] = value
    trans = dense**params.beta
    del dense
    trans /= trans.sum(dim=0, keepdim=True)
    _sync(device)
    build = time.perf_counter() - begin
    rows = max(1, n // blocks)
    begin = time.perf_counter()
    block = trans[:rows] @ trans
    _sync(device)
    block_seconds = time.perf_counter() - begin
    del block
    begin = time.perf_counter()
    _ = (maps * (1 - boundary)).reshape(CHANNELS, n) @ trans
    _sync(device)
    apply_seconds = time.perf_counter() - begin
    estimate = build + params.exp_times * block_seconds * (n / rows) + apply_seconds
    return {"seconds_per_image": estimate, "extrapolated": True,
            "peak_mb_per_image": _peak_mb(device, start), "out": None,
            "note": f"built T in {build:.1f} s; {rows} of {n} rows of one squaring took "
                    f"{block_seconds:.2f} s, scaled x{n / rows:.0f} x {params.exp_times} squarings"}


def _run(fn: Any, *args: Any) -> Any:
    """Run fn in a fresh spawned process (its own peak RSS)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", nargs="+", default=["32x32", "64x64", "128x160"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4, help="images per fast batch")
    parser.add_argument("--exp-times", type=int, default=8)
    parser.add_argument("--dense-full-max", type=int, default=4096,
                        help="largest N the dense reference runs in full")
    parser.add_argument("--dense-blocks", type=int, default=16,
                        help="time 1/this of one squaring above --dense-full-max")
    args = parser.parse_args()
    params = RandomWalkParams(exp_times=args.exp_times)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), device {args.device}; radius {params.radius}, beta "
          f"{params.beta}, 2^{params.exp_times} steps, {CHANNELS} maps per image")
    print(f"{'grid':>9} {'N':>6} | {'dense s/img':>12} {'dense MB':>9} | {'fast s/img':>10} "
          f"{'batch s/img':>11} {'fast MB':>8} | {'speed-up':>9} {'labels':>7} {'max rel':>8}")
    notes = []
    for grid in args.grids:
        height, width = (int(v) for v in grid.lower().split("x"))
        n = height * width
        dense = _run(_dense_case, height, width, args.device, args.threads, params,
                     args.dense_full_max, args.dense_blocks)
        single = _run(_fast_case, height, width, 1, args.device, args.threads, params)
        batched = _run(_fast_case, height, width, args.batch, args.device, args.threads, params)
        ratio = dense["seconds_per_image"] / batched["seconds_per_image"]
        if dense["out"] is not None:
            fast_out, dense_out = single["first"], dense["out"]
            agree = (random_walk_labels(fast_out, [1, 2, 3], params=params)
                     == random_walk_labels(dense_out, [1, 2, 3], params=params)).mean()
            rel = float((fast_out - dense_out).abs().max() / dense_out.abs().max())
            agreement, max_rel = f"{100 * agree:6.2f}%", f"{rel:8.1e}"
        else:
            agreement, max_rel = "    n/a", "     n/a"
            notes.append(f"{grid}: dense time extrapolated ({dense['note']})")
        mark = "*" if dense["extrapolated"] else " "
        print(f"{grid:>9} {n:>6} | {dense['seconds_per_image']:11.2f}{mark} "
              f"{dense['peak_mb_per_image']:9.0f} | {single['seconds_per_image']:10.3f} "
              f"{batched['seconds_per_image']:11.3f} {batched['peak_mb_per_image']:8.1f} | "
              f"{ratio:8.0f}x {agreement:>7} {max_rel}")
    print(f"fast batch = {args.batch} images per call; MB = peak memory above the inputs "
          "(RSS on CPU, allocated on CUDA) per image; speed-up = dense / fast batch; "
          "labels = pixels with the same random-walk label (grid resolution).")
    for note in notes:
        print("* " + note + "; labels are compared on the grids where dense runs in full.")


if __name__ == "__main__":
    main()
