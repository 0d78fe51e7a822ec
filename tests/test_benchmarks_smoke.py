"""``benchmarks/run.py --quick`` as a person runs it: a child process, every figure printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {
    1: "pickup latency",
    2: "orchestration overhead",
    3: "vault scan",
    4: "checkpoint cost",
    5: "idle CPU",
    6: "memory",
    7: "throughput",
    8: "CLI latency",
    9: "metrics vs history",
    # 10, 11: the remote figures need a Ray cluster: full runs only
    12: "sandbox overhead",
}


@pytest.mark.timeout(300)
def test_quick_run_measures_and_tables_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ERROR" not in done.stdout
    for number, name in FIGURES.items():
        # one line per figure: value, target, same-run baseline, ratio, verdict
        line = re.search(rf"^\[{number}\] {re.escape(name)}: (.+)$", done.stdout, re.MULTILINE)
        assert line is not None, f"figure {number} ({name}) not printed:\n{done.stdout}"
        fields = line.group(1).split(" | ")
        assert fields[1].startswith("target ") and fields[2].startswith("baseline ")
        assert fields[3].startswith("ratio ") and fields[4].endswith("target")
        assert re.search(r"\d", fields[0]), line.group(0)  # a measured number
        # and one row in the markdown table, printed and written
        row = rf"^\| {number} \| {re.escape(name)} \| .+ \| (yes|\*\*no\*\*) \|$"
        assert re.search(row, done.stdout, re.MULTILINE), name
        assert re.search(row, out.read_text(), re.MULTILINE), name
    assert "quick (small sizes)" in out.read_text()
