"""Data under DDP (issue 22, item 5): real torchrun processes on gloo, compared with one process.

In one process, a loader with a DistributedSampler for rank r of 2 gives that rank's share: what
validate and predict drop of its padding is checked there first. Under torchrun,
tests/distributed/scripts/ddp_data.py validates a 101-sample set (a DistributedSampler pads it to 102 on 2
ranks), fits with lr=0 and predicts, once in one process and once on 2 ranks; on 2 ranks it also
tries the train loaders that give every rank the whole set, which must be refused on every rank.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_model
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from torchkeel import AdvancedTrainer

# The ranks' batches group the samples otherwise than one process's do: their float32 means differ
# in the last bits (3.4e-8 relative at most, measured); the float64 sums and the all-reduce add nothing.
REL = 2e-7


# ------------------------------------------------------------------- one process, a rank's share
def _data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g))


class _Logs(AdvancedTrainer):
    """validation_step logs a value with the default count and one with a count of its own."""

    def validation_step(self, batch: Any) -> tuple[Any, Any, Any]:
        loss, outputs, targets = super().validation_step(batch)
        self.log("top", outputs.max(1).values.mean())
        self.log("hits", (outputs.argmax(1) == targets).float().mean(), count=3 * len(targets))
        return loss, outputs, targets


def _trainer() -> _Logs:
    model = make_model()
    return _Logs(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss(),
                 metrics={"acc": lambda o, t: (o.argmax(1) == t).float().mean()}, progress=False, device="cpu")


def _share(data: TensorDataset, rank: int, batch_size: int, shuffle: bool = False) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, sampler=DistributedSampler(data, 2, rank, shuffle=shuffle))


@pytest.mark.parametrize("batch_size", [1, 16, 25])    # 25: the last batch of rank 1 is padding alone
def test_predict_of_each_ranks_share_drops_the_padding(batch_size: int) -> None:
    data = _data(101)
    trainer = _trainer()
    whole = trainer.predict(DataLoader(data, batch_size=101))
    r0, r1 = (trainer.predict(_share(data, rank, batch_size)) for rank in (0, 1))
    assert (r0.shape[0], r1.shape[0]) == (51, 50)
    joined = torch.empty_like(whole)
    joined[0::2], joined[1::2] = r0, r1
    torch.testing.assert_close(joined, whole, rtol=REL, atol=1e-7)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_validate_of_a_ranks_share_counts_only_its_real_samples(batch_size: int) -> None:
    """3 samples on 2 ranks: rank 1 reads sample 1, then sample 0 again as padding (a batch of its own with
    batch_size=1, cut from the batch with batch_size=2): its values are those of sample 1 alone."""
    data = _data(3)
    trainer = _trainer()
    share = trainer.validate(_share(data, 1, batch_size))
    alone = trainer.validate(DataLoader(Subset(data, [1]), batch_size=1))
    assert share == pytest.approx(alone, rel=REL)
    assert set(share) == {"val_loss", "val_acc", "val_top", "val_hits"}


def test_a_train_loader_in_one_process_is_not_checked_for_shards() -> None:
    data = _data(16)
    assert _trainer().fit(DataLoader(data, batch_size=4, shuffle=True), epochs=1)["step"] == [4]
