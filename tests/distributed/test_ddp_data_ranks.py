"""Data under DDP (issue 22, item 5) on 2 real ranks (gloo), compared with one process.

tests/distributed/scripts/ddp_data.py validates a 101-sample set (a DistributedSampler pads it to 102
on 2 ranks), fits with lr=0 and predicts, once in one process and once on 2 ranks. Split from
tests/fit/test_ddp_data.py (a rank's share in one process)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from launch import process, ranks

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "distributed" / "scripts" / "ddp_data.py"
TIMEOUT = 150
# The ranks' batches group the samples otherwise than one process's do: their float32 means differ
# in the last bits (3.4e-8 relative at most, measured); the float64 sums and the all-reduce add nothing.
REL = 2e-7
LOADERS = ("sampler16", "create16", "create25", "shuffled7", "whole")
VALUES = ("val_loss", "val_acc", "val_confidence", "val_hits2")


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    return env


# -------------------------------------------------------------------------------- two ranks
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """{"one": rank 0 of one process, "ddp": [rank 0, rank 1] of 2 ranks}."""
    out = tmp_path_factory.mktemp("ddp_data")
    one = process(SCRIPT, "--out", out / "one", env=_env(), timeout=TIMEOUT)
    assert one.returncode == 0 and "terminate called" not in one.stderr, one.stderr[-4000:]
    proc = ranks(SCRIPT, "--out", out / "ddp", env=_env(), timeout=TIMEOUT)
    assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr[-4000:]
    load = lambda p: torch.load(p, weights_only=True)
    return {"one": load(out / "one" / "result-rank0.pt"),
            "ddp": [load(out / "ddp" / f"result-rank{r}.pt") for r in (0, 1)]}


@pytest.mark.distributed
def test_validation_under_ddp_drops_the_samplers_padding_and_equals_one_process(runs: dict[str, Any]) -> None:
    one, ddp = runs["one"], runs["ddp"]
    assert one["world_size"] == 1 and ddp[0]["world_size"] == 2
    truth = one["validate"]["whole"]
    for name in LOADERS:
        assert ddp[0]["validate"][name] == ddp[1]["validate"][name], name   # the ranks agree exactly
        for key in VALUES:     # one process: every loader is the whole set, in other batches
            assert one["validate"][name][key] == pytest.approx(truth[key], rel=REL), (name, key)
            assert ddp[0]["validate"][name][key] == pytest.approx(truth[key], rel=REL), (name, key)
    for name in ("create16", "create25"):     # FSDP: a forward on rank 1's batch of padding alone too
        for key in VALUES:
            assert ddp[0]["fsdp"][name][key] == pytest.approx(truth[key], rel=REL), (name, key)
    # what the padding added before: sample 0 counted twice, far outside the tolerance held above
    padded = one["padded"]
    for key in ("val_loss", "val_confidence"):
        assert abs(padded[key] - truth[key]) > 100 * REL * abs(truth[key]), key


@pytest.mark.distributed
def test_fit_validation_under_ddp_equals_one_process(runs: dict[str, Any]) -> None:
    """lr=0: the weights stay the seed's, so each history's validation values are the whole set's."""
    one, ddp = runs["one"]["history"], runs["ddp"][0]["history"]
    assert {k: v for k, v in runs["ddp"][1]["history"].items() if k != "epoch_time"} == \
        {k: v for k, v in ddp.items() if k != "epoch_time"}
    for key in VALUES:
        assert ddp[key] == pytest.approx(one[key], rel=REL), key


@pytest.mark.distributed
def test_predict_under_ddp_drops_the_padding(runs: dict[str, Any]) -> None:
    """Rank r predicts samples r, r+2, ...: 51 and 50 rows (the padded one dropped), together one process's."""
    one, (r0, r1) = runs["one"]["predict"], (d["predict"] for d in runs["ddp"])
    assert (one.shape[0], r0.shape[0], r1.shape[0]) == (101, 51, 50)
    joined = torch.empty_like(one)
    joined[0::2], joined[1::2] = r0, r1
    torch.testing.assert_close(joined, one, rtol=REL, atol=1e-7)


@pytest.mark.distributed
def test_a_train_loader_that_gives_every_rank_the_whole_set_is_refused_on_every_rank(runs: dict[str, Any]) -> None:
    for rank in (0, 1):
        errors = runs["ddp"][rank]["errors"]
        assert set(errors) == {"shuffled", "sequential", "batch_sampler", "one_replica"}
        assert errors["one_replica"].startswith(
            "fit(train_loader=...): the DistributedSampler was made for 1 rank(s) (num_replicas=1, rank=0), but "
            f"this process is rank {rank} of 2"), errors["one_replica"]
        assert "DistributedTrainer.create_dataloader(dataset, batch_size, shuffle=...)" in errors["one_replica"]
        for name, sampler in (("shuffled", "RandomSampler"), ("sequential", "SequentialSampler"),
                              ("batch_sampler", "SequentialSampler")):
            assert errors[name].startswith(
                f"fit(train_loader=...): a DataLoader with torch's {sampler} under DDP gives each of the 2 ranks "
                "the whole data set (101 samples)"), errors[name]
            assert "DistributedTrainer.create_dataloader(dataset, batch_size, shuffle=...)" in errors[name]
            assert "sampler=DistributedSampler(dataset)" in errors[name]
            assert "a sampler of your own" in errors[name]
        # a sampler of the user's own (each rank its 50 samples) is accepted: 5 steps of 10 a rank
        assert runs["ddp"][rank]["own_sampler_steps"] == [5]
