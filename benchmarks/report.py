"""Figures: how each is printed as a line and gathered into a markdown table."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

NAMES = (
    "pickup latency",
    "orchestration overhead",
    "vault scan",
    "checkpoint cost",
    "idle CPU",
    "memory",
    "throughput",
    "CLI latency",
    "metrics vs history",
    "remote stage overhead",
    "remote throughput",
    "sandbox overhead",
)
"""Every figure's name, in SPEC §12 order (figure N is ``NAMES[N - 1]``)."""


@dataclass
class Figure:
    """One measured figure of SPEC §12 and how it compares."""

    number: int
    measured: str
    target: str
    ok: bool
    baseline: str = "—"
    """The baseline measured in the same run (or derived from one), or "—"."""
    ratio: str = "—"
    """measured ÷ baseline, or "—"."""
    details: list[str] = field(default_factory=list)
    """Extra lines that explain the figure (printed, not tabled)."""

    @property
    def name(self) -> str:
        return NAMES[self.number - 1]

    def line(self) -> str:
        verdict = "meets target" if self.ok else "MISSES target"
        text = (
            f"[{self.number}] {self.name}: {self.measured} | target {self.target} | "
            f"baseline {self.baseline} | ratio {self.ratio} | {verdict}"
        )
        return "\n".join([text, *(f"      {d}" for d in self.details)])


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100), linearly interpolated between samples."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ms(seconds: float) -> str:
    """Seconds as milliseconds with sensible precision."""
    value = seconds * 1000
    return (
        f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"
    )


def ratio(value: float, base: float) -> str:
    return f"{value / base:.3g}×" if base > 0 else "—"


def environment(quick: bool) -> str:
    """One line naming the machine and the versions the figures were measured with."""
    git = subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip()
    mode = "quick (small sizes)" if quick else "full"
    return (
        f"{datetime.now():%Y-%m-%d %H:%M} · {mode} · {os.cpu_count()} CPU(s) · "
        f"Python {platform.python_version()} ({sys.implementation.name}) · {git} · "
        f"{platform.system()} {platform.release()}"
    )


def table(figures: Sequence[Figure]) -> str:
    """The figures as a markdown table."""
    rows = [
        "| # | figure | measured | target | baseline (same run) | ratio | meets target |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in figures:
        cells = [
            str(f.number),
            f.name,
            f.measured,
            f.target,
            f.baseline,
            f.ratio,
            "yes" if f.ok else "**no**",
        ]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def document(figures: Sequence[Figure], env: str, elapsed: float) -> str:
    """``results.md``: the environment line, the table, and every figure's details."""
    parts = [
        "# opus benchmark results",
        "",
        f"{env} · took {elapsed:.0f} s",
        "",
        table(figures),
        "",
        "## Details",
        "",
    ]
    for f in figures:
        parts.append(f"- **{f.number}. {f.name}**: " + ("; ".join(f.details) or "—"))
    return "\n".join(parts) + "\n"
