"""GitHub's review and CI listings, conditional requests shared across clients, and the
rate-limit back-off (httpx.MockTransport; the end-to-end rounds are in test_pr_feedback)."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest

from opus.orchestrator.github import GitHub, RateLimited, ResponseCache

REPO = "/repos/octo/app"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self, *responses: httpx.Response) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.responses.pop(0)

    def client(self, cache: ResponseCache, clock: Clock) -> GitHub:
        return GitHub(
            "octo/app",
            token="t0ken",
            api_url="https://api.example.test",
            transport=httpx.MockTransport(self),
            cache=cache,
            clock=clock,
        )


REVIEW = {
    "id": 11,
    "user": {"login": "alice", "type": "User"},
    "state": "CHANGES_REQUESTED",
    "body": "Please rename it.",
    "submitted_at": "2026-11-21T10:30:00Z",
    "html_url": "https://github.example/r/11",
}


@pytest.mark.anyio
async def test_etags_survive_from_one_client_to_the_next() -> None:
    cache, clock = ResponseCache(), Clock()
    rec = Recorder(
        httpx.Response(200, headers={"ETag": '"r1"'}, json=[REVIEW]),
        httpx.Response(304),
    )
    async with rec.client(cache, clock) as gh:
        first = await gh.reviews(5)
    async with rec.client(cache, clock) as gh:  # the next poll makes a new client
        again = await gh.reviews(5)
    assert first == again
    (review,) = first
    assert (review.id, review.user, review.state) == (11, "alice", "CHANGES_REQUESTED")
    assert review.submitted_at == datetime(2026, 11, 21, 10, 30, tzinfo=UTC)
    assert "If-None-Match" not in rec.requests[0].headers
    assert rec.requests[1].headers["If-None-Match"] == '"r1"'
    assert rec.requests[0].url.params["per_page"] == "100"
    assert (cache.sent, cache.not_modified) == (2, 1)


@pytest.mark.anyio
async def test_comments_carry_file_line_and_since() -> None:
    cache, clock = ResponseCache(), Clock()
    comment = {
        "id": 21,
        "user": {"login": "bob", "type": "User"},
        "body": "off by one",
        "created_at": "2026-11-21T10:31:00Z",
        "path": "src/app.py",
        "line": None,
        "original_line": 14,
        "pull_request_review_id": 11,
    }
    rec = Recorder(httpx.Response(200, json=[comment]), httpx.Response(200, json=[]))
    since = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
    async with rec.client(cache, clock) as gh:
        (c,) = await gh.review_comments(5, since=since)
        assert await gh.issue_comments(5, since=since) == []
    assert (c.kind, c.path, c.line, c.review_id, c.user) == ("review", "src/app.py", 14, 11, "bob")
    assert rec.requests[0].url.path == f"{REPO}/pulls/5/comments"
    assert rec.requests[0].url.params["since"] == "2026-11-21T10:00:00Z"
    assert rec.requests[1].url.path == f"{REPO}/issues/5/comments"
    assert cache.bodies == {}  # no ETag given: nothing cached


@pytest.mark.anyio
async def test_pages_are_followed_each_with_its_etag() -> None:
    cache, clock = ResponseCache(), Clock()
    nxt = f"https://api.example.test{REPO}/pulls/5/reviews?per_page=100&page=2"
    rec = Recorder(
        httpx.Response(
            200, headers={"ETag": '"p1"', "Link": f'<{nxt}>; rel="next"'}, json=[REVIEW]
        ),
        httpx.Response(200, headers={"ETag": '"p2"'}, json=[{**REVIEW, "id": 12}]),
        httpx.Response(304),
        httpx.Response(304),
    )
    async with rec.client(cache, clock) as gh:
        assert [r.id for r in await gh.reviews(5)] == [11, 12]
        assert [r.id for r in await gh.reviews(5)] == [11, 12]
    assert [r.headers.get("If-None-Match") for r in rec.requests] == [None, None, '"p1"', '"p2"']
    assert rec.requests[1].url.params["page"] == "2"


@pytest.mark.anyio
async def test_check_runs_and_statuses() -> None:
    cache, clock = ResponseCache(), Clock()
    run = {
        "id": 31,
        "name": "tests",
        "status": "completed",
        "conclusion": "failure",
        "output": {"title": "2 failed", "summary": "test_a, test_b", "text": "Traceback"},
        "html_url": "https://github.example/runs/31",
    }
    combined = {
        "state": "failure",
        "statuses": [
            {
                "id": 41,
                "context": "ci/lint",
                "state": "error",
                "description": "lint crashed",
                "target_url": "https://ci.example/41",
            }
        ],
    }
    rec = Recorder(
        httpx.Response(200, json={"total_count": 1, "check_runs": [run]}),
        httpx.Response(200, json=combined),
    )
    async with rec.client(cache, clock) as gh:
        (check,) = await gh.check_runs("abc123")
        state, (status,) = await gh.commit_status("abc123")
    assert (check.name, check.conclusion, check.title, check.summary, check.text) == (
        "tests",
        "failure",
        "2 failed",
        "test_a, test_b",
        "Traceback",
    )
    assert state == "failure"
    assert (status.context, status.state, status.description) == (
        "ci/lint",
        "error",
        "lint crashed",
    )
    assert rec.requests[0].url.path == f"{REPO}/commits/abc123/check-runs"
    assert rec.requests[0].url.params["filter"] == "latest"
    assert rec.requests[1].url.path == f"{REPO}/commits/abc123/status"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "headers", "wait"),
    [
        (403, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1800000600"}, 600),
        (429, {"retry-after": "120"}, 120),
        (403, {"retry-after": "30"}, 30),
        (429, {}, 60),
    ],
)
async def test_a_rate_limit_backs_off_until_it_lifts(
    status: int, headers: dict[str, str], wait: float
) -> None:
    cache, clock = ResponseCache(), Clock()
    rec = Recorder(
        httpx.Response(status, headers=headers, json={"message": "API rate limit exceeded"}),
        httpx.Response(200, json=[]),
    )
    async with rec.client(cache, clock) as gh:
        with pytest.raises(RateLimited) as info:
            await gh.reviews(5)
        assert info.value.retryable and info.value.status == status
        assert info.value.resume_at == clock.now + wait
        clock.now += wait - 1
        with pytest.raises(RateLimited):  # no request while the limit lasts
            await gh.issue_comments(5, since=None)
        assert len(rec.requests) == 1
        clock.now += 1
        assert await gh.reviews(5) == []
    assert len(rec.requests) == 2


@pytest.mark.anyio
async def test_a_forbidden_without_rate_limit_headers_is_a_plain_error() -> None:
    cache, clock = ResponseCache(), Clock()
    rec = Recorder(httpx.Response(403, json={"message": "Resource not accessible"}))
    async with rec.client(cache, clock) as gh:
        with pytest.raises(Exception) as info:
            await gh.reviews(5)
    assert not isinstance(info.value, RateLimited)
    assert "Resource not accessible" in str(info.value)
    assert cache.resume_at == 0.0


@pytest.mark.anyio
async def test_pr_state_answers_from_the_cache_while_rate_limited() -> None:
    cache, clock = ResponseCache(), Clock()
    pr = {
        "number": 5,
        "html_url": "https://github.example/pull/5",
        "state": "open",
        "merged": False,
        "head": {"sha": "abc123"},
    }
    rec = Recorder(
        httpx.Response(200, headers={"ETag": '"pr"'}, json=pr),
        httpx.Response(429, headers={"retry-after": "60"}, json={"message": "slow down"}),
    )
    async with rec.client(cache, clock) as gh:
        first = await gh.pr_state(5)
        with pytest.raises(RateLimited):
            await gh.reviews(5)
        during = await gh.pr_state(5)
        assert gh.cached_pr(5) == first
    assert first.head_sha == "abc123"
    assert during == first
    assert len(rec.requests) == 2
