"""The checkpoint store seam: a file and a directory of shards pass one protocol test, and so does
each wrapped in ``AsyncStore``; ``torchkeel.checkpoint`` has no import cycle and no lazy import."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from torchkeel.checkpoint import discovery
from torchkeel.checkpoint.io import CheckpointError, CheckpointWriteError
from torchkeel.checkpoint.store import FILE, SHARDED, AsyncStore, Store, for_path, load_checkpoint

SRC = Path(__file__).resolve().parents[2] / "src" / "torchkeel"
MEMBERS = ("collective", "sharded", "suffix", "write", "verify", "load", "remove", "scan", "clean_temporaries")


@pytest.fixture(params=["file", "sharded", "async file", "async sharded"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    inner = SHARDED if request.param.endswith("sharded") else FILE
    if not request.param.startswith("async"):
        yield inner
        return
    wrapped = AsyncStore(inner)
    try:
        yield wrapped
    finally:
        wrapped.close()


def _state(step: int) -> dict[str, Any]:
    return {"format": 1, "model": {"w": torch.arange(6.0) + step, "b": torch.ones(2)}, "step": step}


def _written(store: Store, state: dict[str, Any], path: Path, meta: dict[str, Any], **kw: Any) -> Path:
    out = store.write(state, path, meta, **kw)
    if isinstance(store, AsyncStore):
        store.settle("the test's save")
    return out


def test_a_store_is_every_member_of_the_protocol(store: Store) -> None:
    assert all(hasattr(store, name) for name in MEMBERS)
    assert store.suffix == ("" if store.sharded else ".pt") and store.collective == store.sharded


def test_write_list_verify_load_clean_remove(store: Store, tmp_path: Path) -> None:
    path, then = tmp_path / f"step-3{store.suffix}", []
    assert _written(store, _state(3), path, {"step": 3}, then=lambda: then.append("last.json")) == path
    assert then == ["last.json"]                              # after the commit, once
    assert [(c.path, c.step, c.reason) for c in store.scan(tmp_path)] == [(path, 3, "")]
    assert store.verify(path)["meta"] == {"step": 3}
    loaded = store.load(path)
    assert torch.equal(loaded["model"]["w"], _state(3)["model"]["w"]) and loaded["step"] == 3
    assert for_path(path).sharded == store.sharded and load_checkpoint(path)["step"] == 3
    assert discovery.list_checkpoints(tmp_path)[0][0] == path and discovery.find_latest(tmp_path) == (path, [])

    unfinished = tmp_path / f".step-4{store.suffix}.tmp-1a2b3c4d"   # a killed write of this store's kind
    if store.sharded:
        unfinished.mkdir()
        (unfinished / "__0_0.distcp").write_bytes(b"partial")
    else:
        unfinished.write_bytes(b"partial")
    assert store.clean_temporaries(tmp_path) == [unfinished] and not unfinished.exists()

    store.remove(path, folder=tmp_path)
    assert store.scan(tmp_path) == [] and sorted(os.listdir(tmp_path)) == []
    store.remove(path, missing_ok=True)                       # already gone: fine


def test_a_corrupt_checkpoint_is_listed_but_does_not_verify(store: Store, tmp_path: Path) -> None:
    path = _written(store, _state(1), tmp_path / f"step-1{store.suffix}", {"step": 1})
    victim = max((p for p in path.iterdir() if p.name != "manifest.json"), key=lambda p: p.stat().st_size) \
        if store.sharded else path
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    assert [c.path for c in store.scan(tmp_path)] == [path]        # the manifest claims it: not hashed yet
    with pytest.raises(CheckpointError, match=r"sha256 mismatch"):
        store.verify(path)
    assert discovery.find_latest(tmp_path)[0] is None


def test_a_failed_write_raises_and_leaves_no_temporary(store: Store, tmp_path: Path) -> None:
    (tmp_path / "not-a-folder").write_text("a file")
    path = tmp_path / "not-a-folder" / f"step-1{store.suffix}"
    with pytest.raises(CheckpointWriteError, match=r"(?s)step-1.*(File exists|Not a directory)"):
        _written(store, _state(1), path, {"step": 1})
    assert sorted(os.listdir(tmp_path)) == ["not-a-folder"]


def test_async_write_returns_before_the_write_and_settle_waits(tmp_path: Path) -> None:
    store = AsyncStore(FILE)
    try:
        state = {"model": {"w": torch.zeros(4)}}
        store.write(state, tmp_path / "a.pt", {"step": 1}, after=lambda: (tmp_path / "after").write_text("done"))
        state["model"]["w"].add_(1)                            # the snapshot was taken: this is not saved
        store.settle("the test's save")
        assert (tmp_path / "after").read_text() == "done"
        assert torch.equal(store.load(tmp_path / "a.pt")["model"]["w"], torch.zeros(4))
    finally:
        store.close()
