"""The sandbox's parts without a pipeline: the policy → bwrap options, where programs live,
the git folders, cgroup v2 delegation (on a cgroup tree made of plain files), memory_max."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from opus.orchestrator.agents.command import CommandAgent
from opus.orchestrator.cgroups import Delegated, find_delegated, parse_size
from opus.orchestrator.config import AgentSection, load_config
from opus.orchestrator.errors import AgentCrashed, AgentNotFound
from opus.orchestrator.lifecycle import Stage
from opus.orchestrator.sandbox import (
    Policy,
    Sandbox,
    bwrap_args,
    exit_signal,
    git_paths,
    open_sandbox,
    program_paths,
    sandbox_problems,
)
from opus.orchestrator.supervisor import kill_group

from .conftest import Vault, git
from .test_command_agent import make_ctx
from .test_service import wait

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is missing")


def policy(tmp_path: Path, **overrides: object) -> Policy:
    vault = tmp_path / "vault"
    state = vault / ".opus"
    job = state / "jobs" / "j1"
    worktree = state / "worktrees" / "j1"
    note = vault / "planned" / "FR-1.md"
    home = tmp_path / "home"
    for folder in (job, worktree, note.parent, home, state / "sandbox" / "j1" / "tmp"):
        folder.mkdir(parents=True, exist_ok=True)
    for file in (note, job / "prompt.md", job / "output"):
        file.write_text("x")
    values: dict[str, object] = {
        "worktree": worktree,
        "worktree_writable": True,
        "git": None,
        "git_writable": False,
        "fr_file": note,
        "artifacts": job,
        "prompt_file": job / "prompt.md",
        "output_file": job / "output",
        "tmp": state / "sandbox" / "j1" / "tmp",
        "home": home,
        "private_home": None,
        "hidden": (vault, state),
    }
    values.update(overrides)
    return Policy(**values)  # type: ignore[arg-type]


def mounts(args: list[str]) -> list[tuple[str, str]]:
    """(option, destination) of each mount, in order."""
    out, i = [], 0
    while i < len(args):
        op = args[i]
        if op in ("--tmpfs", "--remount-ro", "--dev", "--proc", "--chdir"):
            out.append((op, args[i + 1]))
            i += 2
        elif op.startswith(("--bind", "--ro-bind")):
            out.append((op, args[i + 2]))
            i += 3
        else:
            i += 1
    return out


def test_mounts_go_from_shallow_to_deep_so_inner_binds_win(tmp_path: Path) -> None:
    shared = tmp_path  # a writable `paths` entry that holds the vault
    p = policy(tmp_path, writable=(shared,))
    got = mounts(bwrap_args(p))
    order = [dest for _, dest in got]
    vault = str(tmp_path / "vault")
    assert got[0] == ("--ro-bind", "/")
    assert order.index(str(shared)) < order.index(vault) < order.index(str(p.worktree))
    assert ("--tmpfs", vault) in got and ("--remount-ro", vault) in got
    assert got.index(("--remount-ro", vault)) > order.index(str(p.fr_file))
    assert ("--ro-bind", str(p.fr_file)) in got and ("--bind", str(p.output_file)) in got
    assert ("--bind", str(p.artifacts)) in got
    assert ("--bind", str(p.worktree)) in got
    args = bwrap_args(p)
    assert "--unshare-pid" in args and "--die-with-parent" in args
    assert "--unshare-net" not in args
    assert "--unshare-net" in bwrap_args(policy(tmp_path, network=False))
    assert ("--ro-bind", str(p.worktree)) in mounts(
        bwrap_args(policy(tmp_path, worktree_writable=False))
    )


def test_symlinked_paths_are_resolved_and_bound_where_the_agent_is_told(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    p = policy(link)  # every path of the policy goes through the symlink
    got = mounts(bwrap_args(p))
    worktree_real = str(real / "vault" / ".opus" / "worktrees" / "j1")
    assert ("--bind", worktree_real) in got and ("--bind", str(p.worktree)) in got
    assert ("--tmpfs", str(real / "vault")) in got  # hidden where it really is
    args = bwrap_args(p)
    assert args[args.index("--chdir") + 1] == worktree_real


def test_private_home_is_bound_over_home_then_the_cli_folders_over_it(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir()
    p = policy(tmp_path, private_home=private, home_dirs=(".claude",))
    got = mounts(bwrap_args(p))
    home = str(tmp_path / "home")
    assert got.index(("--bind", home)) < got.index(("--bind-try", home + "/.claude"))
    assert ("--remount-ro", home) not in got  # the private HOME stays writable


def test_git_folders_writable_only_as_far_as_a_commit_needs(vault: Vault, tmp_path: Path) -> None:
    wt = tmp_path / "wt"
    git(vault.repo, "worktree", "add", "-q", "-b", "opus/fr-1", str(wt))
    found = git_paths(wt)
    assert found is not None
    common = (vault.repo / ".git").resolve()
    assert found.common == common
    assert found.own == common / "worktrees" / "wt"
    assert found.ref_dirs == (common / "refs/heads/opus", common / "logs/refs/heads/opus")
    coder = mounts(bwrap_args(policy(tmp_path, git=found, git_writable=True)))
    assert ("--ro-bind", str(common)) in coder
    assert {("--bind", str(common / "objects")), ("--bind", str(found.own))} <= set(coder)
    assert not any(dest in (str(common / "HEAD"), str(common / "index")) for _, dest in coder)
    reviewer = mounts(bwrap_args(policy(tmp_path, git=found, git_writable=False)))
    assert ("--ro-bind", str(found.own)) in reviewer
    assert not any(op == "--bind" and dest.startswith(str(common)) for op, dest in reviewer)
    checkout = git_paths(vault.repo)
    assert checkout is not None and checkout.own is None and checkout.common == vault.repo / ".git"
    assert git_paths(tmp_path) is None


def test_a_program_installed_in_the_hidden_home_stays_runnable(tmp_path: Path) -> None:
    home = tmp_path / "home"
    npm = home / ".cache" / "tools" / "npm"
    (npm / "lib" / "cli").mkdir(parents=True)
    (npm / "bin").mkdir()
    target = npm / "lib" / "cli" / "cli.js"
    target.write_text("#!/usr/bin/env python3\n")
    target.chmod(0o755)
    (npm / "bin" / "tool").symlink_to(target)
    script = home / "agent.py"
    script.write_text("print(1)\n")
    env = {"PATH": f"{npm / 'bin'}:/usr/bin:/bin"}
    found = program_paths(["tool", str(script)], env, tmp_path, [home], tmp_path / "state")
    assert npm in found  # the prefix holding bin/ and lib/, not all of HOME
    assert script in found and home not in found
    mine = program_paths([sys.executable], dict(os.environ), tmp_path, [home], tmp_path)
    assert mine == [] or all(home not in p.parents for p in mine)
    with pytest.raises(Exception, match="not found") as e:
        program_paths(["no-such-agent"], env, tmp_path, [home], tmp_path)
    assert isinstance(e.value.__cause__, FileNotFoundError)


def test_exit_signal_reads_bubblewraps_128_plus_n() -> None:
    assert exit_signal(137) == 9 and exit_signal(143) == 15
    assert exit_signal(0) is None and exit_signal(1) is None and exit_signal(128) is None


# -- cgroup v2 ------------------------------------------------------------------------------


def fake_cgroup(tmp_path: Path, controllers: str = "memory pids", procs: str = "") -> Path:
    """A cgroup v2 tree of plain files: /proc/self/cgroup, mountinfo and the folder."""
    root = tmp_path / "cg"
    own = root / "system.slice" / "opus.service"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text(controllers + "\n")
    (own / "cgroup.subtree_control").write_text("\n")
    (own / "cgroup.procs").write_text(procs or f"{os.getpid()}\n")
    (tmp_path / "cgroup").write_text("0::/system.slice/opus.service\n")
    (tmp_path / "mountinfo").write_text(
        f"30 23 0:26 / {root} rw,nosuid shared:4 - cgroup2 cgroup2 rw\n"
    )
    return own


def find(tmp_path: Path, **kw: object) -> Delegated | str:
    return find_delegated(proc=tmp_path / "cgroup", mountinfo=tmp_path / "mountinfo", **kw)  # type: ignore[arg-type]


def test_a_delegated_cgroup_is_prepared_for_memory_limits(tmp_path: Path) -> None:
    own = fake_cgroup(tmp_path)
    found = find(tmp_path)
    assert found == Delegated(own)
    assert (own / "opus" / "cgroup.procs").read_text() == str(os.getpid())
    assert (own / "cgroup.subtree_control").read_text() == "+memory"
    child = found.child("j1-coder", "64M")
    assert child.path.parent == own and (child.path / "memory.max").read_text() == "67108864"
    assert parse_size("4G") == 4 * 2**30 and parse_size("1000") == 1000


def test_no_memory_controller_or_other_processes_say_why(tmp_path: Path) -> None:
    fake_cgroup(tmp_path, controllers="pids")
    assert "memory controller is not available" in str(find(tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    fake_cgroup(other, procs=f"{os.getpid()}\n1\n")
    assert "holds other processes" in str(find(other))
    assert isinstance(find(other, prepare=False), Delegated)  # only looking: fine
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "cgroup").write_text("4:memory:/x\n")
    (v1 / "mountinfo").write_text("")
    assert "cgroup v1 only" in str(find(v1))


class Said(logging.Handler):
    """The messages of one logger, whatever the CLI did to the ``opus`` logger before."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_memory_max_not_enforced_is_said_once_in_the_log_and_by_validate(
    vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault.write_config(sandbox='kind = "auto"\nmemory_max = "4G"')
    config = load_config(vault.config)
    if not isinstance(find_delegated(prepare=False), str):
        pytest.skip("this machine delegates a cgroup with memory to opus")
    said, logger = Said(), logging.getLogger("opus.orchestrator.sandbox")
    monkeypatch.setattr(logger, "level", logging.WARNING)
    logger.addHandler(said)
    try:
        open_sandbox(config)
    finally:
        logger.removeHandler(said)
    (message,) = [m for m in said.messages if "not enforced" in m]
    assert "4G" in message
    assert any("memory_max = '4G' is not enforced" in p for p in sandbox_problems(config))


def sandbox_for(tmp_path: Path, **kw: object) -> Sandbox:
    return Sandbox(
        bwrap=shutil.which("bwrap") or "bwrap",
        vault=tmp_path / "vault",
        state=tmp_path / "state",
        home=tmp_path / "home",
        **kw,  # type: ignore[arg-type]
    )


def agent(command: list[str], stage: Stage = Stage.TESTER) -> CommandAgent:
    return CommandAgent(AgentSection(kind="command", command=command), stage, environ=os.environ)


@needs_bwrap
@pytest.mark.anyio
async def test_memory_max_puts_the_sandbox_into_its_cgroup_before_it_starts(
    tmp_path: Path,
) -> None:
    own = fake_cgroup(tmp_path / "host")
    delegated = find(tmp_path / "host")
    assert isinstance(delegated, Delegated)
    spawned: list[int] = []
    ctx = replace(
        make_ctx(tmp_path, Stage.TESTER),
        sandbox=sandbox_for(tmp_path, memory_max="64M", cgroup=delegated),
        on_spawn=spawned.append,
    )
    (tmp_path / "home").mkdir()
    result = await agent(["true"]).run(ctx)
    assert result.passed
    (child,) = [p for p in own.iterdir() if p.name.startswith("opus-job-1-tester-")]
    assert (child / "memory.max").read_text() == str(64 * 2**20)
    assert (child / "cgroup.procs").read_text().strip() == str(spawned[0])  # bwrap's pid


@needs_bwrap
@pytest.mark.anyio
async def test_inside_a_signal_is_a_crash_and_a_missing_program_is_not_found(
    tmp_path: Path,
) -> None:
    (tmp_path / "home").mkdir()
    killed = [sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"]
    coder = replace(make_ctx(tmp_path, Stage.CODER), sandbox=sandbox_for(tmp_path))
    with pytest.raises(AgentCrashed, match="signal 9"):  # bubblewrap's 137: a crash, retried
        await agent(killed, stage=Stage.CODER).run(coder)
    ctx = replace(make_ctx(tmp_path, Stage.TESTER), sandbox=sandbox_for(tmp_path))
    # for the tester, 128 + N is an exit status like a shell's (its test run was killed):
    # bubblewrap cannot tell the two apart, and failed tests are the tester's answer
    assert (await agent(killed).run(ctx)).passed is False
    with pytest.raises(AgentNotFound, match="no-such-agent"):
        await agent(["no-such-agent"]).run(ctx)
    home_bin = tmp_path / "home" / "tools" / "bin"
    home_bin.mkdir(parents=True)
    tool = home_bin / "agent"
    tool.write_text(f"#!{sys.executable}\nimport sys; sys.exit(3)\n")
    tool.chmod(0o755)
    failed = await agent([str(tool)]).run(ctx)  # in the hidden HOME, and still runs
    assert failed.passed is False


def _cmdline_has(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and token.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@needs_bwrap
def test_recovery_kills_a_sandbox_whose_bwrap_died_first(tmp_path: Path) -> None:
    """opus SIGKILLed while bwrap sets up can leave the sandbox's init orphaned: the restart's
    ``kill_group`` of the recorded group id (bwrap's pid) ends it, its daemon included."""
    token = f"orphan-daemon-{os.getpid()}-{tmp_path.name}"
    ready = tmp_path / "ready"
    script = (
        f"setsid {sys.executable} -c 'import time; time.sleep(600)' {token} & "
        f"touch {ready}; sleep 600"
    )
    bwrap = shutil.which("bwrap") or "bwrap"
    outer = subprocess.Popen(  # no --die-with-parent: as if the signal never reached init
        [bwrap, "--ro-bind", "/", "/", "--bind", str(tmp_path), str(tmp_path), "--dev", "/dev",
         "--proc", "/proc", "--unshare-pid", "sh", "-c", script],
        start_new_session=True,
    )  # fmt: skip
    try:
        wait(lambda: ready.exists() and _cmdline_has(token), "the sandboxed daemon")
        outer.kill()
        outer.wait()
        assert _cmdline_has(token)  # orphaned: init and the daemon live on
        assert kill_group(outer.pid, grace=1.0)
        wait(lambda: not _cmdline_has(token), "the orphaned sandbox to die", timeout=10)
    finally:
        for pid in _cmdline_has(token):
            os.kill(pid, 9)
