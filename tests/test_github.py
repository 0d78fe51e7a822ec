"""GitHub pull requests: httpx.MockTransport plus one real loopback HTTP server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from opus.orchestrator.errors import DeliveryError
from opus.orchestrator.github import GitHub, GitHubError, PullRequest

TOKEN = "ghp_s3cretTOKENvalue1234567890"
PULLS = "/repos/octo/app/pulls"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pr_json(number: int = 7, state: str = "open", merged: bool = False) -> dict[str, Any]:
    return {
        "number": number,
        "html_url": f"https://github.com/octo/app/pull/{number}",
        "state": state,
        "merged": merged,
        "title": "t",
    }


class Recorder:
    """A MockTransport handler that answers from a script and records every request."""

    def __init__(self, *responses: httpx.Response | Exception) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.responses.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def client(self, token: str | None = TOKEN) -> GitHub:
        return GitHub(
            "octo/app",
            token=token,
            api_url="https://api.example.test",
            transport=httpx.MockTransport(self),
        )


def assert_no_token(exc: BaseException) -> None:
    seen: BaseException | None = exc
    while seen is not None:
        assert TOKEN not in str(seen)
        assert TOKEN not in repr(seen)
        seen = seen.__cause__ or seen.__context__


def test_bad_repository_is_rejected() -> None:
    with pytest.raises(ValueError, match="owner/name"):
        GitHub("just-a-name", token=None)


@pytest.mark.anyio
async def test_open_pr_posts_and_returns_the_pr() -> None:
    rec = Recorder(httpx.Response(201, json=pr_json(12)))
    async with rec.client() as gh:
        pr = await gh.open_pr(head="opus/fr-101", base="main", title="FR-101: x", body="# Body")
    assert pr == PullRequest(12, "https://github.com/octo/app/pull/12", "open", False)
    (req,) = rec.requests
    assert req.method == "POST"
    assert req.url.path == PULLS
    assert req.url.host == "api.example.test"
    assert json.loads(req.content) == {
        "title": "FR-101: x",
        "head": "opus/fr-101",
        "base": "main",
        "body": "# Body",
    }
    assert req.headers["Accept"] == "application/vnd.github+json"
    assert req.headers["X-GitHub-Api-Version"] == "2022-11-28"
    assert req.headers["Authorization"] == f"Bearer {TOKEN}"
    assert req.headers["User-Agent"].startswith("opus-orchestrator/")
    assert TOKEN not in str(req.url)
    assert TOKEN.encode() not in req.content


@pytest.mark.anyio
async def test_no_token_sends_no_authorization() -> None:
    rec = Recorder(httpx.Response(201, json=pr_json()))
    async with rec.client(token=None) as gh:
        await gh.open_pr(head="b", base="main", title="t", body="")
    assert "Authorization" not in rec.requests[0].headers


@pytest.mark.anyio
async def test_open_pr_422_finds_the_existing_pr() -> None:
    exists = {
        "message": "Validation Failed",
        "errors": [{"resource": "PullRequest", "code": "custom", "message": "already exists"}],
    }
    listed = [{**pr_json(5), "merged": None, "merged_at": None}]
    rec = Recorder(httpx.Response(422, json=exists), httpx.Response(200, json=listed))
    async with rec.client() as gh:
        pr = await gh.open_pr(head="opus/fr-5", base="main", title="t", body="b")
    assert pr.number == 5
    assert pr.merged is False
    lookup = rec.requests[1]
    assert lookup.method == "GET"
    assert lookup.url.path == PULLS
    assert dict(lookup.url.params) == {"head": "octo:opus/fr-5", "state": "open"}
    assert lookup.headers["Authorization"] == f"Bearer {TOKEN}"


@pytest.mark.anyio
async def test_open_pr_422_without_existing_pr_raises_githubs_message() -> None:
    body = {
        "message": "Validation Failed",
        "errors": [{"message": "No commits between main and opus/fr-9"}],
    }
    rec = Recorder(httpx.Response(422, json=body), httpx.Response(200, json=[]))
    async with rec.client() as gh:
        with pytest.raises(DeliveryError) as info:
            await gh.open_pr(head="opus/fr-9", base="main", title="t", body="b")
    assert isinstance(info.value, GitHubError)
    assert info.value.status == 422
    assert info.value.retryable is False
    assert "422" in str(info.value)
    assert "Validation Failed" in str(info.value)
    assert "No commits between main and opus/fr-9" in str(info.value)
    assert_no_token(info.value)


@pytest.mark.anyio
async def test_error_status_and_message_never_the_token() -> None:
    # Even a server that echoes the token back does not get it into the exception.
    echo = {"message": f"Bad credentials for Bearer {TOKEN}"}
    rec = Recorder(httpx.Response(401, json=echo))
    async with rec.client() as gh:
        with pytest.raises(GitHubError) as info:
            await gh.open_pr(head="b", base="main", title="t", body="")
    assert info.value.status == 401
    assert "401" in str(info.value)
    assert "Bad credentials" in str(info.value)
    assert "***" in str(info.value)
    assert_no_token(info.value)


@pytest.mark.anyio
async def test_network_error_is_retryable_and_tokenless() -> None:
    rec = Recorder(httpx.ConnectError("connection refused"))
    async with rec.client() as gh:
        with pytest.raises(GitHubError) as info:
            await gh.pr_state(3)
    assert info.value.status is None
    assert info.value.retryable is True
    assert "connection refused" in str(info.value)
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert_no_token(info.value)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "headers", "retryable"),
    [
        (502, {}, True),
        (429, {}, True),
        (403, {"x-ratelimit-remaining": "0"}, True),
        (403, {"x-ratelimit-remaining": "12"}, False),
        (404, {}, False),
    ],
)
async def test_retryable_follows_status(
    status: int, headers: dict[str, str], retryable: bool
) -> None:
    rec = Recorder(httpx.Response(status, headers=headers, json={"message": "nope"}))
    async with rec.client() as gh:
        with pytest.raises(GitHubError) as info:
            await gh.pr_state(1)
    assert info.value.status == status
    assert info.value.retryable is retryable
    assert "nope" in str(info.value)


@pytest.mark.anyio
async def test_pr_state_uses_etag_and_304() -> None:
    rec = Recorder(
        httpx.Response(200, headers={"ETag": 'W/"abc"'}, json=pr_json(8)),
        httpx.Response(304),
        httpx.Response(
            200, headers={"ETag": 'W/"def"'}, json=pr_json(8, state="closed", merged=True)
        ),
        httpx.Response(304),
    )
    async with rec.client() as gh:
        first = await gh.pr_state(8)
        cached = await gh.pr_state(8)
        merged = await gh.pr_state(8)
        again = await gh.pr_state(8)
    assert first == PullRequest(8, "https://github.com/octo/app/pull/8", "open", False)
    assert cached == first
    assert (merged.state, merged.merged) == ("closed", True)
    assert again == merged
    assert [r.url.path for r in rec.requests] == [f"{PULLS}/8"] * 4
    assert "If-None-Match" not in rec.requests[0].headers
    assert rec.requests[1].headers["If-None-Match"] == 'W/"abc"'
    assert rec.requests[2].headers["If-None-Match"] == 'W/"abc"'
    assert rec.requests[3].headers["If-None-Match"] == 'W/"def"'


@pytest.mark.anyio
async def test_etag_cache_is_per_pr() -> None:
    rec = Recorder(
        httpx.Response(200, headers={"ETag": '"one"'}, json=pr_json(1)),
        httpx.Response(200, headers={"ETag": '"two"'}, json=pr_json(2)),
        httpx.Response(304),
    )
    async with rec.client() as gh:
        await gh.pr_state(1)
        await gh.pr_state(2)
        pr1 = await gh.pr_state(1)
    assert "If-None-Match" not in rec.requests[1].headers
    assert rec.requests[2].headers["If-None-Match"] == '"one"'
    assert pr1.number == 1


@pytest.mark.anyio
async def test_merge_pr_puts_method_and_forgets_the_etag() -> None:
    rec = Recorder(
        httpx.Response(200, headers={"ETag": '"e"'}, json=pr_json(4)),
        httpx.Response(200, json={"merged": True, "sha": "abc", "message": "merged"}),
        httpx.Response(200, headers={"ETag": '"f"'}, json=pr_json(4, state="closed", merged=True)),
    )
    async with rec.client() as gh:
        await gh.pr_state(4)
        await gh.merge_pr(4, method="squash")
        after = await gh.pr_state(4)
    put = rec.requests[1]
    assert put.method == "PUT"
    assert put.url.path == f"{PULLS}/4/merge"
    assert json.loads(put.content) == {"merge_method": "squash"}
    assert "If-None-Match" not in rec.requests[2].headers
    assert after.merged is True


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "message"),
    [(405, "Pull Request is not mergeable"), (409, "Head branch was modified")],
)
async def test_merge_pr_not_mergeable(status: int, message: str) -> None:
    rec = Recorder(httpx.Response(status, json={"message": message}))
    async with rec.client() as gh:
        with pytest.raises(DeliveryError) as info:
            await gh.merge_pr(9)
    text = str(info.value)
    assert text.startswith("not mergeable: ")
    assert message in text
    assert isinstance(info.value, GitHubError)
    assert info.value.status == status
    assert json.loads(rec.requests[0].content) == {"merge_method": "merge"}
    assert_no_token(info.value)


@pytest.mark.anyio
async def test_merge_pr_other_error_and_bad_method() -> None:
    rec = Recorder(httpx.Response(403, json={"message": "Resource not accessible"}))
    async with rec.client() as gh:
        with pytest.raises(ValueError, match="merge method"):
            await gh.merge_pr(1, method="octopus")
        assert rec.requests == []
        with pytest.raises(GitHubError) as info:
            await gh.merge_pr(1)
    assert "not mergeable" not in str(info.value)
    assert "403 Resource not accessible" in str(info.value)


@pytest.mark.anyio
async def test_unexpected_body_is_a_delivery_error() -> None:
    rec = Recorder(httpx.Response(201, text="<html>proxy</html>"), httpx.Response(200, json={}))
    async with rec.client() as gh:
        with pytest.raises(GitHubError, match="not JSON"):
            await gh.open_pr(head="b", base="main", title="t", body="")
        with pytest.raises(GitHubError, match="unexpected pull request"):
            await gh.pr_state(1)


# --- a real loopback HTTP server ----------------------------------------------------------


class FakeGitHub(BaseHTTPRequestHandler):
    """Answers like GitHub: 201 for a new head, 422 + lookup for the head ``exists``."""

    seen: list[dict[str, Any]]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        entry = {
            "line": self.requestline,
            "path": self.path,
            "headers": dict(self.headers.items()),
            "body": body,
        }
        self.seen.append(entry)
        return entry

    def do_POST(self) -> None:
        entry = self._record()
        payload = json.loads(entry["body"])
        if payload["head"] == "exists":
            self._reply(422, {"message": "Validation Failed", "errors": [{"code": "custom"}]})
        else:
            self._reply(201, pr_json(31))

    def do_GET(self) -> None:
        self._record()
        self._reply(200, [pr_json(30)])


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    seen: list[dict[str, Any]] = []
    handler = type("Handler", (FakeGitHub,), {"seen": seen})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.mark.anyio
async def test_open_pr_against_a_loopback_server(
    server: tuple[str, list[dict[str, Any]]],
) -> None:
    url, seen = server
    async with GitHub("octo/app", token=TOKEN, api_url=url, timeout=5) as gh:
        new = await gh.open_pr(head="opus/fr-1", base="main", title="FR-1: one", body="body ü")
        old = await gh.open_pr(head="exists", base="main", title="t", body="b")
    assert new == PullRequest(31, pr_json(31)["html_url"], "open", False)
    assert old.number == 30
    post, post2, lookup = seen
    assert post["line"] == f"POST {PULLS} HTTP/1.1"
    assert json.loads(post["body"]) == {
        "title": "FR-1: one",
        "head": "opus/fr-1",
        "base": "main",
        "body": "body ü",
    }
    assert post["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert post["headers"]["Accept"] == "application/vnd.github+json"
    assert post["headers"]["X-GitHub-Api-Version"] == "2022-11-28"
    assert post["headers"]["User-Agent"].startswith("opus-orchestrator/")
    assert json.loads(post2["body"])["head"] == "exists"
    assert lookup["path"] == f"{PULLS}?head=octo%3Aexists&state=open"
    for entry in seen:
        # the token travels in the Authorization header and nowhere else
        others = {k: v for k, v in entry["headers"].items() if k.lower() != "authorization"}
        assert TOKEN not in entry["line"]
        assert TOKEN not in json.dumps(others)
        assert TOKEN.encode() not in entry["body"]
