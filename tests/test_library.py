"""The library surface (SPEC §11): public names, an import and a constructor that start
nothing, agents passed in code, and the README's example run for real."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

import opus.orchestrator
from opus.orchestrator import (
    OpusError,
    Orchestrator,
    ScriptedAgent,
    Stage,
    StageContext,
    StageResult,
    Status,
    load_config,
)
from opus.orchestrator.agents.fake import tests_fail, tests_pass, writes

from .conftest import Vault, git

README = Path(__file__).parent.parent / "README.md"
NOTE = "---\nid: {id}\ntitle: Thing {id}\n---\n# Thing\n\nDo {id}.\n"

#: What SPEC §11 and scripts rely on; removing one of these is a breaking change.
PUBLIC = {
    "Orchestrator", "Summary", "serve", "load_config", "Config",
    "Agent", "StageContext", "StageResult", "ScriptedAgent", "build_agent", "build_agents",
    "Status", "Stage", "Outcome",
    "FeatureRequest", "Job", "Checkpoint", "Usage", "Verdict", "Issue", "Feedback", "Priority",
    "OpusError", "ConfigError", "AgentError", "AgentNotFound", "AgentOutputError",
    "AgentStalled", "AgentTimeout", "LockHeld", "MergeConflict", "NoteError", "WorkspaceError",
}  # fmt: skip


def meta(note: Path) -> dict[str, Any]:
    data = yaml.safe_load(note.read_text().split("---\n")[1])
    assert isinstance(data, dict)
    return data


# -- the public surface ------------------------------------------------------------------------


def test_every_name_in_all_exists() -> None:
    missing = [n for n in opus.orchestrator.__all__ if not hasattr(opus.orchestrator, n)]
    assert missing == []
    assert len(set(opus.orchestrator.__all__)) == len(opus.orchestrator.__all__)


def test_no_public_name_went_missing() -> None:
    assert PUBLIC - set(opus.orchestrator.__all__) == set()


def test_the_package_is_typed() -> None:
    assert (Path(opus.__file__).parent / "py.typed").exists()


# -- importing and constructing start nothing ----------------------------------------------------

PROBE = textwrap.dedent(
    """
    import json, os, sys, threading
    events = []
    WATCH = ("open", "os.mkdir", "os.listdir", "os.scandir", "os.rename", "os.remove",
             "subprocess.Popen", "os.posix_spawn", "os.exec", "os.fork", "socket.socket",
             "socket.connect", "socket.bind")
    def hook(event, args):
        if event in WATCH:
            events.append([event, str(args[0]) if args else "", str(args[1:3])])
    sys.addaudithook(hook)
    report = {"threads": [threading.active_count()]}
    import opus.orchestrator
    report["threads"].append(threading.active_count())
    report["import"] = events[:]
    config = opus.orchestrator.load_config(sys.argv[1])
    events.clear()
    orch = opus.orchestrator.Orchestrator(config)
    report["threads"].append(threading.active_count())
    report["construct"] = events[:]
    report["state_dir"] = os.path.exists(config.state_dir)
    print(json.dumps(report))
    """
)


def probe(vault: Vault, tmp_path: Path) -> dict[str, Any]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = subprocess.run(
        [sys.executable, str(script), str(vault.config)],
        cwd=cwd, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert list(cwd.iterdir()) == []
    report: dict[str, Any] = json.loads(out.stdout)
    return report


MODULE_FILE = (".py", ".pyc", ".so", ".pth", ".zip", "entry_points.txt", "__path_hook__")


def io_beyond_loading_code(events: list[list[str]]) -> list[list[str]]:
    """The recorded events minus what loading modules does (module files, the import
    system's directory listings, package metadata read by importlib.metadata)."""
    return [
        e
        for e in events
        if not (e[0] == "open" and e[1].endswith(MODULE_FILE)) and e[0] != "os.listdir"
    ]


def test_import_and_construction_start_no_thread_and_touch_no_file(
    vault: Vault, tmp_path: Path
) -> None:
    report = probe(vault, tmp_path)
    before, after_import, after_construct = report["threads"]
    assert before == after_import == after_construct
    # importing: no socket, nothing in the vault, no file opened but code (and the pipes of
    # the child processes of the test below)
    spawned = ("subprocess.Popen", "os.posix_spawn")
    child_pipes = {"/dev/null"} if any(e[0] in spawned for e in report["import"]) else set()
    imported = [
        e
        for e in io_beyond_loading_code(report["import"])
        if e[0] not in spawned and e[1] not in child_pipes and not e[1].isdigit()
    ]
    assert imported == []
    assert [e for e in report["import"] if str(vault.root) in e[1]] == []
    # constructing: nothing beyond loading code, and no state folder
    assert io_beyond_loading_code(report["construct"]) == []
    assert report["state_dir"] is False
    assert not vault.state.exists()


def test_import_starts_no_process(vault: Vault, tmp_path: Path) -> None:
    report = probe(vault, tmp_path)
    spawned = [e for e in report["import"] if e[0] in ("subprocess.Popen", "os.posix_spawn")]
    assert spawned == []


def test_constructing_in_process_creates_nothing(vault: Vault) -> None:
    # compare the threads themselves, not their count: a worker thread of an earlier test
    # that is still winding down may end in between, which is not ours to judge
    threads = set(threading.enumerate())
    Orchestrator(load_config(vault.config))
    assert set(threading.enumerate()) - threads == set()
    assert not vault.state.exists()


# -- agents passed in code -----------------------------------------------------------------------


def plan(ctx: StageContext) -> str:
    """A plain (sync) function as the planner."""
    return f"# Plan for {ctx.fr.id}\n\n1. Write {ctx.fr.id}.py.\n"


async def review(ctx: StageContext) -> dict[str, Any]:
    """A plain async function as the reviewer: approves when the file is there."""
    done = (ctx.worktree / "FR-1.py").exists()
    return {
        "verdict": "approve" if done else "request_changes",
        "confidence": 92,
        "summary": "ok" if done else "missing",
        "issues": [],
    }


@pytest.mark.anyio
async def test_agents_passed_in_code_carry_an_fr_to_review(vault: Vault) -> None:
    note = vault.note("FR-1.md", NOTE.format(id="FR-1"))
    other = vault.note("FR-2.md", NOTE.format(id="FR-2"))
    coder = ScriptedAgent(writes({"FR-1.py": "x = 1\n"}), writes({"FR-1.py": "x = 2\n"}))
    tester = ScriptedAgent(tests_fail("FAILED test_x - assert x == 2"), tests_pass())
    agents: dict[str, Any] = {"planner": plan, "coder": coder, "tester": tester, "reviewer": review}
    async with Orchestrator(load_config(vault.config), agents=agents) as orch:
        job = await orch.process("FR-1")
    assert job.status is Status.REVIEW
    assert meta(note)["status"] == "review"
    # the loop went through the in-code agents: a failing test fed back to the coder
    assert [c.iteration for c in coder.calls] == [1, 2]
    feedback = coder.calls[1].feedback
    assert feedback is not None and feedback.reason == "tests_failed"
    assert "assert x == 2" in feedback.test_output
    assert coder.calls[1].plan == plan(coder.calls[0])
    assert [c.stage for c in tester.calls] == [Stage.TESTER, Stage.TESTER]
    assert [(c.stage.value, c.outcome.value) for c in job.history] == [
        ("planner", "ok"), ("coder", "ok"), ("tester", "rejected"),
        ("coder", "ok"), ("tester", "ok"), ("reviewer", "ok"), ("delivery", "ok"),
    ]  # fmt: skip
    assert git(vault.repo, "show", "opus/fr-1:FR-1.py") == "x = 2"
    plan_md = vault.state / "jobs" / job.id / "plan.md"
    assert plan_md.read_text().startswith("# Plan for FR-1")
    # the configured command agents never ran, and the other FR was left alone
    assert vault.calls() == []
    assert "status" not in meta(other)


@pytest.mark.anyio
async def test_process_takes_a_notes_path(vault: Vault) -> None:
    note = vault.note("FR-7.md", NOTE.format(id="FR-7"))
    agents = {s: ScriptedAgent() for s in ("planner", "coder", "tester", "reviewer")}
    agents["coder"] = ScriptedAgent(writes({"seven.txt": "7\n"}))
    async with Orchestrator(load_config(vault.config), agents=dict(agents)) as orch:
        job = await orch.process(str(note))
    assert (job.fr_id, job.status) == ("FR-7", Status.REVIEW)
    assert job.branch == "opus/fr-7"


@pytest.mark.anyio
async def test_an_agent_for_an_unknown_stage_is_refused_and_the_lock_released(
    vault: Vault,
) -> None:
    with pytest.raises(ValueError, match="deployer"):
        async with Orchestrator(load_config(vault.config), agents={"deployer": ScriptedAgent()}):
            pass
    async with Orchestrator(load_config(vault.config)) as orch:  # the lock is free again
        assert orch.config.root == vault.root


def test_a_stage_result_is_what_an_agent_returns() -> None:
    result = StageResult(output="x")
    assert (result.passed, result.verdict, result.usage) == (True, None, None)


# -- the README ----------------------------------------------------------------------------------


def readme_python() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no ```python block"
    return "\n".join(blocks)


def test_readme_example_compiles_and_its_names_import() -> None:
    code = readme_python()
    compile(code, "README.md", "exec")
    for module, names in re.findall(r"^from (\S+) import (.+)$", code, flags=re.M):
        imported = __import__(module, fromlist=["_"])
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(imported, name), f"{module}.{name}"


@pytest.mark.anyio
async def test_readme_example_runs_against_a_vault(vault: Vault) -> None:
    code = readme_python()
    assert '"vault/opus.toml"' in code
    code = code.replace('"vault/opus.toml"', json.dumps(str(vault.config)))
    note = vault.note("FR-1.md", NOTE.format(id="FR-1"))
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert "main" in namespace, "the README example defines no main()"
    await namespace["main"]()
    assert meta(note)["status"] == "review"
    assert [c["stage"] for c in vault.calls() if c["event"] == "end"] == [
        "planner",
        "coder",
        "tester",
        "reviewer",
    ]


@pytest.mark.anyio
async def test_process_of_an_fr_that_cannot_start_says_why(vault: Vault) -> None:
    vault.note("FR-3.md", "---\nid: FR-3\npriority: urgent\n---\n# Three\n\nDo it.\n")
    agents = {s: ScriptedAgent() for s in ("planner", "coder", "tester", "reviewer")}
    async with Orchestrator(load_config(vault.config), agents=dict(agents)) as orch:
        with pytest.raises(OpusError, match=r"FR-3: no job was started; its note says failed: "):
            await orch.process("FR-3")
    assert "priority" in meta(vault.root / "10_features" / "03_planned" / "FR-3.md")["error"]
