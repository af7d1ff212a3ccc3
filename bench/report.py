"""What every benchmark shares: its --results argument, peak RSS and CPU time of a process, and what it
writes (a markdown table and a PNG plot into its results folder)."""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def add_results_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder for the table and plot (smoke runs in tests write elsewhere)")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set so far (VmHWM)."""
    return int(Path(f"/proc/{pid}/status").read_text().split("VmHWM:")[1].split()[0]) / 1024


def cpu_seconds(pid: int) -> float:
    """User and system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def table(headings: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    """Markdown table lines; `align` is one character per column, 'l' or 'r' (default: first l, rest r)."""
    align = align or "l" + "r" * (len(headings) - 1)
    rule = ["---:" if side == "r" else "---" for side in align]
    return [f"| {' | '.join(headings)} |", f"| {' | '.join(rule)} |", *(f"| {' | '.join(row)} |" for row in rows)]


def write(results: Path, name: str, lines: list[str], draw: Callable[[plt.Figure], None] | None = None,
          size: tuple[float, float] = (9, 4)) -> None:
    """bench/results/<name>.md, and <name>.png drawn by `draw` (linked from the markdown)."""
    results.mkdir(parents=True, exist_ok=True)
    if draw is not None:
        figure = plt.figure(figsize=size, layout="constrained")
        draw(figure)
        figure.savefig(results / f"{name}.png", dpi=110)
        plt.close(figure)
        lines = [*lines, "", f"![{name}]({name}.png)"]
    text = "\n".join(lines) + "\n"
    (results / f"{name}.md").write_text(text)
    print(text, flush=True)
