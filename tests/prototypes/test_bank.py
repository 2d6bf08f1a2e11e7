from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cpal.prototypes.bank import SupportBank


def _rows(n: int, dim: int = 4, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, dim).clone()


def test_fifo_order_and_capacity() -> None:
    bank = SupportBank(3, size=5, dim=4)
    x = _rows(7)
    for i in range(3):  # partly one at a time ...
        bank.enqueue(x[i : i + 1], torch.tensor([1]))
    bank.enqueue(x[3:], torch.full((4,), 1))  # ... partly in one call that wraps around
    assert bank.entries(1)[:, 0].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert bank.counts().tolist() == [0, 5, 0]
    assert bank.entries(0).shape == (0, 4)


def test_one_call_longer_than_capacity_and_mixed_channels() -> None:
    bank = SupportBank(2, size=5, dim=4)
    x = _rows(9)
    ch = torch.tensor([0, 1, 0, 0, 1, 0, 0, 0, 0])  # channel 0 gets 7 rows in one call
    bank.enqueue(x, ch)
    assert bank.entries(0)[:, 0].tolist() == [3.0, 5.0, 6.0, 7.0, 8.0]
    assert bank.entries(1)[:, 0].tolist() == [1.0, 4.0]
    bank.enqueue(_rows(1, start=100), torch.tensor([0]))
    assert bank.entries(0)[:, 0].tolist() == [5.0, 6.0, 7.0, 8.0, 100.0]


def test_mean_context_and_raw_candidates() -> None:
    bank = SupportBank(2, size=4, dim=2, clusters=0)
    bank.enqueue(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 1]))
    torch.testing.assert_close(bank.mean_context(1), F.normalize(torch.tensor([1.0, 1.0]), dim=0))
    bank.recluster(0, 1)
    ctx, counts = bank.context(1)
    torch.testing.assert_close(ctx, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert counts.tolist() == [1.0, 1.0]
    assert bank.context(0)[0].shape == (0, 2)


def _filled_bank() -> SupportBank:
    g = torch.Generator().manual_seed(0)
    bank = SupportBank(3, size=16, dim=8, clusters=4)
    x = F.normalize(torch.randn(40, 8, generator=g), dim=1)
    bank.enqueue(x, torch.randint(0, 3, (40,), generator=g))
    bank.recluster(4, 5, torch.Generator().manual_seed(1))
    return bank


def test_state_dict_round_trip_with_context(tmp_path) -> None:
    bank = _filled_bank()
    fresh = SupportBank(3, size=16, dim=8, clusters=4)
    fresh.load_state_dict(bank.state_dict())
    path = tmp_path / "bank.safetensors"
    save_file(bank.state_dict(), str(path))
    loaded = SupportBank(3, size=16, dim=8)  # different default kmax: adopts the file's
    loaded.load_state_dict(load_file(str(path)))
    for other in (fresh, loaded):
        for c in range(3):
            torch.testing.assert_close(other.entries(c), bank.entries(c))
            torch.testing.assert_close(other.context(c)[0], bank.context(c)[0])
            torch.testing.assert_close(other.context(c)[1], bank.context(c)[1])
        assert torch.equal(other.ptr, bank.ptr) and torch.equal(other.count, bank.count)
    assert bank.context(0)[0].shape[0] == 4


def test_raw_bank_means_and_centroids_keep_norms() -> None:
    bank = SupportBank(2, size=4, dim=2, clusters=1, normalize=False)
    bank.enqueue(torch.tensor([[0.6, 0.0], [0.0, 0.4], [0.2, 0.2]]), torch.tensor([1, 1, 1]))
    mean = torch.tensor([0.8 / 3, 0.2])
    torch.testing.assert_close(bank.mean_context(1), mean)
    torch.testing.assert_close(bank.mean_context(0), torch.zeros(2))  # empty: no NaN
    bank.recluster(1, 3)
    ctx, counts = bank.context(1)
    torch.testing.assert_close(ctx, mean[None])  # one cluster: the raw mean of all members
    assert counts.tolist() == [3.0]


def test_sources_follow_their_entries_through_the_fifo() -> None:
    bank = SupportBank(2, size=3, dim=4)
    x = _rows(5)
    bank.enqueue(x[:2], torch.tensor([1, 0]), torch.tensor([10, 11]))
    bank.enqueue(x[2:], torch.tensor([1, 1, 1]), torch.tensor([12, 13, 14]))  # wraps ch 1
    assert bank.entries(1)[:, 0].tolist() == [2.0, 3.0, 4.0]
    assert bank.entry_sources(1).tolist() == [12, 13, 14]
    assert bank.entry_sources(0).tolist() == [11]
    bank.enqueue(_rows(1, start=7), torch.tensor([1]))  # no ids given: unknown
    assert bank.entries(1)[:, 0].tolist() == [3.0, 4.0, 7.0]
    assert bank.entry_sources(1).tolist() == [13, 14, -1]


def test_nearest_sources_hand_case() -> None:
    bank = SupportBank(2, size=4, dim=2)
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    bank.enqueue(rows, torch.tensor([1, 1, 1]), torch.tensor([5, 6, 7]))
    targets = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    # cos to (1,0), (0,1), (0.6,0.8): first 0.99, 0.11, 0.68; second 0.11, 0.99, 0.86
    assert bank.nearest_sources(1, targets, 2).tolist() == [[5, 7], [6, 7]]
    assert bank.nearest_sources(1, targets[:1], 5).tolist() == [[5, 7, 6, -1, -1]]
    assert bank.nearest_sources(0, targets, 1).tolist() == [[-1], [-1]]  # empty channel


def test_sources_round_trip_and_are_required(tmp_path) -> None:
    bank = _filled_bank()
    bank.enqueue(_rows(3, dim=8), torch.tensor([0, 2, 2]), torch.tensor([40, 41, 42]))
    path = tmp_path / "bank.safetensors"
    save_file(bank.state_dict(), str(path))
    loaded = SupportBank(3, size=16, dim=8, clusters=4)
    loaded.load_state_dict(load_file(str(path)))
    assert torch.equal(loaded.sources, bank.sources)
    assert loaded.entry_sources(2).tolist()[-2:] == [41, 42]
    old = {k: v for k, v in bank.state_dict().items() if k != "sources"}
    with pytest.raises(RuntimeError, match=r'Missing key.*"sources"'):
        SupportBank(3, size=16, dim=8, clusters=4).load_state_dict(old)
