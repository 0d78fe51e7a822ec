"""Pull requests through GitHub's REST API, over httpx (async).

One seam for GitHub: pass ``transport=httpx.MockTransport(...)`` to test without a network.
The token travels in the ``Authorization`` header only; no error message carries it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx

from .. import __version__
from .errors import DeliveryError

__all__ = ("GitHub", "GitHubError", "PullRequest")

log = logging.getLogger(__name__)

MERGE_METHODS = frozenset({"merge", "squash", "rebase"})


@dataclass(frozen=True)
class PullRequest:
    """A pull request as GitHub reports it."""

    number: int
    url: str
    """The PR's web page (``html_url``)."""
    state: str
    """``open`` or ``closed``."""
    merged: bool


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
        self._etags: dict[int, tuple[str, PullRequest]] = {}

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

    async def pr_state(self, number: int) -> PullRequest:
        """The PR's current state; polls with ``If-None-Match`` (a 304 returns the cached one)."""
        path = f"{self._pulls}/{number}"
        cached = self._etags.get(number)
        headers = {"If-None-Match": cached[0]} if cached else None
        response = await self._request("GET", path, headers=headers)
        if response.status_code == 304 and cached is not None:
            return cached[1]
        if response.status_code != 200:
            raise self._error("GET", path, response)
        pr = _pull_request(self._json(response))
        etag = response.headers.get("ETag")
        if etag:
            self._etags[number] = (etag, pr)
        else:
            self._etags.pop(number, None)
        return pr

    async def merge_pr(self, number: int, *, method: str = "merge") -> None:
        """Merge the PR with ``method`` (``merge``, ``squash`` or ``rebase``)."""
        if method not in MERGE_METHODS:
            raise ValueError(f"merge method must be one of {sorted(MERGE_METHODS)}, got {method!r}")
        path = f"{self._pulls}/{number}/merge"
        response = await self._request("PUT", path, json={"merge_method": method})
        if response.status_code == 200:
            self._etags.pop(number, None)
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

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            detail = self._redact(f"{type(e).__name__}: {e}")
            raise GitHubError(f"GitHub {method} {path} failed: {detail}") from e

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
        return PullRequest(
            number=int(data["number"]),
            url=str(data["html_url"]),
            state=str(data["state"]),
            merged=bool(data.get("merged") or data.get("merged_at")),
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
