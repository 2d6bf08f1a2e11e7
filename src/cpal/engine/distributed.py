"""Data-parallel processes launched by torchrun: who this process is, where it runs, and the
few collectives the stages need.

A process started by `torchrun --nproc_per_node=N` finds RANK, WORLD_SIZE and LOCAL_RANK in
its environment; `init` joins the process group once (nccl on CUDA, gloo on CPU) and picks
the device cuda:LOCAL_RANK. Without those variables (or with WORLD_SIZE=1) every helper here
is a no-op and the stages run as a single process.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from cpal.errors import ConfigError, CpalError

_T = TypeVar("_T")
_Fn = TypeVar("_Fn", bound=Callable[..., Any])


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs, records and runs the single-process stages."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from exc


def launched_ranks() -> Ranks:
    """The ranks torchrun describes in the environment (a single process without it)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"environment: RANK={rank} does not fit WORLD_SIZE={world}")
    return Ranks(rank=rank, world_size=world, local_rank=_env_int("LOCAL_RANK", rank))


# Set while rank 0 runs stages alone (`alone`): every helper acts as in a single process.
_alone = False


def _grouped() -> bool:
    """Whether collectives go to a process group (joined, and not inside `alone`)."""
    return not _alone and dist.is_available() and dist.is_initialized()


def ranks() -> Ranks:
    """This process's ranks: from the process group once joined, else from the environment
    (a single process inside `alone`)."""
    if _alone:
        return Ranks()
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return launched_ranks()


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Run the block as a single process although a process group exists: what rank 0
    does after the others have finished their part of `cpal run` (refinement, the
    segmentation network), where a collective would wait for processes that are gone."""
    global _alone
    previous, _alone = _alone, True
    try:
        yield
    finally:
        _alone = previous


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (once per process); return this rank's device, which
    is cuda:LOCAL_RANK when `device` is CUDA."""
    launched = launched_ranks()
    if not launched.enabled:
        return device
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(
                f"'device': {device} would put every torchrun process on one GPU; "
                "use cuda or auto (each rank takes cuda:LOCAL_RANK)"
            )
        if launched.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {launched.local_rank} but only {torch.cuda.device_count()} GPUs "
                "are visible; lower --nproc_per_node"
            )
        device = torch.device("cuda", launched.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        except ValueError as exc:  # a variable torchrun sets is missing
            raise ConfigError(f"cannot join the torchrun process group: {exc}") from exc
        atexit.register(_destroy)
    return device


# Set when an exception left a stage that runs collectives (see `collective`).
_failed = False


def collective(fn: _Fn) -> _Fn:
    """Mark a stage whose processes run collectives together (train, infer): after an
    exception leaving it, the exit aborts an NCCL process group instead of tearing it down.

    NCCL's orderly teardown waits for the other processes, which may be blocked in a
    collective this process will never join: the failed process would not exit, and
    torchrun (which stops the others once one exits non-zero) would only end the job when
    NCCL's watchdog times out, reporting that timeout rather than the error. Aborting lets
    the process exit at once with its own error.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _failed
        try:
            return fn(*args, **kwargs)
        except BaseException:
            _failed = True
            raise

    return wrapper  # type: ignore[return-value]


def _destroy() -> None:
    """At exit: leave the process group (see `collective` for a failed NCCL one). gloo's
    teardown is local (it closes the connections, so the others fail at once too)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if _failed and dist.get_backend() == "nccl":
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is not None:
            abort()
        return  # without it (older torch), the group's destructor aborts it at exit
    dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if not _grouped():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (returned for chaining)."""
    if not (_grouped() and dist.get_world_size() > 1):
        return tensor
    if dist.get_backend() == "nccl" and not tensor.is_cuda:  # nccl reduces GPU tensors only
        on_gpu = tensor.cuda()
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        return tensor.copy_(on_gpu)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def main_value(value: _T) -> _T:
    """Rank 0's `value` on every rank (`value` itself in a single process): decisions taken
    from the file system (which checkpoint to resume, which maps are missing) are taken
    once, so processes whose views differ (a network file system's caches) still agree."""
    if not (_grouped() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def every_nth(items: Sequence[_T], start: int, step: int) -> list[_T]:
    """Every `step`-th item from `start`: for start = 0..step-1, disjoint parts whose union
    is `items`, sizes differing by one at most. Shards of a split (fixed by the split
    alone, so a resumed shard owns the same images) and the round-robin deal of pending
    per-image work to the processes (`deal`)."""
    return list(items[start::step])


def deal(decide: Callable[[], list[_T]]) -> list[_T]:
    """This process's share of a list of pending work that rank 0 alone draws up
    (`decide` may write, e.g. claim a folder, and raise a CpalError or OSError): every
    process raises rank 0's error, or takes every n-th item of rank 0's list. A single
    process gets the whole list."""
    here = ranks()
    outcome: tuple[list[_T], BaseException | None] = ([], None)
    if here.is_main:
        try:
            outcome = (decide(), None)
        except (CpalError, OSError) as exc:
            outcome = ([], exc)
    todo, problem = main_value(outcome)
    if problem is not None:
        raise problem
    return every_nth(todo, here.rank, here.world_size)


def same_everywhere(value: object) -> bool:
    """Whether every rank holds an equal `value` (True in a single process); every rank
    gets the same answer, so all can stop together rather than wait for each other."""
    if not (_grouped() and dist.get_world_size() > 1):
        return True
    values: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block before the others (e.g. to fill a cache they then reuse)."""
    main = ranks().is_main
    if not main:
        barrier()
    yield
    if main:
        barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over `model` when several processes train, else `model`.

    Buffers are not broadcast from rank 0 at every forward: the support bank is kept
    identical by its own synchronised enqueue, and frozen BatchNorm statistics never change
    (unfrozen ones are per rank; rank 0's are saved).
    """
    if not ranks().enabled:
        return model
    ddp = nn.parallel.DistributedDataParallel
    # torch >= 2.13 renames the switch (buffers still sync once at construction: harmless,
    # every rank holds the same ones then).
    no_forward_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
        else {"broadcast_buffers": False}
    )
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None,
               **no_forward_sync)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the network itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce for a micro-batch that is not the step's last."""
    if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()
