"""A real one-node Slurm cluster (tests/slurm_cluster.py, the ``slurm`` fixture) runs a batch job and its step.

What torchkeel does with Slurm's signals (save, requeue, the rerun resumes every tracker's run) is
tested in tests/faults/test_tracker_resume.py, on this cluster; what Slurm itself does (when a
``--signal`` comes, the requeue delay) is measured in tests/slurm_cluster.py's docstring.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from slurm_cluster import Slurm

pytestmark = pytest.mark.serial   # with test_tracker_resume.py's Slurm jobs: one cluster, in the serial part


def test_the_node_is_idle_and_a_job_s_output_comes_back(slurm: Slurm, tmp_path: Path) -> None:
    assert slurm.node_state() == "idle", slurm.diagnosis()
    script = tmp_path / "hello.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --output={tmp_path}/hello.out\n"
                      "echo batch on $SLURMD_NODENAME\nsrun bash -c 'echo step $SLURM_STEP_ID of $SLURM_JOB_ID'\n")
    job = slurm.sbatch(script)
    info = slurm.wait_state(job, "COMPLETED", timeout=30)
    assert info["ExitCode"] == "0:0" and info["NodeList"] == slurm.node
    assert (tmp_path / "hello.out").read_text().splitlines() == [f"batch on {slurm.node}", f"step 0 of {job}"]
