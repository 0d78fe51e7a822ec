"""Notifiers: event filtering, webhook bodies, command and desktop kinds, failures, redaction."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from email.header import decode_header
from pathlib import Path
from typing import Any

import httpx
import pytest

from opus.orchestrator.config import NotifySection
from opus.orchestrator.notify import Notifier
from opus.orchestrator.redact import Redactor

LOGGER = "opus.orchestrator.notify"
SECRET = "tok-SECRET-123"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Hook:
    """A MockTransport that records requests and answers with ``status``."""

    def __init__(self, status: int = 200, error: Exception | None = None) -> None:
        self.status = status
        self.error = error
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        return httpx.Response(self.status, text="nope" if self.status >= 300 else "ok")

    def bodies(self) -> list[Any]:
        return [json.loads(r.content) for r in self.requests]


def hook(url: str, fmt: str = "json", events: list[str] | None = None) -> NotifySection:
    data: dict[str, Any] = {"kind": "webhook", "url": url, "format": fmt}
    if events is not None:
        data["events"] = events
    return NotifySection.model_validate(data)


async def send(notifier: Notifier, event: str = "review", **kw: Any) -> None:
    fields: dict[str, Any] = {
        "fr_id": "FR-1",
        "title": "Add greeting",
        "status": "review",
        "message": "ready for review",
        "job_id": "job-1",
    }
    fields.update(kw)
    await notifier.send(event, **fields)


@pytest.mark.anyio
async def test_only_notifiers_listing_the_event_get_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    h = Hook()
    sections = [
        hook("http://hooks.test/done", events=["done"]),
        hook("http://hooks.test/review", events=["review", "failed"]),
        NotifySection(kind="log", events=["failed"]),
    ]
    notifier = Notifier(sections, Redactor(), transport=h.transport)
    await send(notifier, "review")
    assert [str(r.url) for r in h.requests] == ["http://hooks.test/review"]
    assert not [r for r in caplog.records if r.name == LOGGER]
    await send(notifier, "failed", status="failed", message="agent crashed")
    assert [r.url.path for r in h.requests] == ["/review", "/review"]
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1
    assert "failed" in lines[0] and "FR-1" in lines[0] and "agent crashed" in lines[0]
    assert caplog.records[-1].levelno == logging.WARNING  # SPEC §20: a failed FR is no info
    notifier = Notifier([NotifySection(kind="log")], Redactor())
    await send(notifier, "review")
    assert caplog.records[-1].levelno == logging.INFO


@pytest.mark.anyio
async def test_webhook_json_body() -> None:
    h = Hook()
    notifier = Notifier([hook("http://hooks.test/j")], transport=h.transport)
    await send(notifier, "blocked", status="blocked", details={"reason": "tests failed"})
    assert h.requests[0].method == "POST"
    assert h.bodies() == [
        {
            "event": "blocked",
            "fr_id": "FR-1",
            "title": "Add greeting",
            "status": "blocked",
            "message": "ready for review",
            "job_id": "job-1",
            "details": {"reason": "tests failed"},
        }
    ]


@pytest.mark.anyio
async def test_webhook_slack_body() -> None:
    h = Hook()
    notifier = Notifier([hook("http://hooks.test/s", "slack")], transport=h.transport)
    await send(notifier, "done", status="done", message="merged into main")
    (body,) = h.bodies()
    assert list(body) == ["text"]
    for part in ("FR-1", "Add greeting", "done", "merged into main"):
        assert part in body["text"]


@pytest.mark.anyio
async def test_webhook_ntfy_plain_text_with_title_header() -> None:
    h = Hook()
    notifier = Notifier([hook("http://ntfy.test/opus", "ntfy")], transport=h.transport)
    await send(notifier, "review", title="Grüße – emoji ✓", message="bitte prüfen")
    (request,) = h.requests
    assert request.content.decode() == "bitte prüfen"
    assert request.headers["content-type"].startswith("text/plain")
    raw_title = request.headers["title"]
    assert raw_title.isascii()
    decoded = "".join(
        part.decode(enc or "ascii") if isinstance(part, bytes) else part
        for part, enc in decode_header(raw_title)
    )
    assert decoded == "opus: FR-1 review: Grüße – emoji ✓"
    await send(notifier, "review", title="Plain")
    assert h.requests[1].headers["title"] == "opus: FR-1 review: Plain"


@pytest.mark.anyio
async def test_failing_webhooks_warn_once_and_do_not_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    bad = Hook(status=500)
    down = Hook(error=httpx.ConnectError("connection refused"))
    good = Hook()
    sections = [hook("http://bad.test/T0KEN/path")]
    await send(Notifier(sections, transport=bad.transport))
    await send(Notifier([hook("http://down.test/x")], transport=down.transport))
    await send(Notifier([hook("http://good.test/x")], transport=good.transport))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "bad.test" in warnings[0].getMessage() and "HTTP 500" in warnings[0].getMessage()
    assert "T0KEN" not in warnings[0].getMessage()
    assert "ConnectError" in warnings[1].getMessage()
    assert len(bad.requests) == 1 and len(down.requests) == 1 and len(good.requests) == 1


RECORDER = """
import json, os, sys
out = sys.argv[1]
keep = ("KEEP", "NOTIFY_SOCKET")
env = {k: v for k, v in os.environ.items() if k.startswith("OPUS_") or k in keep}
data = {"env": env, "stdin": sys.stdin.read()}
with open(out, "w") as f:
    json.dump(data, f)
"""


def command_section(tmp_path: Path, source: str, *args: str, timeout: float = 10) -> NotifySection:
    script = tmp_path / "notifier.py"
    script.write_text(source)
    return NotifySection(
        kind="command", command=[sys.executable, str(script), *args], timeout=timeout
    )


@pytest.mark.anyio
async def test_command_notifier_gets_env_and_json_stdin(tmp_path: Path) -> None:
    out = tmp_path / "seen.json"
    section = command_section(tmp_path, RECORDER, str(out))
    environ = {"PATH": os.environ.get("PATH", ""), "KEEP": "1", "NOTIFY_SOCKET": "/run/x"}
    await send(Notifier([section], environ=environ), "failed", status="failed", message="boom")
    seen = json.loads(out.read_text())
    env = seen["env"]
    assert env["OPUS_EVENT"] == "failed"
    assert env["OPUS_FR_ID"] == "FR-1"
    assert env["OPUS_STATUS"] == "failed"
    assert env["OPUS_MESSAGE"] == "boom"
    assert env["KEEP"] == "1"
    assert "NOTIFY_SOCKET" not in env
    stdin = json.loads(seen["stdin"])
    assert stdin["event"] == "failed" and stdin["title"] == "Add greeting"
    assert stdin["job_id"] == "job-1" and stdin["details"] == {}


@pytest.mark.anyio
async def test_command_notifier_failure_and_timeout_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    failing = command_section(tmp_path, "import sys\nsys.stderr.write('no route')\nsys.exit(3)")
    await send(Notifier([failing]))
    pid_file = tmp_path / "pids"
    hanging_src = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1000)'])\n"
        "open(sys.argv[1], 'w').write(f'{os.getpid()} {child.pid}')\n"
        "time.sleep(1000)\n"
    )
    (tmp_path / "hang").mkdir()
    hanging = command_section(tmp_path / "hang", hanging_src, str(pid_file), timeout=1.0)
    await send(Notifier([hanging]))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "exited 3" in warnings[0] and "no route" in warnings[0]
    assert "timed out" in warnings[1]
    for pid in map(int, pid_file.read_text().split()):
        assert _gone_within(pid, 5.0)


def _gone_within(pid: int, seconds: float) -> bool:
    """SIGKILL was sent: give the kernel a bounded moment to end ``pid``."""
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not _alive(pid)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.anyio
async def test_desktop_uses_notify_send_from_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out = tmp_path / "argv.json"
    exe = bin_dir / "notify-send"
    exe.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(out)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    exe.chmod(0o755)
    section = NotifySection(kind="desktop")
    await send(Notifier([section], environ={"PATH": str(bin_dir)}), "review")
    assert json.loads(out.read_text()) == ["opus: FR-1 review", "ready for review"]

    caplog.set_level(logging.DEBUG, logger=LOGGER)
    empty = tmp_path / "empty"
    empty.mkdir()
    await send(Notifier([section], environ={"PATH": str(empty)}), "review")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "`notify-send` not found on PATH" in warning  # not a silent no-op


@pytest.mark.anyio
async def test_webhook_url_and_headers_from_the_environment() -> None:
    seen = Hook()
    section = NotifySection(
        kind="webhook",
        url_env="HOOK_URL",
        headers={"X-Team": "core"},
        headers_env={"Authorization": "HOOK_AUTH"},
    )
    env = {"HOOK_URL": "https://hooks.example.com/T0/secret-path", "HOOK_AUTH": "Bearer tk-9"}
    await send(Notifier([section], transport=seen.transport, environ=env), "done")
    (request,) = seen.requests
    assert str(request.url) == env["HOOK_URL"]
    assert request.headers["x-team"] == "core" and request.headers["authorization"] == "Bearer tk-9"


@pytest.mark.anyio
async def test_webhook_with_its_url_variable_unset_warns_naming_the_variable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    seen = Hook()
    section = NotifySection(kind="webhook", url_env="HOOK_URL")
    await send(Notifier([section], transport=seen.transport, environ={}), "done")
    assert seen.requests == []
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "$HOOK_URL is not set" in warning


@pytest.mark.anyio
async def test_command_notifier_placeholders(tmp_path: Path) -> None:
    out = tmp_path / "argv.json"
    script = tmp_path / "argv.py"
    script.write_text("import json, sys\nopen(sys.argv[1], 'w').write(json.dumps(sys.argv[2:]))\n")
    section = NotifySection(
        kind="command",
        command=[sys.executable, str(script), str(out), "{event}", "{fr_id}={status}", "{other}"],
    )
    await send(Notifier([section]), "failed", status="failed")
    assert json.loads(out.read_text()) == ["failed", "FR-1=failed", "{other}"]


@pytest.mark.anyio
async def test_apprise_notifier_posts_through_apprise_to_a_loopback_server() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"json://127.0.0.1:{server.server_address[1]}/notify"
        section = NotifySection(kind="apprise", url_env="APPRISE_URL")
        await send(Notifier([section], environ={"APPRISE_URL": url}), "review")
    finally:
        server.shutdown()
        server.server_close()
    (body,) = received
    assert body["title"] == "opus: FR-1 review: Add greeting"
    assert body["message"] == "ready for review"


@pytest.mark.anyio
async def test_everything_is_redacted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    h = Hook()
    out = tmp_path / "seen.json"
    sections = [
        NotifySection(kind="log"),
        hook("http://hooks.test/j"),
        hook("http://hooks.test/s", "slack"),
        command_section(tmp_path, RECORDER, str(out)),
    ]
    notifier = Notifier(sections, Redactor([SECRET]), transport=h.transport)
    await send(
        notifier,
        "failed",
        title=f"title {SECRET}",
        message=f"agent printed {SECRET}",
        details={"tail": f"Authorization: Bearer {SECRET}"},
    )
    texts = [r.content.decode() for r in h.requests] + [out.read_text()]
    texts += [r.getMessage() for r in caplog.records]
    assert len(texts) == 4
    for text in texts:
        assert SECRET not in text
        assert "***" in text
