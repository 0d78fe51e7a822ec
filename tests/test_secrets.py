"""Secrets end to end (SPEC §5.1, §6): a key known through ``api_key_env`` that agents print,
write and echo back never reaches a log line, an artifact, the registry, a note or a
notification; and agents never see opus's own secrets or service variables."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from opus.orchestrator import Orchestrator, load_config

from .conftest import Vault

SECRET = "sk-opus-test-3f9a1c77e2b84d05"
GITHUB_TOKEN = "ghp_agentsMustNotSeeThis0123456789"
OTHER = "an-unlisted-value-7788"
NOTE = "---\nid: {id}\ntitle: Thing {id}\n---\n# Thing\n\nDo {id}.\n"

LEAKY = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    stage = sys.argv[1]
    env = os.environ
    fr, iteration = env["OPUS_FR_ID"], int(env["OPUS_ITERATION"])
    key = env.get("OPUS_TEST_KEY", "")
    dump = Path(env["DUMP"]) / f"env-{stage}-{fr}-{iteration}.json"
    dump.write_text(json.dumps(dict(env)))
    sys.stdin.read()
    print(f"working with key {key}")
    print(f"stderr also shows {key}", file=sys.stderr)
    out = Path(env["OPUS_OUTPUT_FILE"])
    if stage == "planner":
        out.write_text(f"# Plan\\n\\n1. Call the API with {key}.\\n")
    elif stage == "coder":
        if fr == "FR-2":
            print(f"fatal: bad credentials {key}")
            sys.exit(1)
        (Path(env["OPUS_WORKTREE"]) / "leak.txt").write_text(f"KEY={key} ({iteration})\\n")
    elif stage == "tester":
        if fr == "FR-1" and iteration == 1:
            print(f"FAILED test_api - AssertionError: {key} rejected")
            sys.exit(1)
    """
)


class LLM(ThreadingHTTPServer):
    """An OpenAI-compatible endpoint that echoes the key back in its verdicts."""

    authorizations: list[str]


class LLMHandler(BaseHTTPRequestHandler):
    server: LLM

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.authorizations.append(self.headers.get("Authorization", ""))
        if "FR-3" in body.decode():
            verdict = {
                "verdict": "request_changes",
                "confidence": 60,
                "summary": f"The key {SECRET} is committed.",
                "issues": [
                    {"severity": "blocker", "message": f"remove {SECRET}", "file": "leak.txt"}
                ],
            }
        else:
            verdict = {
                "verdict": "approve",
                "confidence": 97,
                "summary": f"Fine, uses {SECRET} correctly.",
            }
        data = json.dumps(
            {
                "choices": [{"message": {"role": "assistant", "content": json.dumps(verdict)}}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 20},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def llm() -> Iterator[LLM]:
    server = LLM(("127.0.0.1", 0), LLMHandler)
    server.authorizations = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    name = f"@opus-test-{os.getpid()}-{threading.get_ident()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:])
    sock.setblocking(False)
    try:
        yield sock, name
    finally:
        sock.close()


def agent(stage: str, script: Path, dump: Path, passthrough: list[str]) -> str:
    return (
        f'kind = "command"\ncommand = {json.dumps([sys.executable, str(script), stage])}\n'
        f"env = {{ DUMP = {json.dumps(str(dump))} }}\n"
        f"env_passthrough = {json.dumps(passthrough)}"
    )


def files_holding(root: Path, needle: str) -> list[Path]:
    return [
        p
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and needle.encode() in p.read_bytes()
    ]


def opus_files_holding(vault: Vault, needle: str) -> list[Path]:
    """Files under the vault holding ``needle``, except what agents wrote themselves: the
    worktree's ``leak.txt`` and the agents' answer files."""
    return [
        p
        for p in files_holding(vault.root, needle)
        if p.name != "leak.txt" and not p.name.startswith("output-")
    ]


def configure(vault: Vault, tmp_path: Path, llm: LLM) -> Path:
    """Leaky command agents, the loopback LLM as reviewer, a notifier writing to a file."""
    script, dump, told = tmp_path / "leaky.py", tmp_path / "envs", tmp_path / "told.jsonl"
    script.write_text(LEAKY)
    dump.mkdir(exist_ok=True)
    notifier = f"import sys; open({str(told)!r}, 'a').write(sys.stdin.read() + '\\n')"
    notify = json.dumps([sys.executable, "-c", notifier])
    vault.write_config(
        pipeline="stage_timeout = 60\nstall_timeout = 30\nretries = 0\nmax_iterations = 2",
        **{
            "agents.planner": agent("planner", script, dump, ["OPUS_TEST_KEY"]),
            "agents.coder": agent("coder", script, dump, ["OPUS_TEST_KEY"]),
            "agents.tester": agent("tester", script, dump, ["OPUS_TEST_KEY"]),
            "agents.reviewer": (
                f'kind = "openai"\nbase_url = "http://127.0.0.1:{llm.server_address[1]}/v1"\n'
                'model = "m"\napi_key_env = "OPUS_TEST_KEY"'
            ),
            "[[notify]]": f'kind = "command"\ncommand = {notify}',
        },
    )
    assert SECRET not in vault.config.read_text()
    return told


def log_lines_holding(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


@pytest.mark.anyio
async def test_a_secret_printed_and_echoed_by_agents_is_written_nowhere(
    vault: Vault,
    tmp_path: Path,
    llm: LLM,
    notify_socket: tuple[socket.socket, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    told = configure(vault, tmp_path, llm)
    sock, sock_name = notify_socket
    environ = {**os.environ, "OPUS_TEST_KEY": SECRET, "NOTIFY_SOCKET": sock_name}
    notes = {i: vault.note(f"FR-{i}.md", NOTE.format(id=f"FR-{i}")) for i in (1, 2)}

    async with Orchestrator(load_config(vault.config), environ=environ) as orch:
        summary = await orch.run_once()
    orch.systemd.close()  # see test_the_notify_socket_is_closed_on_exit
    assert summary.statuses == {"FR-1": "review", "FR-2": "failed"}

    # the agents did handle the secret: printed it, wrote it, and the LLM got it
    assert llm.authorizations and all(a == f"Bearer {SECRET}" for a in llm.authorizations)
    leaks = list((vault.state / "worktrees").rglob("leak.txt"))
    assert leaks and all(SECRET in p.read_text() for p in leaks)
    envs = [json.loads(p.read_text()) for p in (tmp_path / "envs").iterdir()]
    assert envs and all(e["OPUS_TEST_KEY"] == SECRET for e in envs)

    # ... and it is nowhere opus writes: notes, dashboard, registry, events, artifacts
    assert opus_files_holding(vault, SECRET) == []
    logs = "".join(p.read_text() for p in (vault.state / "jobs").rglob("*.log"))
    assert "working with key ***" in logs  # redacted, not dropped
    assert "Call the API with ***" in next((vault.state / "jobs").rglob("plan.md")).read_text()
    (feedback,) = (vault.state / "jobs").rglob("feedback-2.json")  # FR-1's failed tests
    assert "AssertionError: *** rejected" in json.loads(feedback.read_text())["test_output"]
    (review,) = (vault.state / "jobs").rglob("review-2.json")  # FR-1's approval
    assert json.loads(review.read_text())["summary"] == "Fine, uses *** correctly."
    assert "error: 'coder failed: coder agent exited with status 1" in notes[2].read_text()
    assert "***" in notes[2].read_text()
    # ... nor in a notification
    sent = told.read_text()
    assert '"event": "review"' in sent and '"event": "failed"' in sent
    assert SECRET not in sent
    # ... nor in a log line
    assert caplog.records
    assert log_lines_holding(caplog, SECRET) == []
    assert SECRET not in caplog.text
    # ... nor in what went to the service manager
    datagrams = []
    while True:
        try:
            datagrams.append(sock.recv(65536).decode())
        except BlockingIOError:
            break
    assert any("STOPPING=1" in d for d in datagrams)
    assert not any(SECRET in d for d in datagrams)


@pytest.mark.anyio
async def test_a_reviewer_echoing_the_secret_in_its_issues_leaks_nothing(
    vault: Vault, tmp_path: Path, llm: LLM, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    told = configure(vault, tmp_path, llm)
    note = vault.note("FR-3.md", NOTE.format(id="FR-3"))
    environ = {**os.environ, "OPUS_TEST_KEY": SECRET}
    async with Orchestrator(load_config(vault.config), environ=environ) as orch:
        summary = await orch.run_once()
    assert summary.statuses == {"FR-3": "blocked"}
    assert "***" in note.read_text() and SECRET not in note.read_text()
    assert SECRET not in told.read_text()
    assert log_lines_holding(caplog, SECRET) == []
    assert opus_files_holding(vault, SECRET) == []


@pytest.mark.anyio
async def test_an_agents_answer_file_keeps_no_secret(
    vault: Vault, tmp_path: Path, llm: LLM
) -> None:
    configure(vault, tmp_path, llm)
    vault.note("FR-1.md", NOTE.format(id="FR-1"))
    environ = {**os.environ, "OPUS_TEST_KEY": SECRET}
    async with Orchestrator(load_config(vault.config), environ=environ) as orch:
        job = await orch.process("FR-1")
    assert job.status.value == "review"
    assert files_holding(vault.state / "jobs", SECRET) == []


@pytest.mark.anyio
async def test_log_lines_of_opus_modules_are_redacted(
    vault: Vault, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    vault.write_config(
        **{"agents.reviewer": 'kind = "openai"\nmodel = "m"\napi_key_env = "OPUS_TEST_KEY"'}
    )
    environ = {**os.environ, "OPUS_TEST_KEY": SECRET}
    async with Orchestrator(load_config(vault.config), environ=environ):
        logging.getLogger("opus").warning("top: %s", SECRET)
        logging.getLogger("opus.orchestrator.pipeline").warning("child: %s", SECRET)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("top")] == [
        "top: ***"
    ]
    assert log_lines_holding(caplog, SECRET) == []


def unix_sockets() -> int:
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            count += str(fd.readlink()).startswith("socket:")
        except OSError:
            pass
    return count


@pytest.mark.anyio
async def test_the_notify_socket_is_closed_on_exit(
    vault: Vault, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, name = notify_socket
    before = unix_sockets()
    orch = Orchestrator(load_config(vault.config), environ={**os.environ, "NOTIFY_SOCKET": name})
    try:
        async with orch:
            pass
        assert sock.recv(1024) == b"STOPPING=1"
        assert unix_sockets() == before
    finally:
        orch.systemd.close()


@pytest.mark.anyio
async def test_agents_get_a_scrubbed_environment(vault: Vault, tmp_path: Path) -> None:
    script, dump = tmp_path / "leaky.py", tmp_path / "envs"
    script.write_text(LEAKY)
    dump.mkdir()
    vault.write_config(
        **{
            "agents.planner": agent("planner", script, dump, []),
            "agents.coder": agent(
                "coder",
                script,
                dump,
                ["OPUS_TEST_KEY", "GITHUB_TOKEN", "GH_TOKEN", "NOTIFY_SOCKET", "PYTHONPATH"],
            ),
        }
    )
    environ = {
        **os.environ,
        "OPUS_TEST_KEY": SECRET,
        "GITHUB_TOKEN": GITHUB_TOKEN,
        "GH_TOKEN": GITHUB_TOKEN,
        "NOTIFY_SOCKET": "/run/nowhere/notify",
        "WATCHDOG_USEC": "60000000",
        "LISTEN_FDS": "1",
        "PYTHONPATH": str(tmp_path / "nowhere"),
        "PYTHONHOME": str(tmp_path / "nowhere"),
        "VIRTUAL_ENV": str(tmp_path / "venv"),
        "UNLISTED": OTHER,
    }
    vault.note("FR-1.md", NOTE.format(id="FR-1"))
    async with Orchestrator(load_config(vault.config), environ=environ) as orch:
        job = await orch.process("FR-1")
    assert job.status.value == "review"
    planner = json.loads((dump / "env-planner-FR-1-1.json").read_text())
    coder = json.loads((dump / "env-coder-FR-1-1.json").read_text())
    never = {
        "GITHUB_TOKEN",
        "GH_TOKEN",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "LISTEN_FDS",
        "PYTHONPATH",
        "PYTHONHOME",
        "VIRTUAL_ENV",
        "UNLISTED",
    }
    for env in (planner, coder):
        assert never.isdisjoint(env), never & set(env)
        assert GITHUB_TOKEN not in json.dumps(env) and OTHER not in json.dumps(env)
        assert env["GIT_TERMINAL_PROMPT"] == "0" and env["NO_COLOR"] == "1"
        assert env["OPUS_FR_ID"] == "FR-1" and env["PATH"] == os.environ["PATH"]
    assert "OPUS_TEST_KEY" not in planner  # not listed: not passed
    assert coder["OPUS_TEST_KEY"] == SECRET  # listed in env_passthrough
