"""Smoke-sized runs of the benchmarks: they must keep working, whatever numbers they print."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

# apply_to_ready and sidecar_scale start real vLLM (most of a minute on 2 cores).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.mark.parametrize("arguments", [
    ["bench/operator_scale.py", "--base-models", "2", "--adapters", "3", "5"],
    ["bench/apply_to_ready.py", "--adapters", "2", "--replicas", "1"],
    ["bench/sidecar_scale.py", "--adapters", "5"],
    ["bench/transfer.py", "--sizes-mb", "1", "3", "--runs", "1"],
    ["bench/validation.py", "--rank", "8", "--layers", "2", "--runs", "1"],
], ids=["operator_scale", "apply_to_ready", "sidecar_scale", "transfer", "validation"])
def test_benchmark_runs_at_smoke_size(arguments, tmp_path):
    result = subprocess.run([sys.executable, "-W", "ignore", *arguments, "--results", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    name = arguments[0].removeprefix("bench/").removesuffix(".py")
    table = (tmp_path / f"{name}.md").read_text()
    assert "---: |" in table
    assert f"![{name}]({name}.png)" in table
    assert (tmp_path / f"{name}.png").read_bytes().startswith(b"\x89PNG")
