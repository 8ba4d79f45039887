"""Every script in examples/ runs to the end in its quick mode and prints what docs/examples.md says.

One-process examples run as one process forked by the warm rank server (``launch.process``: no
torch import per test); the torchrun examples (``ddp.py``, ``fsdp.py``) on 2 ranks forked the same
way (``launch.ranks``: torchrun's worker environment), marked ``distributed``: the serial part of
``make test``. One launch each.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import launch
import pytest
from launch import child_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _run(name: str, tmp_path: Path, *args: object, nproc: int = 0) -> str:
    writes = name not in ("token_lm.py", "hf_text_classification.py")      # those two write no files
    argv = ["--quick", "--out", tmp_path / "out", *args] if writes else [*args, "--quick"]
    if nproc:
        proc = launch.ranks(EXAMPLES / name, *argv, env=child_env(), timeout=240, nproc=nproc)
    else:
        proc = launch.process(EXAMPLES / name, *argv, env=child_env(), timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_every_example_has_a_header_with_what_it_shows_its_command_and_its_time() -> None:
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == ["ddp.py", "digits_cnn.py", "fsdp.py", "hf_text_classification.py", "kill_resume.py",
                       "stream.py", "token_lm.py"]
    page = (ROOT / "docs" / "examples.md").read_text()
    for name in scripts:
        doc = (EXAMPLES / name).read_text().split('"""')[1]
        assert f"examples/{name}" in doc and "--quick" in doc, name
        assert re.search(r"~?\d+ (s|min) on a 2-core CPU", doc), f"{name}: no measured time in its header"
        assert f"examples/{name}" in page, f"docs/examples.md does not link {name}"


def test_token_lm_quick_reaches_a_perplexity_below_uniform(tmp_path: Path) -> None:
    out = _run("token_lm.py", tmp_path)
    found = re.search(r"validation perplexity: (\S+) \(uniform baseline: (\d+),", out)
    assert found, out
    perplexity, uniform = float(found[1]), int(found[2])
    assert math.isfinite(perplexity) and 1.0 < perplexity < uniform / 2, out


def test_digits_cnn_quick_learns_the_digits(tmp_path: Path) -> None:
    out = _run("digits_cnn.py", tmp_path)
    found = re.search(r"best checkpoint (\S+\.pt): val_acc (\S+) on 359 held-out images", out)
    assert found, out
    assert Path(found[1]).is_file() and float(found[2]) > 0.5, out   # 10 classes: chance is 0.1


def test_hf_text_classification_quick_trains_a_bert_from_a_config(tmp_path: Path) -> None:
    out = _run("hf_text_classification.py", tmp_path)
    found = re.search(r"val_loss (\S+)  val_acc (\S+)  \(chance: 0.5\)  predictions \(400, 2\)", out)
    assert found, out
    assert math.isfinite(float(found[1])) and 0.0 <= float(found[2]) <= 1.0, out


def test_stream_quick_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    out = _run("stream.py", tmp_path)
    assert "resumed == uninterrupted: True" in out, out


def test_kill_resume_quick_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    out = _run("kill_resume.py", tmp_path)
    assert "killed the run with SIGKILL after its first checkpoint (exit -9)" in out, out
    assert "killed and resumed == uninterrupted after 30 steps: True" in out, out


@pytest.mark.distributed
def test_ddp_quick_on_two_ranks_keeps_the_weights_equal(tmp_path: Path) -> None:
    out = _run("ddp.py", tmp_path, nproc=2)
    assert re.search(r"world size 2: val_acc \S+, weights equal on every rank: True", out), out
    found = re.search(r"best checkpoint (\S+\.pt)", out)
    assert found and Path(found[1]).is_file(), out


@pytest.mark.distributed
def test_fsdp_quick_writes_sharded_async_checkpoints_and_exports_safetensors(tmp_path: Path) -> None:
    out = _run("fsdp.py", tmp_path, nproc=2)
    found = re.search(r"world size 2, sharded: True; best (\S+) -> (\S+model\.safetensors) \((\d+) parameters\)", out)
    assert found, out
    assert Path(found[1]).is_dir() and (Path(found[1]) / "manifest.json").is_file(), out
    assert Path(found[2]).is_file() and int(found[3]) > 0, out
