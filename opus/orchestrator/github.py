"""Pull requests through GitHub's REST API, over httpx (async).

One seam for GitHub: pass ``transport=httpx.MockTransport(...)`` to test without a network.
The token travels in the ``Authorization`` header only; no error message carries it.

Polling stays within GitHub's rate limits: every GET is conditional (``If-None-Match`` with
the ETag a :class:`ResponseCache` kept; a 304 reuses the cached body and does not count
against the limit), and a 403/429 rate-limit answer (``x-ratelimit-remaining: 0`` with
``x-ratelimit-reset``, or ``retry-after``) raises :class:`RateLimited` and makes every
later GET through the same cache wait, without a request, until the limit lifts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from .. import __version__
from .errors import DeliveryError

__all__ = (
    "CheckRun",
    "CommitStatus",
    "GitHub",
    "GitHubError",
    "PullRequest",
    "RateLimited",
    "ResponseCache",
    "Review",
    "ReviewComment",
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MERGE_METHODS = frozenset({"merge", "squash", "rebase"})
MAX_PAGES = 10
"""Pages of 100 followed per list (``Link: rel="next"``); a PR with more is cut there."""
DEFAULT_BACKOFF = 60.0
"""Seconds to wait after a 429 that names no time (GitHub: "at least one minute")."""


@dataclass(frozen=True)
class PullRequest:
    """A pull request as GitHub reports it."""

    number: int
    url: str
    """The PR's web page (``html_url``)."""
    state: str
    """``open`` or ``closed``."""
    merged: bool
    head_sha: str | None = None
    """The commit at the head of the PR's branch (checks and statuses are on it)."""
    mergeable: bool | None = None
    """Whether GitHub can merge it into its base; None while GitHub works it out."""


@dataclass(frozen=True)
class Review:
    """A PR review (``/pulls/{n}/reviews``)."""

    id: int
    user: str
    user_type: str
    """``User`` or ``Bot``."""
    state: str
    """``APPROVED``, ``CHANGES_REQUESTED``, ``COMMENTED``, ``DISMISSED`` or ``PENDING``."""
    body: str
    submitted_at: datetime | None
    url: str


@dataclass(frozen=True)
class ReviewComment:
    """A comment on the PR: on a line of the diff (``kind="review"``, with ``path`` and
    ``line``) or in the conversation (``kind="issue"``)."""

    id: int
    kind: str
    user: str
    user_type: str
    body: str
    created_at: datetime | None
    url: str
    path: str | None = None
    line: int | None = None
    review_id: int | None = None


@dataclass(frozen=True)
class CheckRun:
    """A check run on a commit (``/commits/{sha}/check-runs``)."""

    id: int
    name: str
    status: str
    """``queued``, ``in_progress`` or ``completed``."""
    conclusion: str | None
    title: str
    summary: str
    text: str
    url: str


@dataclass(frozen=True)
class CommitStatus:
    """One context of a commit's combined status (``/commits/{sha}/status``)."""

    id: int
    context: str
    state: str
    """``error``, ``failure``, ``pending`` or ``success``."""
    description: str
    target_url: str


@dataclass
class ResponseCache:
    """ETags and bodies of GET responses, and when a rate limit lifts; shared by the clients
    one service makes (one per poll), so conditional requests work from poll to poll."""

    bodies: dict[str, tuple[str, Any, str | None]] = field(default_factory=dict)
    """URL → (ETag, JSON body, the next page's URL)."""
    resume_at: float = 0.0
    """Epoch seconds before which no GET is sent (a rate limit's reset)."""
    sent: int = 0
    """Requests sent through this cache."""
    not_modified: int = 0
    """Of those, how many GitHub answered 304."""


class GitHubError(DeliveryError):
    """A GitHub request failed; ``status`` is the HTTP status (None: no response)."""

    def __init__(
        self, message: str, *, status: int | None = None, retryable: bool | None = None
    ) -> None:
        self.status = status
        if retryable is None:
            retryable = status is None or status == 429 or status >= 500
        self.retryable = retryable
        super().__init__(message)


class RateLimited(GitHubError):
    """GitHub's rate limit is reached; ``resume_at`` (epoch seconds) is when it lifts."""

    def __init__(self, message: str, *, status: int | None, resume_at: float) -> None:
        super().__init__(message, status=status, retryable=True)
        self.resume_at = resume_at


class GitHub:
    """A small async client for one repository (``owner/name``)."""

    def __init__(
        self,
        repository: str,
        *,
        token: str | None,
        api_url: str = "https://api.github.com",
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30,
        cache: ResponseCache | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        owner, sep, name = repository.partition("/")
        if not sep or not owner or not name or "/" in name:
            raise ValueError(f"repository must be 'owner/name', got {repository!r}")
        self.owner = owner
        self.name = name
        self._token = token or None
        headers = {
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
            "User-Agent": f"opus-orchestrator/{__version__}",
        }
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        self._client = httpx.AsyncClient(
            base_url=api_url.rstrip("/"),
            headers=headers,
            transport=transport,
            timeout=httpx.Timeout(timeout),
        )
        self.cache = cache if cache is not None else ResponseCache()
        self._clock = clock

    @property
    def _pulls(self) -> str:
        return f"/repos/{self.owner}/{self.name}/pulls"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def open_pr(self, *, head: str, base: str, title: str, body: str) -> PullRequest:
        """Open a PR from ``head`` into ``base``; if one is already open for ``head``, return it."""
        payload = {"title": title, "head": head, "base": base, "body": body}
        response = await self._request("POST", self._pulls, json=payload)
        if response.status_code == 201:
            pr = _pull_request(self._json(response))
            log.info("opened pull request #%d %s", pr.number, pr.url)
            return pr
        if response.status_code == 422:
            existing = await self._find_open(head)
            if existing is not None:
                log.info("pull request #%d already open for %s", existing.number, head)
                return existing
        raise self._error("POST", self._pulls, response)

    async def update_pr(self, number: int, *, body: str) -> PullRequest:
        """Rewrite an open PR's description (a rework round delivers again: SPEC §15)."""
        path = f"{self._pulls}/{number}"
        response = await self._request("PATCH", path, json={"body": body})
        if response.status_code != 200:
            raise self._error("PATCH", path, response)
        self.cache.bodies.pop(self._url(path), None)
        return _pull_request(self._json(response))

    async def pr_state(self, number: int) -> PullRequest:
        """The PR's current state; polls with ``If-None-Match`` (a 304 returns the cached one).
        While a rate limit lasts, the last state seen is returned without a request."""
        path = f"{self._pulls}/{number}"
        try:
            data, _ = await self._get(path)
        except RateLimited:
            cached = self.cache.bodies.get(self._url(path))
            if cached is None:
                raise
            data = cached[1]
        return _pull_request(data)

    def cached_pr(self, number: int) -> PullRequest | None:
        """The PR as the last :meth:`pr_state` through this cache saw it (no request)."""
        cached = self.cache.bodies.get(self._url(f"{self._pulls}/{number}"))
        return _pull_request(cached[1]) if cached is not None else None

    async def reviews(self, number: int) -> list[Review]:
        """Every review of PR ``number``, oldest first."""
        items = await self._get_list(f"{self._pulls}/{number}/reviews")
        return [_parse(_review, item) for item in items]

    async def review_comments(self, number: int, *, since: datetime | None) -> list[ReviewComment]:
        """Comments on lines of the PR's diff, updated at or after ``since``."""
        items = await self._get_list(f"{self._pulls}/{number}/comments", since=since)
        return [_parse(_comment, item, "review") for item in items]

    async def issue_comments(self, number: int, *, since: datetime | None) -> list[ReviewComment]:
        """Comments in the PR's conversation, updated at or after ``since``."""
        path = f"/repos/{self.owner}/{self.name}/issues/{number}/comments"
        items = await self._get_list(path, since=since)
        return [_parse(_comment, item, "issue") for item in items]

    async def check_runs(self, sha: str) -> list[CheckRun]:
        """The check runs on commit ``sha`` (the latest run of each check)."""
        path = f"/repos/{self.owner}/{self.name}/commits/{sha}/check-runs"
        items = await self._get_list(path, key="check_runs", filter="latest")
        return [_parse(_check_run, item) for item in items]

    async def commit_status(self, sha: str) -> tuple[str, list[CommitStatus]]:
        """Commit ``sha``'s combined state and the latest status of each context."""
        path = f"/repos/{self.owner}/{self.name}/commits/{sha}/status"
        data, _ = await self._get(path, {"per_page": "100"})
        if not isinstance(data, dict):
            raise GitHubError(f"GitHub GET {path}: not a combined status object")
        statuses = [_parse(_status, item) for item in data.get("statuses") or ()]
        return str(data.get("state") or ""), statuses

    async def merge_pr(self, number: int, *, method: str = "merge") -> None:
        """Merge the PR with ``method`` (``merge``, ``squash`` or ``rebase``)."""
        if method not in MERGE_METHODS:
            raise ValueError(f"merge method must be one of {sorted(MERGE_METHODS)}, got {method!r}")
        path = f"{self._pulls}/{number}/merge"
        response = await self._request("PUT", path, json={"merge_method": method})
        if response.status_code == 200:
            self.cache.bodies.pop(self._url(f"{self._pulls}/{number}"), None)
            log.info("merged pull request #%d (%s)", number, method)
            return
        if response.status_code in (405, 409):
            raise GitHubError(
                self._redact(f"not mergeable: PR #{number}: {_message(response)}"),
                status=response.status_code,
            )
        raise self._error("PUT", path, response)

    async def _find_open(self, head: str) -> PullRequest | None:
        qualified = head if ":" in head else f"{self.owner}:{head}"
        params = {"head": qualified, "state": "open"}
        response = await self._request("GET", self._pulls, params=params)
        if response.status_code != 200:
            raise self._error("GET", self._pulls, response)
        data = self._json(response)
        if not isinstance(data, list) or not data:
            return None
        return _pull_request(data[0])

    async def _get_list(
        self, path: str, *, since: datetime | None = None, key: str | None = None, **query: str
    ) -> list[Any]:
        """A listing's items, page after page (each page a conditional request)."""
        params: dict[str, str] | None = {"per_page": "100", **query}
        if since is not None and params is not None:
            params["since"] = _iso(since)
        items: list[Any] = []
        url: str | None = path
        for _ in range(MAX_PAGES):
            if url is None:
                break
            data, url = await self._get(url, params)
            params = None  # the next page's URL carries the query
            page = data.get(key) if key and isinstance(data, dict) else data
            if not isinstance(page, list):
                raise GitHubError(f"GitHub GET {path}: not a list")
            items += page
        return items

    async def _get(self, path: str, params: dict[str, str] | None = None) -> tuple[Any, str | None]:
        """A conditional GET: (JSON body, next page's URL); a 304 answers from the cache."""
        cache, url = self.cache, self._url(path, params)
        now = self._clock()
        if now < cache.resume_at:
            raise RateLimited(
                f"GitHub rate limit: no request before {_clock_time(cache.resume_at)}",
                status=None,
                resume_at=cache.resume_at,
            )
        cached = cache.bodies.get(url)
        headers = {"If-None-Match": cached[0]} if cached else None
        response = await self._request("GET", path, params=params, headers=headers)
        if response.status_code == 304 and cached is not None:
            cache.not_modified += 1
            return cached[1], cached[2]
        if response.status_code != 200:
            raise self._error("GET", path, response)
        data = self._json(response)
        following = response.links.get("next", {}).get("url")
        etag = response.headers.get("ETag")
        if etag:
            cache.bodies[url] = (etag, data, following)
        else:
            cache.bodies.pop(url, None)
        return data, following

    def _url(self, path: str, params: dict[str, str] | None = None) -> str:
        return str(self._client.build_request("GET", path, params=params).url)

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            detail = self._redact(f"{type(e).__name__}: {e}")
            raise GitHubError(f"GitHub {method} {path} failed: {detail}") from e
        self.cache.sent += 1
        resume_at = self._rate_limit(response)
        if resume_at is not None:
            self.cache.resume_at = max(self.cache.resume_at, resume_at)
            log.warning(
                "GitHub rate limit reached (%d on %s %s): waiting until %s",
                response.status_code,
                method,
                response.request.url.path,
                _clock_time(resume_at),
            )
            raise RateLimited(
                self._redact(
                    f"GitHub {method} {path}: {response.status_code} {_message(response)}; "
                    f"no request before {_clock_time(resume_at)}"
                ),
                status=response.status_code,
                resume_at=resume_at,
            )
        return response

    def _rate_limit(self, response: httpx.Response) -> float | None:
        """When a 403/429 rate-limit answer says the limit lifts (epoch seconds), else None."""
        if response.status_code not in (403, 429):
            return None
        headers, now = response.headers, self._clock()
        retry_after = _number(headers.get("retry-after"))
        if retry_after is not None:
            return now + retry_after
        if headers.get("x-ratelimit-remaining") == "0":
            reset = _number(headers.get("x-ratelimit-reset"))
            return max(reset, now) if reset is not None else now + DEFAULT_BACKOFF
        return now + DEFAULT_BACKOFF if response.status_code == 429 else None

    def _json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as e:
            raise GitHubError(
                f"GitHub {response.request.method} {response.request.url.path}: "
                f"{response.status_code} with a body that is not JSON",
                status=response.status_code,
            ) from e

    def _error(self, method: str, path: str, response: httpx.Response) -> GitHubError:
        text = f"GitHub {method} {path}: {response.status_code} {_message(response)}"
        exhausted = response.headers.get("x-ratelimit-remaining") == "0"
        retryable = True if response.status_code == 403 and exhausted else None
        return GitHubError(self._redact(text), status=response.status_code, retryable=retryable)

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text


def _pull_request(data: Any) -> PullRequest:
    try:
        head = data.get("head")
        sha = head.get("sha") if isinstance(head, dict) else None
        return PullRequest(
            number=int(data["number"]),
            url=str(data["html_url"]),
            state=str(data["state"]),
            merged=bool(data.get("merged") or data.get("merged_at")),
            head_sha=str(sha) if sha else None,
            mergeable=data.get("mergeable") if isinstance(data.get("mergeable"), bool) else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise GitHubError(f"GitHub returned an unexpected pull request object ({e!r})") from e


def _message(response: httpx.Response) -> str:
    """GitHub's ``message``, plus the ``errors[].message`` details it gives on 422."""
    try:
        data = response.json()
    except ValueError:
        return response.reason_phrase or "(no message)"
    if not isinstance(data, dict):
        return response.reason_phrase or "(no message)"
    parts = [str(data.get("message") or response.reason_phrase or "(no message)")]
    for item in data.get("errors") or ():
        if isinstance(item, dict) and item.get("message"):
            parts.append(str(item["message"]))
        elif isinstance(item, str):
            parts.append(item)
    return "; ".join(parts)


def _parse(parse: Callable[..., T], data: Any, *args: str) -> T:
    try:
        return parse(data, *args)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise GitHubError(f"GitHub returned an unexpected object ({e!r})") from e


def _user(data: Any) -> tuple[str, str]:
    user = data.get("user") or {}
    return str(user.get("login") or "?"), str(user.get("type") or "User")


def _review(data: Any) -> Review:
    login, kind = _user(data)
    return Review(
        id=int(data["id"]),
        user=login,
        user_type=kind,
        state=str(data.get("state") or ""),
        body=str(data.get("body") or ""),
        submitted_at=_time(data.get("submitted_at")),
        url=str(data.get("html_url") or ""),
    )


def _comment(data: Any, kind: str) -> ReviewComment:
    login, user_type = _user(data)
    line = data.get("line") if data.get("line") is not None else data.get("original_line")
    review = data.get("pull_request_review_id")
    return ReviewComment(
        id=int(data["id"]),
        kind=kind,
        user=login,
        user_type=user_type,
        body=str(data.get("body") or ""),
        created_at=_time(data.get("created_at")),
        url=str(data.get("html_url") or ""),
        path=str(data["path"]) if data.get("path") else None,
        line=int(line) if line is not None else None,
        review_id=int(review) if review is not None else None,
    )


def _check_run(data: Any) -> CheckRun:
    output = data.get("output") or {}
    return CheckRun(
        id=int(data["id"]),
        name=str(data.get("name") or "?"),
        status=str(data.get("status") or ""),
        conclusion=str(data["conclusion"]) if data.get("conclusion") else None,
        title=str(output.get("title") or ""),
        summary=str(output.get("summary") or ""),
        text=str(output.get("text") or ""),
        url=str(data.get("html_url") or data.get("details_url") or ""),
    )


def _status(data: Any) -> CommitStatus:
    return CommitStatus(
        id=int(data.get("id") or 0),
        context=str(data.get("context") or "?"),
        state=str(data.get("state") or ""),
        description=str(data.get("description") or ""),
        target_url=str(data.get("target_url") or ""),
    )


def _time(value: Any) -> datetime | None:
    """GitHub's ``2026-11-21T10:30:00Z`` as an aware datetime."""
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _iso(moment: datetime) -> str:
    """``since=`` as GitHub wants it: UTC, ``Z``; a naive ``moment`` is local time."""
    utc = moment.astimezone(UTC).replace(microsecond=0, tzinfo=None)
    return utc.isoformat() + "Z"


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _clock_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%H:%M:%S UTC")
