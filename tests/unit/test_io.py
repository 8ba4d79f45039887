"""torchkeel.checkpoint.io: atomic write, manifest, verified load. Real files; failures are injected."""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from torchkeel.checkpoint import discovery
from torchkeel.checkpoint import io as tkio

SRC = Path(__file__).resolve().parents[2] / "src"


def state(step: int = 0, n: int = 1000) -> dict[str, Any]:
    """A weights_only-loadable state: tensors, containers, numbers, strings."""
    return {"format": 1,
            "model": {"w": torch.arange(n, dtype=torch.float32) + step, "b": torch.zeros(3)},
            "optimizer": {"state": {0: {"step": torch.tensor(float(step))}},
                          "param_groups": [{"lr": 0.1}]},
            "state": {"epoch": 0, "step": step}, "name": "tiny"}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return torch.equal(a["model"]["w"], b["model"]["w"]) and a["state"] == b["state"]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def run_child(code: str, env: dict[str, str] | None = None) -> Any:
    """Run ``code`` in a fresh interpreter; it prints one JSON line as its last output."""
    full_env = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Evil:
    """Pickles to ``open(marker, "w")``: loading it with a full unpickler creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


class Interrupt:
    def __reduce__(self) -> tuple[Any, ...]:
        raise KeyboardInterrupt


# ------------------------------------------------------------------------------- round trip
def test_round_trip_and_manifest(tmp_path: Path) -> None:
    path = tkio.save(state(3), tmp_path / "epoch=0-step=3.pt", meta={"step": 3, "epoch": 0})
    assert path == tmp_path / "epoch=0-step=3.pt"
    assert same(tkio.load(path), state(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, f"{path.name}.manifest.json"]
    manifest = json.loads((tmp_path / "epoch=0-step=3.pt.manifest.json").read_text())
    data = path.read_bytes()
    assert manifest["format"] == 2 and manifest["file"] == path.name
    step = manifest["chunk_bytes"]
    chunks = [hashlib.sha256(data[i:i + step]).hexdigest() for i in range(0, len(data), step)]
    assert manifest["size"] == len(data) and manifest["chunks"] == chunks
    assert manifest["sha256"] == hashlib.sha256("".join(chunks).encode()).hexdigest()
    assert manifest["torch"] == torch.__version__ and isinstance(manifest["torchkeel"], str)
    assert manifest["meta"] == {"step": 3, "epoch": 0} and manifest["previous"] is None
    assert isinstance(manifest["created"], float)
    assert tkio.verify(path)["meta"]["step"] == 3 and discovery.is_checkpoint(path)
    # the payload is a normal torch.save file
    assert same(torch.load(path, weights_only=True, map_location="cpu"), state(3))


def test_overwrite_same_name(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    tkio.save(state(1), path, meta={"step": 1})
    tkio.save(state(2), path, meta={"step": 2})
    assert same(tkio.load(path), state(2)) and tkio.verify(path)["meta"] == {"step": 2}
    assert json.loads((tmp_path / "last.pt.manifest.json").read_text())["previous"] is None
    assert leftovers(tmp_path) == []


def test_save_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"obj must be a dict"):
        tkio.save([torch.zeros(1)], tmp_path / "a.pt")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"meta must be JSON-serializable"):
        tkio.save({}, tmp_path / "a.pt", meta={"t": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"may not start with '\.'"):
        tkio.save({}, tmp_path / ".a.pt")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ corruption
def flip_inside_tensor(path: Path) -> None:
    """Flip one bit inside the ``model.w`` tensor's bytes, leaving the zip structure intact."""
    data = bytearray(path.read_bytes())
    at = data.find(state(0)["model"]["w"][100:116].numpy().tobytes())
    assert at > 0
    data[at + 3] ^= 0x10
    path.write_bytes(bytes(data))


def zero_range(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3: len(data) // 3 + 4096] = bytes(4096)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("corrupt", "reason"), [
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "size mismatch"),
    (lambda p: p.write_bytes(p.read_bytes() + b"\0"), "size mismatch"),
    (zero_range, "sha256 mismatch"),
    (flip_inside_tensor, "sha256 mismatch"),
], ids=["truncated", "extended", "zeroed", "bit-flip"])
def test_corruption_detected(tmp_path: Path, corrupt: Any, reason: str) -> None:
    path = tkio.save(state(0), tmp_path / "a.pt", meta={"step": 0})
    corrupt(path)
    assert not discovery.is_checkpoint(path)
    for fn in (tkio.verify, tkio.load):
        with pytest.raises(tkio.CheckpointError, match=rf"a\.pt.*{reason}"):
            fn(path)


def test_bit_flip_passes_plain_torch_load_but_not_ours(tmp_path: Path) -> None:
    path = tkio.save(state(0), tmp_path / "a.pt")
    flip_inside_tensor(path)
    silently_wrong = torch.load(path, weights_only=True)  # no checksum: torch accepts it
    assert not torch.equal(silently_wrong["model"]["w"], state(0)["model"]["w"])
    with pytest.raises(tkio.CheckpointError, match=r"'.*a\.pt'.*sha256 mismatch \(file corrupt\)"):
        tkio.load(path)


def test_many_chunks_hashed_in_parallel_and_the_bad_one_named(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tkio, "CHUNK_BYTES", 1024)  # the 4 kB tensor spans several chunks
    path = tkio.save(state(5), tmp_path / "a.pt")
    manifest = json.loads((tmp_path / "a.pt.manifest.json").read_text())
    assert manifest["chunk_bytes"] == 1024 and len(manifest["chunks"]) == -(-manifest["size"] // 1024)
    assert same(tkio.load(path), state(5))
    data = bytearray(path.read_bytes())
    data[2500] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(tkio.CheckpointError, match=r"sha256 mismatch.*Bytes 2048-3071 differ"):
        tkio.load(path)


def test_format_1_manifest_still_verifies(tmp_path: Path) -> None:
    """Format 1 (one sha256 of the whole payload) is what torchkeel wrote before chunking."""
    path = tkio.save(state(2), tmp_path / "a.pt", meta={"step": 2})
    manifest = tmp_path / "a.pt.manifest.json"
    entry = json.loads(manifest.read_text())
    for key in ("chunk_bytes", "chunks"):
        del entry[key]
    data = path.read_bytes()
    manifest.write_text(json.dumps(entry | {"format": 1, "sha256": hashlib.sha256(data).hexdigest()}))
    assert same(tkio.load(path), state(2)) and tkio.verify(path)["meta"] == {"step": 2}
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(tkio.CheckpointError, match=r"sha256 mismatch"):
        tkio.load(path)


def test_loaded_tensors_are_in_memory_not_mapped(tmp_path: Path) -> None:
    """load maps the file to read it fast, but copies out: no mapping outlives the call, shared
    storages stay shared, and deleting the file afterwards frees it."""
    w = torch.arange(4096, dtype=torch.float32)
    path = tkio.save({"model": {"w": w, "tied": w, "view": w[10:20]}}, tmp_path / "a.pt")
    got = tkio.load(path)["model"]
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    assert str(path) not in maps
    assert got["tied"].data_ptr() == got["w"].data_ptr()
    assert got["view"].untyped_storage().data_ptr() == got["w"].untyped_storage().data_ptr()
    got["w"][15] = -1.0  # writable, and the view sees it as after a plain torch.load
    assert got["view"][5] == -1.0 and torch.equal(got["tied"], got["w"])
    path.unlink()
    assert float(got["w"].sum()) == float(w.sum()) - 15 - 1


def test_load_reads_each_storage_at_its_place_in_the_file_and_equals_torch_load(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy out of the mapping reads each storage from the file at its zip record (preadv); a
    state whose records cannot be matched to its storages is copied from the mapping instead. Both
    give what torch.load gives: every dtype, empty and shared storages, strided views."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 700, generator=g)
    obj = {"big": big, "t": big.t(), "row": big[7], "half": torch.randn(33, generator=g).to(torch.bfloat16),
           "ints": torch.arange(1000, dtype=torch.int64), "mask": torch.rand(17, generator=g) > 0.5,
           "empty": torch.zeros(0, 5), "step": torch.tensor(3.0), "nested": [{"x": torch.ones(2, 2)}, 4, "s"]}
    path = tkio.save(obj, tmp_path / "a.pt")
    reads: list[int] = []
    real = os.preadv

    def counting(fd: int, buffers: Any, offset: int) -> int:
        reads.append(offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counting)
    expected = torch.load(path, weights_only=True)
    def equal(a: Any, b: Any) -> bool:
        if isinstance(a, torch.Tensor):
            return a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
        return bool(a == b)

    for found in (True, False):       # the records found, then none found: copied from the mapping
        if not found:
            monkeypatch.setattr(tkio, "_record_offsets", lambda f: [])
        reads.clear()
        got = tkio.load(path)
        assert equal(got, expected)
        assert got["t"].untyped_storage().data_ptr() == got["big"].untyped_storage().data_ptr()
        assert got["row"].untyped_storage().data_ptr() == got["big"].untyped_storage().data_ptr()
        assert bool(reads) == found, reads     # the storages with bytes: read where they lie
        assert str(path) not in (Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else "")


def test_missing_or_invalid_manifest(tmp_path: Path) -> None:
    path = tkio.save(state(0), tmp_path / "a.pt")
    manifest = tmp_path / "a.pt.manifest.json"
    text = manifest.read_text()
    manifest.unlink()
    assert not discovery.is_checkpoint(path)
    with pytest.raises(tkio.CheckpointError, match=r"no manifest"):
        tkio.load(path)
    manifest.write_text("{not json")
    with pytest.raises(tkio.CheckpointError, match=r"unreadable manifest"):
        tkio.verify(path)
    manifest.write_text(json.dumps(json.loads(text) | {"format": 3}))
    with pytest.raises(tkio.CheckpointError, match=r"unknown manifest format 3"):
        tkio.verify(path)
    manifest.write_text(text)
    path.unlink()
    with pytest.raises(tkio.CheckpointError, match=r"payload missing"):
        tkio.verify(path)



def test_an_empty_path_says_best_model_path_is_empty_and_to_load_the_last(tmp_path: Path) -> None:
    """README: ``load_checkpoint(checkpoint.best_model_path)``; it is "" when nothing was ranked."""
    from conftest import make_dataset, make_model
    from torch import nn
    from torch.utils.data import DataLoader

    from torchkeel import AdvancedTrainer, Callback, ModelCheckpoint, load_checkpoint

    class NanScore(Callback):             # runs before ModelCheckpoint: a NaN is never ranked
        def on_epoch_end(self, trainer: AdvancedTrainer) -> None:
            trainer.state.metrics["val_loss"] = float("nan")

    model, data = make_model(), make_dataset()
    ckpt = ModelCheckpoint(save_dir=tmp_path, monitor="val_loss")
    AdvancedTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                    criterion=nn.MSELoss(), checkpoint=ckpt, callbacks=[NanScore()], progress=False,
                    device="cpu").fit(DataLoader(data, batch_size=8), DataLoader(data, batch_size=32), epochs=1)
    assert ckpt.best_model_path == "" and ckpt.no_best_reason and ckpt.last_model_path
    said = (r"load_checkpoint\(path=''\): no path was given\. ModelCheckpoint\.best_model_path is '' when no "
            r"checkpoint was ranked \(ModelCheckpoint\.no_best_reason says why\); load "
            r"ModelCheckpoint\.last_model_path instead\.")
    for load in (load_checkpoint, tkio.load, lambda p: tkio.load_verified(p)[0]):
        with pytest.raises(tkio.CheckpointError, match=said) as got:
            load(ckpt.best_model_path)
        assert got.value.path is None and got.value.reason == "no path given"
    assert torch.equal(load_checkpoint(ckpt.last_model_path)["model"]["fc1.weight"], model.fc1.weight)

# ------------------------------------------------------------------------------- discovery
def test_find_latest_skips_corrupt_and_incomplete(tmp_path: Path) -> None:
    run = tmp_path / "version_0"
    for step in (1, 2, 3):
        tkio.save(state(step), run / f"epoch=0-step={step}.pt", meta={"step": step})
    flip_inside_tensor(run / "epoch=0-step=3.pt")
    torch.save(state(4), run / "epoch=0-step=4.pt")  # a payload with no manifest
    (run / ".epoch=0-step=5.pt.tmp-0123abcd").write_bytes(b"half a checkpoint")
    (run / ".epoch=0-step=5.pt.manifest.json.tmp-0123abcd").write_text("{}")
    path, skipped = discovery.find_latest(tmp_path)
    assert path == run / "epoch=0-step=2.pt"
    no_manifest = "no manifest (incomplete write or not a torchkeel checkpoint)"
    assert skipped == [f"{run / 'epoch=0-step=4.pt'}: {no_manifest}",
                       f"{run / 'epoch=0-step=3.pt'}: sha256 mismatch (file corrupt)"]
    assert discovery.find_latest(tmp_path, recursive=False) == (None, [])
    assert discovery.find_latest([tmp_path / "missing", run])[0] == path
    assert [e["meta"]["step"] for _, e in discovery.list_checkpoints(run)] == [2, 1]
    assert discovery.find_latest(tmp_path / "missing") == (None, [])


def write(path: Path, step: int, created: float | None = None) -> Path:
    tkio.save({"format": 1, "w": torch.tensor([float(step)])}, path, meta={"step": step})
    if created is not None:                 # as if the clock had said ``created`` then
        manifest = path.with_name(path.name + tkio.MANIFEST_SUFFIX)
        entry = json.loads(manifest.read_text())
        manifest.write_text(json.dumps(entry | {"created": created}))
    return path


def test_discovery_goes_by_step_not_by_a_clock_set_an_hour_ahead(tmp_path: Path) -> None:
    run = tmp_path / "version_0"
    ahead = time.time() + 3600
    for step in (2, 4):
        write(run / f"epoch=0-step={step}.pt", step, created=ahead)
    for step in (6, 8):
        write(run / f"epoch=0-step={step}.pt", step)
    assert discovery.find_latest(tmp_path) == (run / "epoch=0-step=8.pt", [])
    assert [e["meta"]["step"] for _, e in discovery.list_checkpoints(run)] == [8, 6, 4, 2]


def test_the_newer_run_wins_over_more_steps_and_the_clock_only_breaks_ties(tmp_path: Path) -> None:
    now = time.time()
    write(tmp_path / "version_0" / "checkpoints" / "step=100.pt", 100, created=now + 3600)
    newest = write(tmp_path / "version_1" / "checkpoints" / "step=2.pt", 2, created=now - 3600)
    assert discovery.find_latest(tmp_path)[0] == newest
    a = write(tmp_path / "version_1" / "checkpoints" / "a-step=2.pt", 2, created=now)
    assert discovery.find_latest(tmp_path)[0] == a
    no_manifest = tmp_path / "version_1" / "checkpoints" / "step=1.pt"
    torch.save({"w": torch.zeros(1)}, no_manifest)
    os.utime(no_manifest, (now + 7200, now + 7200))   # the newest mtime, the least progress
    assert discovery.find_latest(tmp_path) == (a, [])


def test_discovery_refuses_a_symlink_that_leads_out_of_the_checkpoint_root(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "ckpt", tmp_path / "elsewhere"
    real = write(root / "version_0" / "step=2.pt", 2)
    outside = write(elsewhere / "step=9.pt", 9)
    link = root / "version_0" / "step=9.pt"
    for name in (outside.name, outside.name + tkio.MANIFEST_SUFFIX):
        (link.parent / name).symlink_to(elsewhere / name)
    path, skipped = discovery.find_latest(root)
    assert path == real
    assert len(skipped) == 1 and str(link) in skipped[0] and str(outside.resolve()) in skipped[0] \
        and "outside" in skipped[0], skipped
    inside = root / "version_0" / "step=3.pt"         # a link that stays inside the root is fine
    write(root / "version_0" / "real-step=3.pt", 3)
    inside.symlink_to(root / "version_0" / "real-step=3.pt")
    (root / "version_0" / (inside.name + tkio.MANIFEST_SUFFIX)).symlink_to(
        root / "version_0" / ("real-step=3.pt" + tkio.MANIFEST_SUFFIX))
    assert discovery.find_latest(root)[0] in (inside, root / "version_0" / "real-step=3.pt")


def test_clean_temporaries_touches_only_ours(tmp_path: Path) -> None:
    ours = [tmp_path / ".a.pt.tmp-0123abcd", tmp_path / ".a.pt.manifest.json.tmp-ff00ff00",
            tmp_path / ".last.json.tmp-k2_x9abc"]  # the last: tempfile.mkstemp's alphabet
    for p in ours:
        p.write_bytes(b"x")
    outside = tmp_path.parent / f"{tmp_path.name}-target"
    outside.write_bytes(b"keep me")
    (tmp_path / ".b.pt.tmp-deadbeef").symlink_to(outside)
    others = ["a.pt.tmp-0123abcd", ".hidden", ".a.pt.tmp-", "notes.txt", ".tmp-0123abcd"]
    for name in others:
        (tmp_path / name).write_bytes(b"y")
    assert sorted(tkio.clean_temporaries(tmp_path)) == sorted(ours)
    assert outside.read_bytes() == b"keep me" and (tmp_path / ".b.pt.tmp-deadbeef").is_symlink()
    assert all((tmp_path / name).exists() for name in others)


def test_remove(tmp_path: Path) -> None:
    a = tkio.save(state(0), tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"not in that folder"):
        tkio.remove(a, folder=tmp_path / "elsewhere")
    tkio.remove(a, folder=tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match=r"no payload and no manifest"):
        tkio.remove(a)
    tkio.remove(a, missing_ok=True)
    target = tkio.save(state(0), tmp_path / "real.pt")
    tkio.save(state(0), tmp_path / "b.pt")
    (tmp_path / "b.pt").unlink()
    (tmp_path / "b.pt").symlink_to(target)  # b.pt's payload now points at another checkpoint
    with pytest.raises(ValueError, match=r"symlink"):
        tkio.remove(tmp_path / "b.pt")
    assert (tmp_path / "b.pt.manifest.json").exists() and discovery.is_checkpoint(target)


def test_write_text_atomic(tmp_path: Path) -> None:
    path = tkio.write_text_atomic(tmp_path / "last.json", '{"last": "a.pt"}')
    tkio.write_text_atomic(path, '{"last": "b.pt"}')
    assert json.loads(path.read_text()) == {"last": "b.pt"} and leftovers(tmp_path) == []


# ------------------------------------------------------------------------ failed writes
def test_crash_between_renames_keeps_old_checkpoint(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = tkio.save(state(1), tmp_path / "last.pt", meta={"step": 1})
    real_replace = os.replace

    def replace_fails_for_payload(src: Any, dst: Any) -> None:
        if ".manifest.json" not in str(src):
            raise OSError(5, "injected I/O error on the payload rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_fails_for_payload)
    for step in (2, 3):  # twice: the second save must keep pointing "previous" at step 1's payload
        with pytest.raises(tkio.CheckpointWriteError, match=r"last\.pt.*injected I/O error"):
            tkio.save(state(step), path, meta={"step": step})
        manifest = json.loads((tmp_path / "last.pt.manifest.json").read_text())
        assert manifest["meta"] == {"step": step} and manifest["previous"]["meta"] == {"step": 1}
        assert same(tkio.load(path), state(1)) and tkio.verify(path)["meta"] == {"step": 1}
        assert leftovers(tmp_path) == []
    monkeypatch.undo()
    tkio.save(state(4), path, meta={"step": 4})
    assert same(tkio.load(path), state(4)) and tkio.verify(path)["meta"] == {"step": 4}
    assert json.loads((tmp_path / "last.pt.manifest.json").read_text())["previous"] is None


def test_unpicklable_state_leaves_earlier_files(tmp_path: Path) -> None:
    a = tkio.save(state(1), tmp_path / "a.pt", meta={"step": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for target in (tmp_path / "b.pt", a):
        with pytest.raises(tkio.CheckpointWriteError, match=rf"{target.name}.*could not write"):
            tkio.save({"fn": lambda: 0}, target)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert same(tkio.load(a), state(1))


def test_keyboard_interrupt_cleans_up_and_propagates(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        tkio.save({"x": Interrupt()}, tmp_path / "a.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_disk_full_leaves_earlier_checkpoint(tmp_path: Path) -> None:
    a = tkio.save(state(1), tmp_path / "a.pt", meta={"step": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    out = run_child(f"""
        import json, resource, signal, torch
        from torchkeel.checkpoint import io as tkio
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # write() fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        big = {{"w": torch.zeros(1 << 20)}}                  # 4 MB > the 1 MB limit
        errors = []
        for name in ("b.pt", "a.pt"):
            try:
                tkio.save(big, {str(tmp_path)!r} + "/" + name)
                errors.append(None)
            except tkio.CheckpointWriteError as exc:
                errors.append(str(exc))
        print(json.dumps(errors))
    """)
    assert len(out) == 2 and all(e is not None and "File too large" in e for e in out), out
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert same(tkio.load(a), state(1))


# --------------------------------------------------------------------------------- safety
def test_malicious_pickle_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tkio.save({"x": Evil(marker)}, tmp_path / "evil.pt")  # valid manifest: the hash matches
    with pytest.raises(tkio.CheckpointError, match=r"evil\.pt.*refused by torch\.load\(weights"):
        tkio.load(path)
    assert not marker.exists()


@pytest.mark.slow
def test_malicious_pickle_refused_with_force_no_weights_only(tmp_path: Path) -> None:
    """torch reads TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD at each call; a child has it from the start."""
    marker, control = tmp_path / "pwned", tmp_path / "control"
    tkio.save({"x": Evil(marker)}, tmp_path / "evil.pt")
    torch.save({"x": Evil(control)}, tmp_path / "control.pt")
    out = run_child(f"""
        import json, os, torch
        from torchkeel.checkpoint import io as tkio
        try:
            tkio.load({str(tmp_path / "evil.pt")!r})
            refused = False
        except tkio.CheckpointError:
            refused = True
        torch.load({str(tmp_path / "control.pt")!r})  # weights_only unset: the variable wins
        env = os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
        print(json.dumps({{"refused": refused, "env": env}}))
    """, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert out == {"refused": True, "env": "1"}
    assert control.exists(), "control: the variable had no effect, so this test proves nothing"
    assert not marker.exists()


def test_package_loads_only_with_weights_only() -> None:
    """Every torch.load in src/torchkeel passes weights_only=True; nothing calls pickle.load(s)."""
    problems = []
    for file in sorted((SRC / "torchkeel").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            where = f"{file.relative_to(SRC)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                if node.func.attr == "load" and owner in ("torch", "torch.serialization"):
                    kw = {k.arg: k.value for k in node.keywords}
                    flag = kw.get("weights_only")
                    if not (isinstance(flag, ast.Constant) and flag.value is True):
                        problems.append(f"{where}: {ast.unparse(node)} lacks weights_only=True")
                unpickles = node.func.attr in ("load", "loads", "Unpickler")
                if unpickles and owner in ("pickle", "cPickle", "dill"):
                    problems.append(f"{where}: {ast.unparse(node)}")
            if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill"):
                problems += [f"{where}: from {node.module} import {a.name}" for a in node.names
                             if a.name in ("load", "loads", "Unpickler")]
    assert problems == []


# ------------------------------------------------------------------------ the quick hash
def test_a_new_manifest_names_its_quick_hash_and_loads_verify_with_it(tmp_path: Path) -> None:
    import xxhash

    path = tkio.save(state(4), tmp_path / "a.pt", meta={"step": 4})
    manifest = tmp_path / "a.pt.manifest.json"
    entry = json.loads(manifest.read_text())
    data, step = path.read_bytes(), entry["chunk_bytes"]
    assert entry["format"] == 2 and entry["quick"] == {
        "hash": "xxh3_128", "chunks": [xxhash.xxh3_128_hexdigest(data[i:i + step]) for i in range(0, len(data), step)]}
    # the quick hash is what a load checks: with the sha256 chunks made wrong, it still loads
    manifest.write_text(json.dumps(entry | {"chunks": ["0" * 64] * len(entry["chunks"])}))
    assert same(tkio.load(path), state(4))


def test_a_quick_hash_that_disagrees_or_is_unknown_leaves_sha256_to_decide(tmp_path: Path) -> None:
    path = tkio.save(state(5), tmp_path / "a.pt", meta={"step": 5})
    manifest = tmp_path / "a.pt.manifest.json"
    entry = json.loads(manifest.read_text())
    wrong = {"hash": "xxh3_128", "chunks": ["0" * 32] * len(entry["chunks"])}
    for quick in (wrong, {"hash": "md4", "chunks": entry["quick"]["chunks"]}, None):
        manifest.write_text(json.dumps(entry | {"quick": quick}))
        assert same(tkio.load(path), state(5)) and tkio.verify(path)["meta"] == {"step": 5}
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    manifest.write_text(json.dumps(entry))
    with pytest.raises(tkio.CheckpointError, match=r"sha256 mismatch \(file corrupt\).*Bytes \d+-\d+ differ"):
        tkio.load(path)


def test_a_quick_hashed_load_reads_each_byte_once_hashing_it_on_the_way_and_equals_torch_load(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No separate hash pass: each chunk is read into the storages it covers (and the bytes between
    records into a buffer), hashed as it is read; records straddle chunks. A flipped byte is then
    caught, and the sha256 chunks name it."""
    monkeypatch.setattr(tkio, "CHUNK_BYTES", 100_000)     # many chunks, records across their edges
    g = torch.Generator().manual_seed(1)
    obj = {"a": torch.randn(300, 500, generator=g), "b": torch.arange(77_777, dtype=torch.int16),
           "tied": None, "small": [torch.tensor(2.0), torch.zeros(0)], "n": 3}
    obj["tied"] = obj["a"]
    path = tkio.save(obj, tmp_path / "a.pt")
    size = path.stat().st_size
    assert json.loads(tkio.manifest_of(path).read_text())["chunk_bytes"] == 100_000 and size > 7 * 100_000
    read: list[tuple[int, int]] = []
    real_preadv, real_pread, real_digests = os.preadv, os.pread, tkio._digests

    def preadv(fd: int, buffers: Any, offset: int) -> int:
        n = real_preadv(fd, buffers, offset)
        read.append((offset, n))
        return n

    def pread(fd: int, n: int, offset: int) -> bytes:
        data = real_pread(fd, n, offset)
        read.append((offset, len(data)))
        return data

    def no_second_pass(*args: Any) -> Any:
        raise AssertionError("the payload was hashed in a pass of its own")

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(tkio, "_digests", no_second_pass)
    got = tkio.load(path)
    expected = torch.load(path, weights_only=True)
    assert torch.equal(got["a"], expected["a"]) and torch.equal(got["b"], expected["b"]) and got["n"] == 3
    assert got["tied"].data_ptr() == got["a"].data_ptr() and torch.equal(got["small"][0], torch.tensor(2.0))
    covered = sorted(read)
    assert covered[0][0] == 0 and all(a + n == b for (a, n), (b, _) in itertools.pairwise(covered))
    assert covered[-1][0] + covered[-1][1] == size            # every byte, once
    monkeypatch.setattr(tkio, "_digests", real_digests)
    data = bytearray(path.read_bytes())
    data[size // 2] ^= 0x10                                   # inside the first tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(tkio.CheckpointError, match=r"sha256 mismatch \(file corrupt\).*Bytes \d+-\d+ differ"):
        tkio.load(path)
