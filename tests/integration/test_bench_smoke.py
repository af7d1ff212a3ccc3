"""Smoke-sized runs of the benchmarks: they must keep working, whatever numbers they print."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# apply_to_ready and sidecar_scale start real vLLM (most of a minute on 2 cores).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.mark.parametrize("arguments", [
    ["bench/operator_scale.py", "--base-models", "2", "--adapters", "3"],
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


def table_rows(markdown: str) -> dict[str, str]:
    """The first table's rows: first column -> second."""
    rows = {}
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) >= 2 and not set(cells[1]) <= set("-: "):
            rows.setdefault(cells[0], cells[1])
    return rows


def test_placement_benchmark_table_adds_up(tmp_path):
    """2 base models x 2 replicas, 12 adapters on 1 replica each: every figure that is a count agrees with the rest."""
    result = subprocess.run([sys.executable, "-W", "ignore", "bench/placement_scale.py", "--adapters", "12",
                             "--replicas", "2", "--placement", "1", "--rest-seconds", "10", "--results",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    markdown = (tmp_path / "placement_scale.md").read_text()
    assert (tmp_path / "placement_scale.png").read_bytes().startswith(b"\x89PNG")
    rows = table_rows(markdown)
    assert rows["adapter replicas held in all (adapters x 1)"] == "12"
    assert rows["adapters per replica, min / mean / max (its runtime)"].split(" / ")[1] == "3"  # 12 on 4 replicas
    for client in ("operator", "sidecars"):
        assert rows[f"at rest, 10 s: requests / min (writes): {client}"].endswith("(0)")
    assert rows["API refusals in the sidecars' logs"] == "0"
    # Base model 0 holds 6 adapter replicas. Scaling up moves some onto the new slot, and the runtimes load exactly
    # what moved; scaling down moves at least every one the removed slot held.
    up = re.fullmatch(r"(\d+) of 6 \((\d+) onto the new slot; .*\)",
                      rows["scale 2→3: adapter replicas whose slot changed"])
    assert up is not None and 1 <= int(up[2]) <= int(up[1]) <= 6
    assert rows["scale 2→3: loads / unloads in the runtimes"] == f"{up[1]} / {up[1]}"
    down = re.fullmatch(r"(\d+) of 6 \((\d+) off the removed slot, which held (\d+)\)",
                        rows["scale 3→2: adapter replicas whose slot changed"])
    assert down is not None and int(down[2]) == int(down[3]) <= int(down[1])
    assert rows["scale 3→2: loads / unloads in the runtimes"].split(" / ")[0] == down[1]
