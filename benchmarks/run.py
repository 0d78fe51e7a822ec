"""Measure the performance figures of SPEC §12 in one run.

    python benchmarks/run.py            # full sizes, ~3 minutes on 2 cores
    python benchmarks/run.py --quick    # tiny sizes, a smoke run of a few seconds
    python benchmarks/run.py --only 10,11  # the remote figures alone (a local Ray cluster)

Figures 10 and 11 start a local Ray cluster (``opus-orchestrator[ray]``): a full run includes
them when Ray is installed, a quick run only when ``--only`` asks for them.

Each figure prints one line — measured value, target, the baseline measured in the same
run and the ratio against it — then a markdown table of all of them, also written to
``benchmarks/results.md`` (``results-quick.md`` with ``--quick``; ``--out`` to choose).
Exit status 0 when every figure was measured (met or not), 1 when one could not be.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import checkpoint_figure  # noqa: E402
import cli_figures  # noqa: E402
import pipeline_figures  # noqa: E402
import remote_figure  # noqa: E402
import sandbox_figure  # noqa: E402
import state_figures  # noqa: E402
from report import NAMES, Figure, document, environment, median, table  # noqa: E402
from world import World, fill_vault, isolate_git, make_world  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    moves: int  # 1: notes moved in
    runs: int  # 2: single FRs timed (and git baselines)
    notes: int  # 3, 5, 6: notes in the large vault
    cold_runs: int  # 3: cold scans
    jobs: int  # 4: jobs in history
    saves: int  # 4: saves timed per history
    window: float  # 5: seconds of idle CPU measured
    batch: int  # 7: FRs run at concurrency 3
    cli_jobs: int  # 8: jobs (and notes) behind `opus status`
    cli_runs: int  # 8, 9: processes timed per command
    archived: int  # 9: archived jobs
    remote_runs: int  # 10: FRs timed one after another, local and remote
    remote_batch: int  # 11: FRs on one worker node, then on two
    stages: int  # 12: instant stages timed, sandboxed and not


FULL = Sizes(
    moves=40, runs=10, notes=10_000, cold_runs=3, jobs=100_000, saves=200, window=30.0,
    batch=100, cli_jobs=1_000, cli_runs=10, archived=100_000, remote_runs=10, remote_batch=20,
    stages=50,
)  # fmt: skip
QUICK = Sizes(
    moves=5, runs=2, notes=300, cold_runs=1, jobs=1_000, saves=200, window=3.0, batch=9,
    cli_jobs=50, cli_runs=3, archived=1_000, remote_runs=3, remote_batch=8, stages=5,
)  # fmt: skip


REMOTE = {10, 11}
"""The figures that start a local Ray cluster (``remote_figure``)."""


class Bench:
    """Runs the chosen figures in one temporary folder, printing each as it is measured."""

    def __init__(self, tmp: Path, sizes: Sizes, only: set[int]) -> None:
        self.tmp = tmp
        self.sizes = sizes
        self.only = only
        self.figures: list[Figure] = []
        self.failed: list[str] = []
        self.single: float | None = None
        self.bare: float | None = None

    def run(self) -> None:
        s = self.sizes
        if self.only & {3, 5, 6}:
            big = make_world(self.tmp / "large")
            fill_vault(big, s.notes)
            if 3 in self.only:
                self._one([3], lambda: self._scan(big))
            if self.only & {5, 6}:
                wanted = sorted(self.only & {5, 6})
                self._one(wanted, lambda: self._served(big, wanted))
        if 1 in self.only:
            self._one([1], self._pickup)
        if 2 in self.only:
            self._one([2], self._overhead)
        if 7 in self.only:
            self._one([7], self._throughput)
        if 8 in self.only:
            self._one([8], lambda: [cli_figures.cli_latency(
                self.tmp / "cli", self.sizes.cli_jobs, self.sizes.cli_runs)])  # fmt: skip
        if 9 in self.only:
            self._one([9], lambda: [cli_figures.metrics_history(
                self.tmp / "metrics", self.sizes.archived, self.sizes.cli_runs)])  # fmt: skip
        if self.only & REMOTE:
            self._one(sorted(self.only & REMOTE), self._remote)
        if 12 in self.only:
            self._one([12], self._sandbox)
        if 4 in self.only:  # last: its 100,000 live jobs take GBs the others should not carry
            self._one([4], self._checkpoint)

    def _one(self, numbers: list[int], measure: Callable[[], list[Figure]]) -> None:
        try:
            figures = measure()
        except Exception:
            for n in numbers:
                print(f"[{n}] {NAMES[n - 1]}: ERROR (not measured)", flush=True)
                self.failed.append(NAMES[n - 1])
            traceback.print_exc()
            return
        for figure in figures:
            print(figure.line(), flush=True)
            self.figures.append(figure)

    def _scan(self, big: World) -> list[Figure]:
        figure, self.bare = state_figures.vault_scan(big, self.sizes.notes, self.sizes.cold_runs)
        return [figure]

    def _served(self, big: World, wanted: list[int]) -> list[Figure]:
        bare = self.bare
        if bare is None:
            times = [_time(lambda: state_figures.bare_scan(big.planned)) for _ in range(5)]
            bare = median(times)
        cpu, mem = state_figures.served_vault(big, self.sizes.notes, self.sizes.window, bare)
        return [f for f in (cpu, mem) if f.number in wanted]

    def _pickup(self) -> list[Figure]:
        tmp, moves = self.tmp / "pickup", self.sizes.moves
        return [anyio.run(pipeline_figures.pickup_latency, tmp, moves)]

    def _overhead(self) -> list[Figure]:
        tmp, runs = self.tmp / "overhead", self.sizes.runs
        figure, self.single = anyio.run(pipeline_figures.overhead, tmp, runs)
        return [figure]

    def _throughput(self) -> list[Figure]:
        tmp, batch = self.tmp / "throughput", self.sizes.batch
        return [anyio.run(pipeline_figures.throughput, tmp, batch, self.single)]

    def _remote(self) -> list[Figure]:
        tmp, s = self.tmp / "remote", self.sizes
        figures = anyio.run(remote_figure.remote_figures, tmp, s.remote_runs, s.remote_batch)
        return [f for f in figures if f.number in self.only]

    def _sandbox(self) -> list[Figure]:
        tmp, stages = self.tmp / "sandbox", self.sizes.stages
        return [anyio.run(sandbox_figure.sandbox_overhead, tmp, stages)]

    def _checkpoint(self) -> list[Figure]:
        tmp, s = self.tmp / "registry", self.sizes
        return [checkpoint_figure.checkpoint_cost(tmp, s.jobs, s.saves)]


def _time(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def _default(quick: bool) -> set[int]:
    """Every figure; the remote ones (a local Ray cluster) only in a full run with Ray."""
    import importlib.util

    remote = not quick and importlib.util.find_spec("ray") is not None
    return set(range(1, len(NAMES) + 1)) - (set() if remote else REMOTE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument(
        "--only", default="", help=f"comma-separated figure numbers (1–{len(NAMES)})"
    )
    parser.add_argument("--out", type=Path, help="where to write the markdown results")
    parser.add_argument("--tmp", type=Path, help="folder for the temporary vaults and repos")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    every = set(range(1, len(NAMES) + 1))
    only = {int(n) for n in args.only.split(",") if n.strip()} or _default(args.quick)
    if not only <= every:
        print(f"--only takes figure numbers 1–{len(NAMES)}", file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else FULL
    out = args.out or HERE / ("results-quick.md" if args.quick else "results.md")
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    env = environment(args.quick)
    print(f"opus benchmarks · {env}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="opus-bench-", dir=args.tmp) as tmp:
        isolate_git(Path(tmp))
        bench = Bench(Path(tmp), sizes, only)
        bench.run()
    elapsed = time.perf_counter() - started
    figures = sorted(bench.figures, key=lambda f: f.number)
    print()
    print(table(figures))
    out.write_text(document(figures, env, elapsed))
    print(f"\nwritten to {out} · took {elapsed:.0f} s", flush=True)
    if bench.failed:
        print(f"not measured: {', '.join(bench.failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
