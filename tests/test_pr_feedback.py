"""GitHub reactions end to end (SPEC §15): a real push to a bare remote, a real loopback HTTP
server standing in for the REST API with reviews, comments, check runs and statuses (and
ETags), and the Orchestrator's review poll turning what it finds into rework rounds."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from opus.orchestrator import Orchestrator, load_config
from opus.orchestrator.pr_feedback import OPUS_MARK

from .conftest import Vault, git

TOKEN = "ghp_FAKEtoken0123456789abcdefSECRET"
REPO = "/repos/acme/app"
NOTE = "---\nid: {id}\ntitle: Thing {id}\n---\n# Thing\n\nDo {id}.\n"


def stamp(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0


@dataclass
class FakeGitHub:
    """Pulls, reviews, comments, checks and statuses of ``acme/app``, with ETags."""

    remote: Path
    url: str = ""
    prs: dict[int, dict[str, Any]] = field(default_factory=dict)
    reviews: list[dict[str, Any]] = field(default_factory=list)
    line_comments: list[dict[str, Any]] = field(default_factory=list)
    talk: list[dict[str, Any]] = field(default_factory=list)
    check_runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    statuses: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    limit: tuple[int, dict[str, str]] | None = None
    """When set, every request is answered with this status and these headers."""
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_id: int = 100

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def head(self, pr: int = 1) -> str:
        return git(self.remote, "rev-parse", f"refs/heads/{self.prs[pr]['head']['ref']}")

    def review(self, state: str, body: str, *, user: str = "alice", **extra: Any) -> int:
        rid = self.new_id()
        self.reviews.append(
            {
                "id": rid,
                "user": {"login": user, "type": extra.pop("type", "User")},
                "state": state,
                "body": body,
                "submitted_at": extra.pop("at", stamp()),
                "html_url": f"https://github.example/review/{rid}",
            }
        )
        return rid

    def comment(
        self, body: str, path: str | None = None, line: int | None = None, **extra: Any
    ) -> int:
        cid = self.new_id()
        item = {
            "id": cid,
            "user": {"login": extra.pop("user", "bob"), "type": extra.pop("type", "User")},
            "body": body,
            "created_at": extra.pop("at", stamp()),
            **extra,
        }
        if path is None:
            self.talk.append(item)
        else:
            self.line_comments.append({**item, "path": path, "line": line})
        return cid

    def fail_check(self, sha: str, name: str, conclusion: str = "failure", **output: str) -> int:
        cid = self.new_id()
        self.check_runs.setdefault(sha, []).append(
            {
                "id": cid,
                "name": name,
                "status": "completed",
                "conclusion": conclusion,
                "output": output,
                "html_url": f"https://github.example/runs/{cid}",
            }
        )
        return cid

    def requests_since(self, mark: int) -> list[Seen]:
        with self.lock:
            return self.seen[mark:]

    def answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Any:
        path = urlsplit(target).path
        seen = Seen(method, path, headers)
        with self.lock:
            self.seen.append(seen)
            if self.limit is not None:
                seen.status = self.limit[0]
                return self.limit[0], {"message": "API rate limit exceeded"}, self.limit[1]
            status, data = self._route(method, path, body)
        if method == "GET" and status == 200:
            etag = '"' + hashlib.sha1(json.dumps(data).encode()).hexdigest() + '"'
            if headers.get("If-None-Match") == etag:
                seen.status = 304
                return 304, None, {"ETag": etag}
            seen.status = 200
            return 200, data, {"ETag": etag}
        seen.status = status
        return status, data, {}

    def _route(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        pulls = f"{REPO}/pulls"
        if method == "POST" and path == pulls:
            data = json.loads(body)
            for pr in self.prs.values():
                if pr["head"]["ref"] == data["head"] and pr["state"] == "open":
                    return 422, {"message": "Validation Failed"}
            number = len(self.prs) + 1
            pr = {
                "number": number,
                "html_url": f"https://github.example/acme/app/pull/{number}",
                "state": "open",
                "merged": False,
                "head": {"ref": data["head"], "label": f"acme:{data['head']}"},
            }
            self.prs[number] = pr
            return 201, pr
        if method == "GET" and path == pulls:
            return 200, list(self.prs.values())
        match = re.fullmatch(pulls + r"/(\d+)(/\w+)?", path)
        if match and int(match.group(1)) in self.prs:
            number, tail = int(match.group(1)), match.group(2)
            if method == "GET" and tail is None:
                pr = self.prs[number]
                return 200, {**pr, "head": {**pr["head"], "sha": self.head(number)}}
            if method == "GET" and tail == "/reviews":
                return 200, self.reviews
            if method == "GET" and tail == "/comments":
                return 200, self.line_comments
            if method == "PATCH" and tail is None:  # a round delivers again: the PR updated
                self.prs[number].update(json.loads(body))
                return 200, self.prs[number]
            if method == "PUT" and tail == "/merge":
                self.prs[number].update(state="closed", merged=True)
                return 200, {"merged": True}
        if method == "GET" and re.fullmatch(rf"{REPO}/issues/\d+/comments", path):
            return 200, self.talk
        match = re.fullmatch(rf"{REPO}/commits/(\w+)/(check-runs|status)", path)
        if method == "GET" and match:
            sha, what = match.groups()
            if what == "check-runs":
                runs = self.check_runs.get(sha, [])
                return 200, {"total_count": len(runs), "check_runs": runs}
            statuses = self.statuses.get(sha, [])
            states = {s["state"] for s in statuses}
            combined = "failure" if states & {"failure", "error"} else "success"
            return 200, {"state": combined if statuses else "pending", "statuses": statuses}
        return 404, {"message": "Not Found"}


class Handler(BaseHTTPRequestHandler):
    server: Server

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        status, data, headers = self.server.github.answer(
            self.command, self.path, dict(self.headers.items()), self.rfile.read(length)
        )
        body = b"" if data is None else json.dumps(data).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Server(ThreadingHTTPServer):
    github: FakeGitHub


@pytest.fixture
def github(vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGitHub]:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    bare = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    git(vault.repo, "remote", "add", "origin", str(bare))
    server = Server(("127.0.0.1", 0), Handler)
    server.github = FakeGitHub(remote=bare, url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.github
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def configure(vault: Vault, github: FakeGitHub, *, ci: bool = True, reacts: bool = True) -> None:
    vault.write_config(
        delivery=(
            f'kind = "github"\nrepository = "acme/app"\nremote = "origin"\napi_url = "{github.url}"'
        ),
        reactions=f"github = {str(reacts).lower()}\nci = {str(ci).lower()}\nmax_rounds = 3",
    )


class Now:
    """The Orchestrator's clock: real time plus an offset a test moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        now = datetime.now() + self.offset
        return now.replace(microsecond=now.microsecond // 1000 * 1000)


def orchestrator(vault: Vault, now: Now | None = None) -> Orchestrator:
    environ = {**os.environ, "GITHUB_TOKEN": TOKEN}
    return Orchestrator(load_config(vault.config), environ=environ, now=now or Now())


def registry_job(vault: Vault, fr_id: str = "FR-1") -> dict[str, Any]:
    jobs = json.loads((vault.state / "registry.json").read_text())["jobs"]
    (job,) = [j for j in jobs if j["fr_id"] == fr_id]
    assert isinstance(job, dict)
    return job


def coder_feedback(vault: Vault, round_: int) -> str:
    """The feedback file the coder was given in its first iteration of round ``round_``."""
    job = registry_job(vault)
    path = vault.state / "jobs" / job["id"] / f"feedback-r{round_}-1.json"
    runs = [c for c in vault.runs("coder") if c["feedback"] == str(path)]
    assert runs, f"no coder run was given {path.name}"
    message = json.loads(path.read_text())["message"]
    assert isinstance(message, str)
    return message


async def to_review(vault: Vault) -> Orchestrator:
    vault.note("FR-1.md", NOTE.format(id="FR-1"))
    async with orchestrator(vault) as orch:
        assert (await orch.run_once()).statuses == {"FR-1": "review"}
    return orch


@pytest.mark.anyio
async def test_a_review_requesting_changes_starts_a_round_with_its_comments(
    vault: Vault, github: FakeGitHub
) -> None:
    configure(vault, github)
    await to_review(vault)
    first_head = github.head()
    github.review("CHANGES_REQUESTED", "Please rename `thing` to `widget`.")
    github.comment("This loop is off by one.", "src/app.py", 12)
    github.comment("Call it once.", "src/util.py", 3)
    github.comment("Also add a changelog line, please.")  # the conversation
    github.comment(
        "stale remark", "src/app.py", 1, at=stamp(datetime.now(UTC) - timedelta(hours=2))
    )
    github.comment("[bot] coverage 81%", type="Bot")
    github.comment(f"{OPUS_MARK}\nopus's own note")
    github.review("APPROVED", "")
    async with orchestrator(vault) as orch:
        summary = await orch.run_once()
    assert summary.statuses == {"FR-1": "review"}
    job = registry_job(vault)
    assert job["round"] == 2
    assert job["rounds"][0]["source"] == "github-review"
    feedback = coder_feedback(vault, 2)
    assert "Please rename `thing` to `widget`." in feedback
    assert "`src/app.py` line 12 (@bob):" in feedback and "off by one" in feedback
    assert "`src/util.py` line 3" in feedback
    assert "changelog line" in feedback
    for noise in ("stale remark", "coverage 81%", "opus's own note"):
        assert noise not in feedback
    # delivered again: the same PR, a new head
    assert len(github.prs) == 1 and github.head() != first_head


@pytest.mark.anyio
async def test_a_failed_check_run_starts_a_round_with_its_name_and_summary(
    vault: Vault, github: FakeGitHub
) -> None:
    configure(vault, github, ci=True, reacts=False)
    await to_review(vault)
    sha = github.head()
    github.fail_check(
        sha, "unit tests", "failure", title="2 tests failed", summary="test_a failed", text="E x"
    )
    github.fail_check(sha, "docs", "success")
    github.statuses[sha] = [
        {"id": 1, "context": "ci/lint", "state": "error", "description": "lint crashed"}
    ]
    github.review("CHANGES_REQUESTED", "ignored: github = false")
    async with orchestrator(vault) as orch:
        assert (await orch.run_once()).statuses == {"FR-1": "review"}
    job = registry_job(vault)
    assert job["round"] == 2 and job["rounds"][0]["source"] == "ci"
    feedback = coder_feedback(vault, 2)
    assert "### unit tests (failure)" in feedback
    assert "2 tests failed" in feedback and "test_a failed" in feedback and "E x" in feedback
    assert "ci/lint (error)" in feedback and "lint crashed" in feedback
    assert "docs" not in feedback and "ignored" not in feedback


@pytest.mark.anyio
async def test_checks_still_running_wait_for_the_rest(vault: Vault, github: FakeGitHub) -> None:
    configure(vault, github, ci=True, reacts=False)
    await to_review(vault)
    sha = github.head()
    github.fail_check(sha, "unit tests")
    github.check_runs[sha].append(
        {"id": 9, "name": "e2e", "status": "in_progress", "conclusion": None, "output": {}}
    )
    async with orchestrator(vault) as orch:
        await orch.run_once()
    assert registry_job(vault)["round"] == 1
    github.check_runs[sha][-1].update(status="completed", conclusion="timed_out")
    async with orchestrator(vault) as orch:
        await orch.run_once()
    feedback = coder_feedback(vault, 2)
    assert "unit tests (failure)" in feedback and "e2e (timed_out)" in feedback


@pytest.mark.anyio
async def test_no_double_reaction_after_a_restart_and_304s_in_review(
    vault: Vault, github: FakeGitHub
) -> None:
    configure(vault, github)
    await to_review(vault)
    github.review("CHANGES_REQUESTED", "Rename it.")
    async with orchestrator(vault) as orch:
        await orch.run_once()
        assert registry_job(vault)["round"] == 2
        await orch.run_once()  # the first poll of round 2's delivery: new head, new `since`
        # and again: one request set, every answer a 304
        mark = len(github.seen)
        await orch.run_once()
        polled = github.requests_since(mark)
    # the review is still there, and still after a delivery opus made; a restart rebuilds
    # the Orchestrator on the same state folder and must not act on it again
    async with orchestrator(vault) as orch:
        mark = len(github.seen)
        assert (await orch.run_once()).statuses == {"FR-1": "review"}
        cold = github.requests_since(mark)
    job = registry_job(vault)
    assert job["round"] == 2
    assert len(vault.runs("coder")) == 2  # round 1 and round 2, no third
    assert [s.path for s in polled] == [
        f"{REPO}/pulls/1",
        f"{REPO}/pulls/1/reviews",
        f"{REPO}/pulls/1/comments",
        f"{REPO}/issues/1/comments",
        f"{REPO}/commits/{github.head()}/check-runs",
        f"{REPO}/commits/{github.head()}/status",
    ]
    assert {s.status for s in polled} == {304}
    assert len(cold) == 6 and {s.status for s in cold} == {200}
    assert any(k.startswith("github-review:") for k in job["reacted"])


@pytest.mark.anyio
async def test_a_rate_limit_backs_off_until_reset(vault: Vault, github: FakeGitHub) -> None:
    configure(vault, github)
    await to_review(vault)
    now = Now()
    reset = int((datetime.now() + timedelta(minutes=10)).timestamp())
    github.limit = (403, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset)})
    async with orchestrator(vault, now) as orch:
        mark = len(github.seen)
        await orch.run_once()
        assert len(github.requests_since(mark)) == 1  # refused once; nothing more sent
        github.limit = None
        github.review("CHANGES_REQUESTED", "Rename it.")
        mark = len(github.seen)
        await orch.run_once()
        assert github.requests_since(mark) == []  # still before the reset: no request
        assert registry_job(vault)["round"] == 1
        now.offset = timedelta(minutes=11)
        await orch.run_once()
    assert registry_job(vault)["round"] == 2
    assert "Rename it." in coder_feedback(vault, 2)


@pytest.mark.anyio
async def test_a_comment_posted_while_a_round_works_starts_the_next_round(
    vault: Vault, github: FakeGitHub
) -> None:
    """SPEC §15: comments "posted since the last delivery" — one posted while round 2's coder
    worked (before round 2 delivered) is not lost: it starts round 3."""
    configure(vault, github)
    vault.script({"FR-1": {"coder@2": [{"sleep": 2.05, "write": {"r2.txt": "two\n"}}]}})
    await to_review(vault)
    github.review("CHANGES_REQUESTED", "Please rename it.")
    async with orchestrator(vault) as orch:
        assert (await orch.run_once()).statuses == {"FR-1": "review"}
    job = registry_job(vault)
    assert job["round"] == 2
    started = datetime.fromisoformat(job["rounds"][-1]["started_at"]).astimezone(UTC)
    delivered = datetime.fromisoformat(job["history"][-1]["started_at"]).astimezone(UTC)
    # a whole second after round 2 began, before its delivery (GitHub's times have seconds)
    during = started.replace(microsecond=0) + timedelta(seconds=1)
    assert during < delivered.replace(microsecond=0)
    github.comment("While you were at it: keep the old name as an alias.", at=stamp(during))
    async with orchestrator(vault) as orch:
        assert (await orch.run_once()).statuses == {"FR-1": "review"}
    assert registry_job(vault)["round"] == 3
    assert "keep the old name as an alias" in coder_feedback(vault, 3)
