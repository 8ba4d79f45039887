"""ElasticSampler: DistributedSampler's order at a constant world size, one global order at any other."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

from torchkeel.distributed import ElasticSampler
from torchkeel.elastic import accumulation_for, describe


def data(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n))


@pytest.mark.parametrize("n", [1, 3, 10, 13, 24])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
def test_at_a_constant_world_size_the_order_is_distributed_samplers(n: int, world: int, shuffle: bool,
                                                                     drop_last: bool) -> None:
    for rank in range(world):
        theirs = DistributedSampler(data(n), world, rank, shuffle=shuffle, seed=7, drop_last=drop_last)
        ours = ElasticSampler(data(n), world, rank, shuffle=shuffle, seed=7, drop_last=drop_last)
        for epoch in (0, 1, 5):
            theirs.set_epoch(epoch)
            ours.set_epoch(epoch)
            assert list(ours) == list(theirs), (rank, epoch)
            assert len(ours) == len(theirs) == len(list(theirs))
            assert ours.total_size == theirs.total_size      # what validation reads to drop the padding
            for k in range(len(theirs) + 1):                  # resumed after k samples a rank: the same rest
                ours.set_position(k * world)
                assert list(ours) == list(theirs)[k:], (rank, epoch, k)
            ours.set_position(0)


def global_order(n: int, world: int, start: int, epoch: int = 2) -> list[int]:
    """The positions every rank reads from ``start``, interleaved back into one global order."""
    per_rank = []
    for rank in range(world):
        s = ElasticSampler(data(n), world, rank, seed=3)
        s.set_epoch(epoch)
        s.set_position(start)
        assert len(s) == len(list(s))
        per_rank.append(list(s))
    return [per_rank[r][i] for i in range(len(per_rank[0])) for r in range(world)]


def test_a_resume_at_another_world_size_reads_the_next_unseen_global_samples() -> None:
    n = 36
    whole = global_order(n, 4, 0)                     # 4 ranks, no padding: the epoch's permutation
    assert sorted(whole) == list(range(n))
    for world in (1, 2, 3, 4, 6):
        for start in (0, 12, 24, 30):
            pad = -(n - start) % world                 # 6 left on 4 ranks: 2 repeats of the order's first
            assert global_order(n, world, start) == whole[start:] + whole[:pad], (world, start)


def test_the_padding_at_another_world_size_repeats_the_orders_first_samples() -> None:
    whole = global_order(10, 1, 0)
    rest = global_order(10, 3, 4)                     # 6 left: no padding
    assert rest == whole[4:]
    rest = global_order(10, 4, 4)                     # 6 left on 4 ranks: 2 repeats of the order's first samples
    assert rest == whole[4:] + whole[:2]
    s = ElasticSampler(data(10), 4, 0)
    s.set_position(4)
    s.set_epoch(1)                                     # a new epoch starts from its first sample
    assert len(s) == 3 and s.start == 0


def test_without_a_process_group_it_is_one_process_and_it_refuses_bad_positions() -> None:
    s = ElasticSampler(data(5), shuffle=False)
    assert (s.num_replicas, s.rank, list(s)) == (1, 0, [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"set_position\(-1\)"):
        s.set_position(-1)


def test_the_accumulation_is_derived_or_refused_naming_the_numbers() -> None:
    assert accumulation_for(12, 2, 3, None) == 2
    assert accumulation_for(12, 1, 4, 3) == 3
    assert describe(12, 3, 2, 2) == "global batch 12 = 3 ranks x micro-batch 2 x 2 accumulation steps"
    with pytest.raises(ValueError) as err:
        accumulation_for(12, 2, 5, None)
    assert str(err.value).startswith("AdvancedTrainer(global_batch_size=12): 5 data-parallel rank(s) x micro-batch "
                                     "2 (the train loader's batch_size) = 10 samples per micro-step")
    assert "Data-parallel sizes that divide it at micro-batch 2: [1, 2, 3, 6]" in str(err.value)
    assert "micro-batches that divide it at 5 rank(s): none" in str(err.value)
    with pytest.raises(ValueError, match=r"global_batch_size=12\), gradient_accumulation_steps=2: 2 rank\(s\) x "
                                         r"micro-batch 2 x 2 accumulation steps = 8, not 12; the global batch needs 3"):
        accumulation_for(12, 2, 2, 2)
    with pytest.raises(ValueError, match="has no batch_size"):
        accumulation_for(12, None, 2, None)
