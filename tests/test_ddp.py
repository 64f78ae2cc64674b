"""Real two-process DDP fits on CPU (gloo), run as a subprocess: one reads and fits, every rank writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).with_name("ddp_fit.py")


def run_script(tmp_path: Path, mode: str, timeout: float = 240) -> None:
    """Run the script in a session of its own; on a hang, kill every process of it and fail."""
    process = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), mode], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"the {mode} DDP run hung for {timeout} s")
    assert process.returncode == 0, stderr[-3000:]


def run_ddp(tmp_path: Path, mode: str) -> list[dict]:
    run_script(tmp_path, mode)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_ddp_fit_writes_identical_anchors_on_every_rank(tmp_path: Path) -> None:
    rank0, rank1 = run_ddp(tmp_path, "ok")
    assert rank0["error"] is None and rank1["error"] is None
    assert rank0["anchors"] == rank1["anchors"]
    assert rank0["anchors"][0][0] != [10.0, 13.0], "anchors were replaced"
    assert (rank0["box_reads"], rank1["box_reads"]) == (1, 0), "only rank 0 reads the dataset"
    assert (tmp_path / "autoanchor.yaml").exists()


@pytest.mark.slow
def test_a_failure_on_rank_0_reaches_every_rank(tmp_path: Path) -> None:
    rank0, rank1 = run_ddp(tmp_path, "no-boxes")
    assert rank0["error"] == rank1["error"]
    assert rank0["error"].startswith("AnchorFitError: no training boxes")
    assert rank0["anchors"] == rank1["anchors"]
    assert rank0["anchors"][0][0] == pytest.approx([10.0, 13.0]), "anchors left as they were"


@pytest.mark.slow
def test_defaults_with_a_logger_do_not_hang(tmp_path: Path) -> None:
    """No save_dir: the log folder comes from trainer.log_dir, a collective call every rank must make."""
    rank0, rank1 = run_ddp(tmp_path, "defaults")
    assert rank0["error"] is None and rank1["error"] is None
    assert rank0["anchors"] == rank1["anchors"] and rank0["anchors"][0][0] != [10.0, 13.0]
    assert (tmp_path / "lightning_logs" / "version_0" / "autoanchor.yaml").exists()


@pytest.mark.slow
def test_ddp_spawn_tells_the_starting_process(tmp_path: Path) -> None:
    run_script(tmp_path, "spawn")
    main = json.loads((tmp_path / "main.json").read_text())
    assert main["error"] is None and main["replaced"] is True
    np.testing.assert_allclose(main["after"], main["anchors"], rtol=1e-5, err_msg="the model's anchors came back too")
