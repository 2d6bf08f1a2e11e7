from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cpal.prototypes.bank import SupportBank

pytestmark = pytest.mark.distributed

ROWS = {0: (3, [0, 1, 1]), 1: (5, [1, 2, 0, 1, 1])}  # rank -> (n, channels)


def _rows(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows valued 100 (rank + 1) + i, with sample ids 1000 (rank + 1) + i."""
    n, ch = ROWS[rank]
    x = (100.0 * (rank + 1) + torch.arange(n, dtype=torch.float32))[:, None].expand(n, 4)
    return x.clone(), torch.tensor(ch), 1000 * (rank + 1) + torch.arange(n)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        bank = SupportBank(3, size=4, dim=4)
        bank.enqueue_synced(*_rows(rank))
        bank.enqueue_synced(*_rows(rank))  # twice: wraps channel 1 (6 rows per round)
        torch.save(bank.state_dict(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_enqueue_synced_two_ranks(tmp_path) -> None:
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    s0 = torch.load(tmp_path / "rank0.pt")
    s1 = torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    ref = SupportBank(3, size=4, dim=4)
    for _ in range(2):
        x = torch.cat([_rows(0)[0], _rows(1)[0]])
        ch = torch.cat([_rows(0)[1], _rows(1)[1]])
        ref.enqueue(x, ch, torch.cat([_rows(0)[2], _rows(1)[2]]))
    assert all(torch.equal(s0[k], v) for k, v in ref.state_dict().items())
    got = SupportBank(3, size=4, dim=4)
    got.load_state_dict(s0)
    # channel 1 receives, per round, rank 0's rows 101, 102 then rank 1's 200, 203, 204
    assert got.entries(1)[:, 0].tolist() == [102.0, 200.0, 203.0, 204.0]
    assert got.entry_sources(1).tolist() == [1002, 2000, 2003, 2004]
    assert got.entries(0)[:, 0].tolist() == [100.0, 202.0, 100.0, 202.0]
