"""Real two-process DDP fits on CPU (gloo), run as a subprocess: one reads and fits, every rank writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_fit.py")


def run_ddp(tmp_path: Path, mode: str) -> list[dict]:
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), mode], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
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
