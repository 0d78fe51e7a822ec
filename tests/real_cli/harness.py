"""The real-CLI suite's shared parts: scripted loopback model servers and a world to run in.

A test builds a :class:`World` (a real git repo with a tiny Python package whose test fails
until the coder writes ``calc/farewell.py``; a vault with ``opus.toml`` and one FR note; an
isolated HOME for the CLI's own config), starts a :class:`ScriptedServer` subclass speaking
its vendor's API, points the CLI at it, and runs the real ``opus run --once``.

Every server plays the same model, :func:`next_step`: the stage comes from the prompt
(:func:`stage_of`: opus's instructions say "You are the **planner**" …), how far the
conversation is from the number of tool results the CLI sent back. The planner and the
reviewer first try to write a file (the CLI's write tool, then its shell tool) — both must
be refused — then answer; the coder writes ``calc/farewell.py``, runs the tests and commits
through the shell tool, then says it is done.
"""

from __future__ import annotations

import abc
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from .install import executable

__all__ = (
    "COMMIT_MESSAGE",
    "FAREWELL_FILE",
    "PLAN_TEXT",
    "PROBES",
    "PUSH_COMMAND",
    "Request",
    "Response",
    "RunResult",
    "ScriptedServer",
    "Step",
    "World",
    "closed_port",
    "executable",
    "next_step",
    "sse",
    "stage_of",
)

# -- the model script ------------------------------------------------------------------

STAGES = ("planner", "coder", "tester", "reviewer")
FAREWELL_FILE = "calc/farewell.py"
FAREWELL_CODE = 'def farewell(name: str) -> str:\n    return f"Goodbye, {name}!"\n'
COMMIT_MESSAGE = "Add farewell()"
PLAN_TEXT = (
    "## Plan\n\n1. Add `calc/farewell.py` with `farewell(name)` returning "
    '"Goodbye, NAME!".\n2. The existing test `tests/test_farewell.py` covers it.\n'
)
VERDICT = {
    "verdict": "approve",
    "confidence": 95,
    "summary": "farewell() is added as asked and the test passes.",
    "issues": [],
}
PROBES = {
    "planner": ("planner-wrote.txt", "planner-shell.txt"),
    "reviewer": ("reviewer-wrote.txt", "reviewer-shell.txt"),
}
"""Per read-only stage: the file its write tool tries to create, the one its shell tool
tries to create. Neither may exist anywhere after the run."""


@dataclass(frozen=True)
class Step:
    """One model turn: a tool call (``tool`` = "write" or "shell") or a final text."""

    text: str = ""
    tool: str | None = None
    path: str = ""
    content: str = ""
    command: str = ""


def stage_of(text: str) -> str | None:
    """The opus stage whose instructions ``text`` (a request body, flattened) contains."""
    for stage in STAGES:
        if f"You are the **{stage}**" in text:
            return stage
    return None


PUSH_COMMAND = "git push origin HEAD:refs/heads/pushed-by-the-coder"


def next_step(stage: str, done: int, *, push: bool = False) -> Step:
    """What the model says in ``stage`` after ``done`` tool results came back.

    ``push``: the coder also tries ``git push`` to the world's ``origin`` (must be refused:
    :meth:`World.pushed` stays empty)."""
    if stage in PROBES:
        wrote, shelled = PROBES[stage]
        answer = PLAN_TEXT if stage == "planner" else json.dumps(VERDICT)
        steps = [
            Step(tool="write", path=wrote, content="a read-only stage wrote this\n"),
            Step(tool="shell", command=f"echo shell > {shelled}"),
            Step(text=answer),
        ]
    elif stage == "coder":
        steps = [
            Step(tool="write", path=FAREWELL_FILE, content=FAREWELL_CODE),
            Step(
                tool="shell",
                command=f"python -m pytest -q && git add -A && git commit -q -m '{COMMIT_MESSAGE}'",
            ),
            *([Step(tool="shell", command=PUSH_COMMAND)] if push else []),
            Step(text="Added calc/farewell.py; the tests pass and the change is committed."),
        ]
    else:
        steps = [Step(text="nothing to do")]
    return steps[min(done, len(steps) - 1)]


# -- loopback servers ------------------------------------------------------------------


@dataclass
class Request:
    """One request a server received."""

    method: str
    path: str
    """Without the query string."""
    query: dict[str, list[str]]
    headers: dict[str, str]
    """Lower-case names."""
    body: bytes
    json: Any
    """The body parsed as JSON, or None."""

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    @classmethod
    def sse(cls, events: Iterable[tuple[str | None, Any]]) -> Response:
        return cls(200, sse(events), {"Content-Type": "text/event-stream"})


def sse(events: Iterable[tuple[str | None, Any]]) -> bytes:
    """Server-sent events: ``(event name or None, data)``; data a str or JSON-dumped."""
    out = []
    for name, data in events:
        head = f"event: {name}\n" if name else ""
        body = data if isinstance(data, str) else json.dumps(data)
        out.append(f"{head}data: {body}\n\n")
    return "".join(out).encode()


class ScriptedServer(abc.ABC):
    """A ThreadingHTTPServer on 127.0.0.1 in a thread that records each request.

    Subclasses answer in :meth:`respond`. ``fail`` set to a Response makes every request
    (but ``HEAD``) get it, to play a broken model endpoint.
    """

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.fail: Response | None = None
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @abc.abstractmethod
    def respond(self, request: Request) -> Response:
        """The answer to one request (what a model would send)."""

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def model_requests(self) -> list[Request]:
        """The requests that asked for a model answer (POST with a JSON body)."""
        return [r for r in self.requests if r.method == "POST" and r.json is not None]

    def stage_requests(self, stage: str) -> list[Request]:
        return [r for r in self.model_requests() if stage_of(r.text) == stage]

    def __enter__(self) -> ScriptedServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                try:
                    doc = json.loads(body) if body else None
                except ValueError:
                    doc = None
                parts = urlsplit(self.path)
                request = Request(
                    self.command,
                    parts.path,
                    parse_qs(parts.query),
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                    doc,
                )
                with server._lock:
                    server.requests.append(request)
                if server.fail is not None and self.command != "HEAD":
                    response = server.fail
                else:
                    try:
                        response = server.respond(request)
                    except Exception as e:  # a bug in a script: say so to the CLI and the test
                        response = Response.json({"error": f"scripted server: {e!r}"}, 500)
                self.send_response(response.status)
                for key, value in response.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(response.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(response.body)
                    self.wfile.flush()

            do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _handle

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._httpd is not None and self._thread is not None
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- the world: repo, vault, HOME, opus run --once ---------------------------------------

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test Person",
    "GIT_AUTHOR_EMAIL": "person@example.com",
    "GIT_COMMITTER_NAME": "Test Person",
    "GIT_COMMITTER_EMAIL": "person@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
}
FR_ID = "FR-1"
FR_NOTE = """\
---
id: FR-1
title: Say goodbye
priority: high
---
# Say goodbye

Add a module `calc/farewell.py` with a function `farewell(name)` that returns
`"Goodbye, NAME!"`. The test `tests/test_farewell.py` already checks it.
"""


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def toml_table(name: str, keys: Mapping[str, Any]) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items()) + "\n"


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


class World:
    """A repo, a vault with one FR and an isolated HOME under ``root``."""

    def __init__(self, root: Path, cli: str) -> None:
        self.root = root
        self.cli = cli
        self.repo = root / "app"
        self.vault = root / "vault"
        self.home = root / "home"
        self.home.mkdir(parents=True)
        self.note = self.vault / "10_features" / "03_planned" / f"{FR_ID}.md"
        self._make_repo()
        self._make_vault()

    # -- building --

    def git(self, *args: str, cwd: Path | None = None) -> str:
        return subprocess.run(
            ["git", *args],
            cwd=cwd or self.repo,
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, **GIT_ENV, "GIT_CONFIG_GLOBAL": os.devnull},
        ).stdout.strip()

    def _make_repo(self) -> None:
        files = {
            "README.md": "# calc\n",
            "calc/__init__.py": '"""A tiny package the agents work on."""\n',
            "tests/test_farewell.py": textwrap.dedent("""\
                from calc.farewell import farewell


                def test_farewell() -> None:
                    assert farewell("Ann") == "Goodbye, Ann!"
                """),
            "pyproject.toml": '[tool.pytest.ini_options]\npythonpath = ["."]\n',
            ".gitignore": "__pycache__/\n.pytest_cache/\n",
        }
        for name, text in files.items():
            path = self.repo / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self.git("init", "-q", "-b", "main", cwd=self.repo)
        # the agents' and opus's commits need an identity wherever HOME is (worktrees share it)
        self.git("config", "user.name", "Test Person")
        self.git("config", "user.email", "person@example.com")
        self.git("add", "-A")
        self.git("commit", "-q", "-m", "initial")
        self.remote = self.root / "origin.git"
        self.git("init", "-q", "--bare", str(self.remote), cwd=self.root)
        self.git("remote", "add", "origin", str(self.remote))

    def _make_vault(self) -> None:
        self.note.parent.mkdir(parents=True)
        self.note.write_text(FR_NOTE)

    def configure(
        self,
        agent: Mapping[str, Any],
        *,
        stages: Mapping[str, Mapping[str, Any]] | None = None,
        pipeline: Mapping[str, Any] | None = None,
        extra: str = "",
    ) -> Path:
        """Write opus.toml: planner, coder and reviewer get ``agent`` (kind, env, args, …)
        updated by ``stages[stage]``; the tester runs pytest. Returns the file."""
        python_bin = str(Path(sys.executable).parent)
        text = toml_table("vault", {"planned": "10_features/03_planned", "dashboard": ""})
        text += toml_table("repos.app", {"path": str(self.repo), "base": "main"})
        text += toml_table("polling", {"watch": False, "active": 0.2, "idle_max": 1})
        text += toml_table(
            "pipeline",
            {
                "max_iterations": 1,
                "stage_timeout": 120,
                "stall_timeout": 30,
                "retries": 1,
                **(pipeline or {}),
            },
        )
        for stage in ("planner", "coder", "reviewer"):
            keys = {**agent, **(stages or {}).get(stage, {})}
            text += toml_table(f"agents.{stage}", keys)
        text += toml_table(
            "agents.tester",
            {"kind": "command", "command": [f"{python_bin}/python", "-m", "pytest", "-q"]},
        )
        path = self.vault / "opus.toml"
        path.write_text(text + extra)
        return path

    def write_home(self, relative: str, content: str | Mapping[str, Any]) -> Path:
        """A file of the CLI's own config under the isolated HOME."""
        path = self.home / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
        return path

    # -- running --

    def env(self) -> dict[str, str]:
        cli = executable(self.cli)
        assert cli is not None, f"{self.cli} is not installed"
        path = [str(cli.parent), str(Path(sys.executable).parent), os.environ.get("PATH", "")]
        keep = {k: v for k, v in os.environ.items() if k in ("LANG", "TERM", "TMPDIR", "USER")}
        return {
            **keep,
            **GIT_ENV,
            "HOME": str(self.home),
            "PATH": os.pathsep.join(path),
            "GIT_CONFIG_GLOBAL": os.devnull,
        }

    def run_once(self, timeout: float = 600, env: Mapping[str, str] | None = None) -> RunResult:
        """The real ``opus run --once`` in a child process, from the vault."""
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "opus", "run", "--once", "--config", str(self.config)],
            cwd=self.vault,
            env={**self.env(), **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return RunResult(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)

    @property
    def config(self) -> Path:
        return self.vault / "opus.toml"

    # -- reading --

    def frontmatter(self) -> dict[str, Any]:
        text = self.note.read_text()
        assert text.startswith("---\n"), text[:200]
        head = text[4:].split("\n---", 1)[0]
        data = yaml.safe_load(head)
        assert isinstance(data, dict)
        return data

    def registry(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.vault / ".opus" / "registry.json").read_text())
        return data

    def job(self) -> dict[str, Any]:
        jobs = [j for j in self.registry()["jobs"] if j["fr_id"] == FR_ID]
        assert jobs, "no job for the FR in the registry"
        job: dict[str, Any] = jobs[-1]
        return job

    def checkpoints(self, stage: str) -> list[dict[str, Any]]:
        return [c for c in self.job()["history"] if c["stage"] == stage]

    def job_files(self) -> Path:
        return self.vault / ".opus" / "jobs" / self.job()["id"]

    def state_problems(self) -> list[str]:
        """What the run left against SPEC §8 under the real CLI: a file of the job's folder
        (the CLI's answer in ``output-*`` included) readable by others, or a checkpoint
        whose ``artifact`` is missing. Empty when all is well."""
        folder = self.job_files()
        loose = [
            f"{p.name} is {oct(p.stat().st_mode & 0o777)}"
            for p in sorted(folder.iterdir())
            if p.is_file() and p.stat().st_mode & 0o077
        ]
        missing = [
            f"{c['stage']} checkpoint names a missing {c['artifact']}"
            for c in self.job()["history"]
            if c["artifact"] and not (folder / c["artifact"]).is_file()
        ]
        return loose + missing

    def branch(self) -> str:
        return str(self.frontmatter().get("branch") or self.job()["branch"])

    def commits(self, branch: str | None = None) -> list[str]:
        """Subjects of the branch's commits on top of main, newest first."""
        out = self.git("log", "--format=%s", f"main..{branch or self.branch()}")
        return out.splitlines()

    def branch_files(self, branch: str | None = None) -> list[str]:
        out = self.git("ls-tree", "-r", "--name-only", branch or self.branch())
        return out.splitlines()

    def show(self, path: str, branch: str | None = None) -> str:
        return self.git("show", f"{branch or self.branch()}:{path}")

    def pushed(self) -> list[str]:
        """The branches in ``origin`` (an agent may never push; opus's local delivery neither)."""
        return self.git("branch", "--format=%(refname:short)", cwd=self.remote).splitlines()

    def stray(self, names: Iterable[str]) -> list[Path]:
        """Any file of ``names`` anywhere under the world's root (the probes must not exist)."""
        wanted = set(names)
        return [p for p in _walk(self.root) if p.name in wanted]


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in (".git", "node_modules")]
        for name in filenames:
            yield Path(dirpath) / name
