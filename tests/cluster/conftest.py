"""A real local Ray cluster: a head without `agent` resources and worker nodes with them.

Each node is a ``ray start`` in a session of its own, with its own temp folder, cache folder
and ports, token auth on; teardown kills exactly those sessions. One cluster per module
(the machine has two cores): tests add and kill worker nodes on it.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Iterator

import pytest

from ..conftest import AGENT, Vault

ray = pytest.importorskip("ray")

from .local_cluster import Cluster, free_port  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("ray")
    c = Cluster(root=root, token=secrets.token_hex(16), port=free_port())
    try:
        c.start_head()
        yield c
    finally:
        c.stop()


def remote_config(vault: Vault, cluster: Cluster, *, stages: str = '["coder", "tester"]',
                  executor: str = "", pipeline: str = "", address: str = "",
                  coder: list[str] | None = None,
                  sandbox: str = 'kind = "none"') -> None:  # fmt: skip
    """The vault's opus.toml with coder and tester on the cluster; the scripted agents say
    on which node they ran (``OPUS_TEST_NODE``, set on worker nodes only)."""
    script, calls = json.dumps(str(vault.script_file)), json.dumps(str(vault.calls_file))
    agents = "".join(
        f"""
[agents.{stage}]
kind = "command"
command = {json.dumps(coder if coder and stage == "coder" else [sys.executable, str(AGENT), stage])}
env = {{ SCRIPT = {script}, CALLS = {calls}, API_TOKEN = "{SECRET}" }}
env_passthrough = ["OPUS_TEST_NODE"]
"""
        for stage in ("planner", "coder", "tester", "reviewer")
    )
    vault.config.write_text(f"""
[vault]
planned = "10_features/03_planned"
dashboard = ""
[repos.app]
path = {json.dumps(str(vault.repo))}
base = "main"
[polling]
active = 0.2
idle_max = 1
debounce_ms = 50
[pipeline]
stage_timeout = 60
stall_timeout = 30
retries = 1
concurrency = 4
{pipeline}
[sandbox]
{sandbox}
[executor]
kind = "ray"
address = "{address or cluster.address}"
token_env = "OPUS_RAY_TOKEN"
stages = {stages}
schedule_timeout = 60
{executor}
{agents}""")


SECRET = "s3cr3t-agent-key-" + secrets.token_hex(8)
"""A secret in the agents' env tables: it must never reach a file of Ray's."""
