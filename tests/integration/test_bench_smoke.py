"""Smoke-sized runs of the benchmarks: they must keep working, whatever numbers they print."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("arguments", [
    ["bench/operator_scale.py", "--base-models", "2", "--adapters", "3"],
    ["bench/apply_to_ready.py", "--adapters", "2", "--replicas", "1"],
    ["bench/sidecar_scale.py", "--adapters", "5"],
], ids=["operator_scale", "apply_to_ready", "sidecar_scale"])
def test_benchmark_runs_at_smoke_size(arguments, tmp_path):
    result = subprocess.run([sys.executable, "-W", "ignore", *arguments, "--results", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = next(tmp_path.glob("*.md")).read_text()
    assert "|" in table and "s |" in table
