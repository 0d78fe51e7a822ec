"""Figures 10 and 11 (SPEC §12, §18): remote stages on a real local Ray cluster.

10. one remote stage vs the same stage local, small repo: the coder stage's duration (its
   checkpoint's start to finish: prompt, agent, commit) with ``[executor] kind = "ray"``
   minus the same with ``local``, medians over sequential FRs; target ≤ 150 ms more. Both
   with the default ``[sandbox]`` (bubblewrap on the head and on the worker), and again with
   ``kind = "none"`` as a detail.
11. throughput of 20 instant FRs (coder and tester remote, concurrency 4) on one worker node
   vs two (two `agent` slots each), printed as the speed-up ratio.

The cluster is ``ray start`` processes (a head without `agent` resources, worker nodes with
them, token auth), started here and stopped at the end; it needs ``opus-orchestrator[ray]``.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

from report import Figure, ms, ratio
from world import World, make_world, simple_note

from opus.orchestrator import Orchestrator, load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.cluster.local_cluster import Cluster, free_port  # noqa: E402

TOKEN_ENV = "OPUS_BENCH_RAY_TOKEN"
VERDICT = '{"verdict": "approve", "confidence": 95, "summary": "ok"}'
AGENTS = {
    "planner": ["sh", "-c", "echo '# Plan'"],
    "coder": ["sh", "-c", 'echo "$OPUS_FR_ID" >> bench_change.txt'],
    "tester": ["true"],
    "reviewer": ["sh", "-c", f"echo '{VERDICT}'"],
}


def configure(
    world: World, cluster: Cluster, *, remote: list[str], concurrency: int, sandbox: bool = True
) -> None:
    """Instant command agents (real child processes), the executor, and ``[sandbox]``
    (default: ``auto``, bubblewrap here; else ``none``)."""
    agents = "".join(
        f'[agents.{stage}]\nkind = "command"\ncommand = {json.dumps(argv)}\n\n'
        for stage, argv in AGENTS.items()
    )
    executor = (
        f'[executor]\nkind = "ray"\naddress = "{cluster.address}"\ntoken_env = "{TOKEN_ENV}"\n'
        f"stages = {json.dumps(remote)}\nschedule_timeout = 120\n\n"
        if remote
        else ""
    )
    text = world.config_file.read_text().split("[agents.")[0]
    text = text.replace("concurrency = 3", f"concurrency = {concurrency}")
    unboxed = "" if sandbox else '[sandbox]\nkind = "none"\n\n'
    world.config_file.write_text(text + unboxed + executor + agents)


async def _run(world: World, cluster: Cluster, count: int, warmup: int = 0) -> float:
    """``warmup`` FRs, then ``count`` more timed, in one service (one Ray driver: the nodes'
    worker processes stay warm between stages)."""
    env = {**os.environ, TOKEN_ENV: cluster.token}
    async with Orchestrator(load_config(world.config_file), environ=env) as orch:
        for i in range(1, warmup + 1):
            world.put(f"FR-{i}.md", simple_note(f"FR-{i}"))
        if warmup:
            await orch.run_once()
        for i in range(warmup + 1, warmup + count + 1):
            world.put(f"FR-{i}.md", simple_note(f"FR-{i}"))
        began = time.perf_counter()
        summary = await orch.run_once()
        wall = time.perf_counter() - began
    if set(summary.statuses.values()) != {"review"}:
        raise RuntimeError(f"FRs ended as {summary.statuses}")
    return wall


def _coder_seconds(world: World) -> list[float]:
    jobs = json.loads((world.root / ".opus" / "registry.json").read_text())["jobs"]
    spans = [
        (_parse(cp["started_at"]), _parse(cp["finished_at"]))
        for job in jobs
        for cp in job["history"]
        if cp["stage"] == "coder"
    ]
    return [ended - began for began, ended in sorted(spans)]  # in the order they ran


async def _stage_overhead(
    base: Path, cluster: Cluster, runs: int, *, sandbox: bool
) -> tuple[float, float]:
    """Median seconds of the coder stage local, then remote (one warm-up FR each, untimed)."""
    local = make_world(base / "local", concurrency=1)
    configure(local, cluster, remote=[], concurrency=1, sandbox=sandbox)
    remote = make_world(base / "remote", concurrency=1)
    configure(remote, cluster, remote=["coder"], concurrency=1, sandbox=sandbox)
    for world in (local, remote):  # one service each, FRs one after the other
        await _run(world, cluster, runs, warmup=1)
    here = statistics.median(_coder_seconds(local)[1:])
    there = statistics.median(_coder_seconds(remote)[1:])
    return here, there


def _parse(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp).timestamp()


async def remote_figures(base: Path, runs: int, batch: int) -> list[Figure]:
    cluster = Cluster(root=base / "ray", token=secrets.token_hex(16), port=free_port())
    (base / "ray").mkdir(parents=True)
    try:
        cluster.start_head()
        cluster.add_worker("worker-1", agent=2)
        cluster.wait_for_agents(2)
        # 10: the coder stage local, then remote; sandboxed (the default), then not
        here, there = await _stage_overhead(base / "boxed", cluster, runs, sandbox=True)
        extra = there - here
        bare_here, bare_there = await _stage_overhead(base / "bare", cluster, runs, sandbox=False)
        eight = Figure(
            10,
            measured=f"coder stage {ms(there)} remote vs {ms(here)} local: {ms(extra)} more",
            target="≤ 150 ms more",
            ok=extra <= 0.150,
            baseline=f"{ms(here)} (local, same run)",
            ratio=ratio(there, here),
            details=[
                f"medians of {runs} FRs one after another in one service (after one warm-up "
                "FR), instant command agents, a 20-file repository; remote = a Ray task on "
                "the worker node, bundle out, log streamed, bundle back, verified, applied; "
                "agents in bubblewrap on both sides (the default [sandbox])",
                f'with [sandbox] kind = "none": {ms(bare_there)} remote vs {ms(bare_here)} '
                f"local: {ms(bare_there - bare_here)} more ({ratio(bare_there, bare_here)})",
            ],
        )
        # 11: 20 FRs, coder and tester remote, on one worker node, then on two
        one = make_world(base / "one-node", concurrency=4)
        configure(one, cluster, remote=["coder", "tester"], concurrency=4)
        t1 = await _run(one, cluster, batch, warmup=4)
        cluster.add_worker("worker-2", agent=2)
        cluster.wait_for_agents(4)
        two = make_world(base / "two-nodes", concurrency=4)
        configure(two, cluster, remote=["coder", "tester"], concurrency=4)
        t2 = await _run(two, cluster, batch, warmup=8)
        nine = Figure(
            11,
            measured=f"{batch} FRs in {t2:.2f} s on 2 worker nodes, {t1:.2f} s on 1",
            target="— (reported; SPEC sets none)",
            ok=True,
            baseline=f"{t1:.2f} s (1 node, same run)",
            ratio=f"{t1 / t2:.2f}× speed-up",
            details=[
                f"{batch} instant FRs after a warm-up batch, coder and tester remote, "
                "concurrency 4, two `agent` slots per node; both nodes share this machine's "
                "cores, so a second node adds slots, not CPU"
            ],
        )
        return [eight, nine]
    finally:
        cluster.stop()
