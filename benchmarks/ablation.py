"""What figure 2's overhead is made of: its harness, run with parts of opus taken away.

    python benchmarks/ablation.py               # 3 rounds of 10 FRs per variant
    python benchmarks/ablation.py --rounds 5 --runs 20

Variants, each in a new process, interleaved round by round so a machine whose speed drifts
drifts for all of them alike:

- ``as is``;
- ``inline``: every hand-off to a worker thread (``anyio.to_thread.run_sync``) runs on the
  event loop instead;
- ``no fsync``: ``os.fsync`` does nothing;
- ``both``.

Not a way to run opus — blocking work belongs in threads, and the fsyncs are the promises of
SPEC §2.4 and §3.1 — but a measure of what each costs. Prints each variant's figure-2 ratio
(opus ÷ its git commands run directly) per round, then the range.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from pipeline_figures import overhead  # noqa: E402
from world import isolate_git  # noqa: E402

VARIANTS = {"as is": (), "inline": ("inline",), "no fsync": ("fsync",), "both": ("inline", "fsync")}


async def _inline(func: Callable[..., Any], *args: Any, **_: Any) -> Any:
    return func(*args)


def _measure(parts: tuple[str, ...], runs: int) -> str:
    """Figure 2's ratio with ``parts`` taken away (in this process)."""
    if "inline" in parts:
        anyio.to_thread.run_sync = _inline  # type: ignore[assignment]
    if "fsync" in parts:
        os.fsync = lambda fd: None
    with tempfile.TemporaryDirectory(prefix="opus-ablation-") as tmp:
        isolate_git(Path(tmp))
        figure, _ = anyio.run(overhead, Path(tmp), runs)
    return figure.ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10, help="FRs per variant and round")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant is not None:  # a child: one measurement
        print(_measure(VARIANTS[args.variant], args.runs))
        return
    ratios: dict[str, list[str]] = {name: [] for name in VARIANTS}
    for n in range(1, args.rounds + 1):
        for name in VARIANTS:
            argv = [sys.executable, __file__, "--variant", name, "--runs", str(args.runs)]
            done = subprocess.run(argv, capture_output=True, text=True, check=True)
            ratios[name].append(done.stdout.strip())
            print(f"round {n}: {name:9s} {ratios[name][-1]}", flush=True)
    for name, values in ratios.items():
        print(f"{name:9s} {', '.join(values)}")


if __name__ == "__main__":
    main()
