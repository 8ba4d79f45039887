"""The README's "EMA and SWA" section: its Python block runs as written (in a temporary folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def section_blocks(title: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end if end != -1 else None], flags=re.DOTALL)


def test_the_ema_and_swa_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = section_blocks("EMA and SWA")
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), scope)   # noqa: S102 - the README's own example
    ema, swa, trainer = scope["ema"], scope["swa"], scope["trainer"]
    assert ema.updates == 32 and int(swa.averaged_model.n_averaged) == 2     # type: ignore[attr-defined]
    assert list((tmp_path / "ckpt-ema").rglob("*.pt")), "the example's checkpoints"
    assert len(trainer.history["val_loss"]) == 4                            # type: ignore[attr-defined]
