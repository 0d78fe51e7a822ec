"""What GitHub says about a PR in review, as one rework trigger (SPEC §15).

Polled with the review poll, once per FR per poll, after the merge check (whose PR answer
gives the head commit). One poll sends at most this request set, each conditional:

    GET /pulls/{n}/reviews                 [reactions] github
    GET /pulls/{n}/comments?since=…        [reactions] github (comments on diff lines)
    GET /issues/{n}/comments?since=…       [reactions] github (the conversation)
    GET /commits/{sha}/check-runs          [reactions] ci
    GET /commits/{sha}/status              [reactions] ci

What starts a round: a review that requests changes; a review that only comments, when it
has a body; a comment on a line of the diff (with its file and line); a comment in the
conversation; with ``ci``, a check run concluded failure/timed_out/cancelled/action_required
or a commit status failure/error on the head commit, once no check or status is still
running there (so one round gets every failure). What does not: anything before the last
delivery; approving reviews (and their comments) — approval is the person's, in the
vault; reviews with neither a body nor a request; bots' comments and reviews (CI speaks
through checks); opus's own comments (they carry :data:`OPUS_MARK`); anything whose key is
already in the job's ``reacted`` list — the registry's memory, kept across restarts.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from .delivery import github_client
from .github import CheckRun, CommitStatus, GitHub, GitHubError, RateLimited, Review, ReviewComment
from .lifecycle import Stage
from .models import Job
from .reactions import Source, Trigger

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ("OPUS_MARK", "github_trigger", "last_delivery")

log = logging.getLogger(__name__)

OPUS_MARK = "<!-- opus -->"
"""Opus puts this in any comment it posts on GitHub, so it never reacts to itself."""
FAILED_CHECKS = frozenset({"failure", "timed_out", "cancelled", "action_required"})
FAILED_STATUSES = frozenset({"failure", "error"})
EXCERPT = 1500
"""Characters kept of a check's summary (its start) and of its text (its end: the log's tail)."""


def last_delivery(job: Job) -> datetime | None:
    """When the job's branch was last delivered (its last delivery stage started)."""
    for cp in reversed(job.history):
        if cp.stage is Stage.DELIVERY:
            return cp.started_at
    return None


def reactions_since(job: Job) -> datetime | None:
    """What counts as new on the PR: posted after the last trigger was read (the current
    round's start: what was posted while it worked is for the next round), or after the
    first delivery. None while nothing was delivered. (What a trigger took is known by
    its key and never taken twice.)"""
    delivered = last_delivery(job)
    if delivered is None:
        return None
    return min(job.rounds[-1].started_at, delivered) if job.rounds else delivered


async def github_trigger(rt: Runtime, job: Job) -> Trigger | None:
    """The new reviews, comments and failing checks on the job's PR as one trigger, or None
    (nothing new, reactions off, not a GitHub PR, or waiting out a rate limit)."""
    reactions = rt.config.reactions
    if rt.config.delivery.kind != "github" or job.pr_number is None:
        return None
    if not (reactions.github or reactions.ci):
        return None
    since = reactions_since(job)
    if since is None:
        return None
    try:
        async with github_client(rt) as gh:
            # GitHub's times have whole seconds: a comment in the delivery's second counts
            return await _poll(rt, gh, job, _aware(since).replace(microsecond=0))
    except RateLimited as e:
        log.debug("%s: GitHub reactions wait: %s", job.fr_id, e)
        return None
    except GitHubError as e:
        log.warning("%s: cannot read the PR's reviews and checks: %s", job.fr_id, e)
        return None


async def _poll(rt: Runtime, gh: GitHub, job: Job, since: datetime) -> Trigger | None:
    assert job.pr_number is not None
    number, seen = job.pr_number, set(job.reacted)
    pr = gh.cached_pr(number) or await gh.pr_state(number)
    if pr.state != "open":
        return None
    sections: list[str] = []
    keys: list[str] = []
    source: Source | None = None
    if rt.config.reactions.github:
        reviews = await gh.reviews(number)
        diff_comments = await gh.review_comments(number, since=since)
        conversation = await gh.issue_comments(number, since=since)
        approving = {r.id for r in reviews if r.state == "APPROVED"}
        fresh_reviews = [r for r in reviews if _counts(r, since) and _key(r) not in seen]
        fresh_lines = [
            c
            for c in diff_comments
            if _comment_counts(c, since) and c.review_id not in approving and _key(c) not in seen
        ]
        fresh_talk = [c for c in conversation if _comment_counts(c, since) and _key(c) not in seen]
        if fresh_reviews or fresh_lines:
            source = "github-review"
        elif fresh_talk:
            source = "github-comment"
        sections += _review_sections(fresh_reviews, fresh_lines, fresh_talk)
        keys += [_key(r) for r in fresh_reviews] + [_key(c) for c in [*fresh_lines, *fresh_talk]]
    if rt.config.reactions.ci and pr.head_sha:
        runs = await gh.check_runs(pr.head_sha)
        _, statuses = await gh.commit_status(pr.head_sha)
        failing = _ci_failures(runs, statuses, pr.head_sha, seen)
        if failing is not None:
            section, ci_keys = failing
            sections.append(section)
            keys += ci_keys
            source = source or "ci"
    if source is None or not keys:
        return None
    feedback = rt.redactor("\n\n".join(sections).strip() + "\n")
    log.info("%s: PR #%d: %s starts a round (%d item(s))", job.fr_id, number, source, len(keys))
    return Trigger(source=source, feedback=feedback, keys=tuple(keys))


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.astimezone()


def _after(moment: datetime | None, since: datetime) -> bool:
    return moment is not None and moment.astimezone(UTC) >= since.astimezone(UTC)


def _by_person(user_type: str, body: str) -> bool:
    return user_type != "Bot" and OPUS_MARK not in body


def _counts(review: Review, since: datetime) -> bool:
    if not (_after(review.submitted_at, since) and _by_person(review.user_type, review.body)):
        return False
    if review.state == "CHANGES_REQUESTED":
        return True
    return review.state == "COMMENTED" and bool(review.body.strip())


def _comment_counts(comment: ReviewComment, since: datetime) -> bool:
    return (
        _after(comment.created_at, since)
        and _by_person(comment.user_type, comment.body)
        and bool(comment.body.strip())
    )


def _key(item: Review | ReviewComment | CheckRun) -> str:
    if isinstance(item, Review):
        return f"github-review:{item.id}"
    if isinstance(item, ReviewComment):
        return f"github-{item.kind}-comment:{item.id}"
    return f"ci-check:{item.id}"


def _status_key(sha: str, status: CommitStatus) -> str:
    return f"ci-status:{sha}:{status.context}:{status.state}"


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in text.strip().splitlines())


def _review_sections(
    reviews: list[Review], lines: list[ReviewComment], talk: list[ReviewComment]
) -> list[str]:
    sections = []
    for review in reviews:
        what = "requested changes" if review.state == "CHANGES_REQUESTED" else "commented"
        text = f"## Review by @{review.user} ({what})"
        body = _quote(review.body) if review.body.strip() else "(no summary; see its comments)"
        sections.append(f"{text}\n\n{body}")
    if lines:
        items = []
        for c in sorted(lines, key=lambda c: (c.path or "", c.line or 0, c.id)):
            where = f"`{c.path}`" + (f" line {c.line}" if c.line is not None else "")
            items.append(f"- {where} (@{c.user}):\n{_indent(c.body)}")
        sections.append("## Comments on the diff\n\n" + "\n".join(items))
    if talk:
        items = [f"- @{c.user}:\n{_indent(c.body)}" for c in talk]
        sections.append("## Comments on the pull request\n\n" + "\n".join(items))
    return sections


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" if line else "" for line in text.strip().splitlines())


def _ci_failures(
    runs: list[CheckRun], statuses: list[CommitStatus], sha: str, seen: set[str]
) -> tuple[str, list[str]] | None:
    """The failing checks on ``sha`` as a section and their keys; None while any check is
    still running (one round for every failure) or when nothing new failed."""
    if any(r.status != "completed" for r in runs) or any(s.state == "pending" for s in statuses):
        return None
    failed_runs = [r for r in runs if r.conclusion in FAILED_CHECKS and _key(r) not in seen]
    failed = [s for s in statuses if s.state in FAILED_STATUSES and _status_key(sha, s) not in seen]
    if not (failed_runs or failed):
        return None
    parts = [f"## Failing checks on {sha[:12]}"]
    for run in failed_runs:
        parts.append(f"### {run.name} ({run.conclusion})")
        if run.title:
            parts.append(f"**{run.title.strip()}**")
        if run.summary.strip():
            parts.append(_head(run.summary.strip()))
        if run.text.strip():
            parts.append("```text\n" + _tail(run.text.strip()) + "\n```")
        if run.url:
            parts.append(run.url)
    for status in failed:
        line = f"### {status.context} ({status.state})"
        detail = " — ".join(x for x in (status.description, status.target_url) if x)
        parts.append(line + (f"\n\n{detail}" if detail else ""))
    keys = [_key(r) for r in failed_runs] + [_status_key(sha, s) for s in failed]
    return "\n\n".join(parts), keys


def _head(text: str) -> str:
    return text if len(text) <= EXCERPT else text[:EXCERPT] + "\n… (cut)"


def _tail(text: str) -> str:
    return text if len(text) <= EXCERPT else "… (cut)\n" + text[-EXCERPT:]
