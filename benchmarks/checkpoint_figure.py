"""Figure 4: the cost of one checkpoint (``Registry.save()``) against the history kept.

Three registries: 10 jobs; N finished jobs written into ``registry.json`` (opening it keeps
the newest ``max_finished`` and archives the rest); N jobs already in ``archive/``. A
checkpoint is what the service's ``Registry.save`` does (``flush_interval`` 30 s: an append to
the job's event log). The ``registry.json`` rewrite that each tick does is measured beside it
(``flush_interval`` 0) and reported, but it is not part of a checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timedelta
from pathlib import Path

from report import Figure, median, ms, percentile, ratio

from opus.orchestrator import Checkpoint, Job, Outcome, Priority, Stage, Status, Usage
from opus.orchestrator.registry import Registry


def _job_template(finished: datetime) -> str:
    """A finished job's registry row (5 checkpoints, usage) with ``{i}`` placeholders."""
    history = [
        Checkpoint(
            stage=stage,
            iteration=1,
            outcome=Outcome.OK,
            started_at=finished,
            finished_at=finished,
            commit="c" * 40,
            artifact=f"{stage}.md",
            usage=Usage(input_tokens=12000, output_tokens=900, cost_usd=0.04),
        )
        for stage in Stage
    ]
    job = Job(
        id="20260101-000000-fr-{i}-beef",
        fr_id="FR-{i}",
        fr_path="10_features/03_planned/FR-{i}.md",
        title="Finished thing {i}",
        priority=Priority.MEDIUM,
        status=Status.DONE,
        repo="app",
        branch="opus/fr-{i}",
        base_commit="b" * 40,
        created_at=finished,
        updated_at=finished,
        finished_at=finished,
        usage=Usage(input_tokens=60000, output_tokens=4500, cost_usd=0.2),
        history=history,
    )
    return json.dumps(job.model_dump(mode="json"), separators=(",", ":"))


def _write_history(state: Path, jobs: int, *, archived: bool) -> None:
    """``jobs`` finished jobs: live in registry.json, or in archive/ (older than keep_days)."""
    (state / "archive").mkdir(parents=True)
    now = datetime.now().replace(microsecond=0)
    if archived:
        row = _job_template(now - timedelta(days=90))
        month = f"{now - timedelta(days=90):%Y-%m}.jsonl"
        with open(state / "archive" / month, "w") as f:
            f.writelines(row.replace("{i}", str(i)) + "\n" for i in range(jobs))
        (state / "registry.json").write_text('{"version":1,"jobs":[]}')
        return
    row = _job_template(now - timedelta(days=1))
    with open(state / "registry.json", "w") as f:
        f.write('{"version":1,"jobs":[')
        f.write(",".join(row.replace("{i}", str(i)) for i in range(jobs)))
        f.write("]}")


class _History:
    """One registry holding a given history, and the save times measured on it."""

    def __init__(self, state: Path, jobs: int, *, archived: bool) -> None:
        _write_history(state, jobs, archived=archived)
        self.registry = Registry(state, now=datetime.now)
        start = time.perf_counter()
        self.registry.open()
        self.open = time.perf_counter() - start
        self.kept = len(self.registry.jobs())
        self.job = self.registry.create(
            fr_id="FR-live",
            fr_path="10_features/03_planned/FR-live.md",
            title="Live",
            priority=Priority.HIGH,
            repo="app",
            branch="opus/fr-live",
        )
        self.job.status = Status.IN_PROGRESS
        self.saves: list[float] = []
        self.rewrites: list[float] = []

    def save(self, n: int, *, rewrite: bool = False) -> None:
        """Time one checkpoint; ``rewrite``: one that falls due for the registry.json rewrite."""
        self.job.stage = _STAGES[n % 4]
        self.registry.flush_interval = 0.0 if rewrite else 30.0
        start = time.perf_counter()
        self.registry.save(self.job, "checkpoint", stage=self.job.stage.value, iteration=1)
        (self.rewrites if rewrite else self.saves).append(time.perf_counter() - start)


_STAGES = list(Stage)


def checkpoint_cost(base: Path, jobs: int, saves: int, rewrites: int = 21) -> Figure:
    """Saves alternate between the three registries, so disk noise hits them alike."""
    small = _History(base / "small", 10, archived=False)
    live = _History(base / "live", jobs, archived=False)
    archived = _History(base / "archived", jobs, archived=True)
    histories = (small, live, archived)
    os.sync()
    for n in range(saves):
        for h in histories:
            h.save(n)
    for n in range(rewrites):  # a rewrite of the large live registry takes ~1 s: fewer of those
        for h in histories if n < 5 else (small, archived):
            h.save(n, rewrite=True)
    sizes = [h.registry.registry_file.stat().st_size for h in histories]
    s, lv, ar = (median(h.saves) for h in histories)
    rs, rl, ra = (median(h.rewrites) for h in histories)
    worst = max(lv / s, ar / s)
    many = f"{jobs:,}"
    return Figure(
        4,
        measured=(
            f"median checkpoint {ms(s)} / {ms(lv)} / {ms(ar)} (10 jobs / {many} finished "
            f"in registry.json / {many} archived)"
        ),
        target="≤ 1.5× (cost independent of history)",
        ok=worst <= 1.5,
        baseline=f"10 jobs: {ms(s)}",
        ratio=f"{ratio(lv, s)} / {ratio(ar, s)}",
        details=[
            f"{saves} back-to-back saves per registry (flush_interval 30 s), interleaved; "
            f"p99 {ms(percentile(small.saves, 99))} / {ms(percentile(live.saves, 99))} / "
            f"{ms(percentile(archived.saves, 99))}",
            f"registry.json rewrite (once a tick, not per checkpoint): {ms(rs)} / {ms(rl)} / "
            f"{ms(ra)}, median of {rewrites} ({min(rewrites, 5)} for the second); it is "
            f"{sizes[0] / 1e3:.0f} kB / {sizes[1] / 1e6:.0f} MB / {sizes[2] / 1e3:.1f} kB",
            f"Registry.open: 10 jobs {ms(small.open)}, {many} live {live.open:.2f} s, "
            f"{many} archived {ms(archived.open)}; jobs left in registry.json after open: "
            f"{small.kept} / {live.kept} / {archived.kept}",
        ],
    )
