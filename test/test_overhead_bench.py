"""scripts/bench_ros's measurement runs end to end against the installed detector_node (a
tiny model, few rounds): the figures it prints are consistent with each other. Timing
targets are the benchmark's business, not this test's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from engine_fixtures import tiny_checkpoint


def test_overhead_bench_reports_rounds_and_the_nodes_inference_time(tmp_path: Path) -> None:
    model = tiny_checkpoint(tmp_path / "owl", "v1").path
    result = subprocess.run(
        [sys.executable, "-m", "clip_perception.ros.overhead_bench", "--model", str(model),
         "--rounds", "5", "--cameras", "1", "2", "--label", "smoke"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["label"] == "smoke" and report["rounds"] == 5
    for cameras in (1, 2):
        figures = report[f"cameras_{cameras}"]
        # Inference happens inside the rounds (no frame is sent between them).
        assert 0 < figures["inference_ms_per_round_in_node"] < figures["round_ms_mean"]
        assert figures["round_ms_p95"] >= figures["round_ms_median"] > 0
        assert figures["overhead_ms_per_frame"] * cameras == pytest.approx(
            figures["overhead_ms_median"], abs=0.02)
