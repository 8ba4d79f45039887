"""README's "Hyper-parameter search (Optuna)" example runs as written, in one process, in a fresh folder.

The same objective on 2 ranks under torchrun is tests/distributed/test_optuna_ranks.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_study_runs_and_records_its_trials(tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna", reason="needs optuna: pip install 'torchkeel[optuna]'")
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Hyper-parameter search (Optuna)\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    (tmp_path / "hpo.py").write_text(code)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "hpo.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    trials = optuna.load_study(study_name="demo", storage=f"sqlite:///{tmp_path / 'hpo.db'}").trials
    states = [t.state.name for t in trials]
    assert len(trials) == 6 and set(states) <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states
    assert str(states) in proc.stdout.splitlines()[-1]
