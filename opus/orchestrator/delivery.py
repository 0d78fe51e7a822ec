"""Delivery and approval: keep the branch or open a PR, merge when approved (SPEC §7)."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import anyio

from .config import Config
from .errors import DeliveryError, MergeConflict, WorkspaceError
from .github import GitHub, GitHubError, RateLimited
from .lifecycle import FINISHED, Outcome, Stage, Status
from .models import FeatureRequest, Job, Verdict
from .reactions import artifact_tag
from .workspace import read_ref

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_BASE, RETRY_MAX = 1.0, 30.0
"""Seconds of the first wait before a GitHub request is sent again, and the longest."""


def delivered_commit(job: Job) -> str | None:
    """The commit the job's branch was last delivered at (its last checkpoint's)."""
    return next((cp.commit for cp in reversed(job.history) if cp.commit), None)


def auto_approves(config: Config, fr: FeatureRequest, confidence: int | None) -> bool:
    """The approval rule: the note's ``approval`` first, then the config's."""
    if fr.approval is not None:
        return fr.approval == "auto"
    rule = config.approval
    if rule.mode == "auto":
        return True
    return fr.priority in rule.auto_priorities and (confidence or 0) >= rule.min_confidence


def pr_description(job: Job, fr: FeatureRequest, plan: str, diff_stat: str, review: str) -> str:
    """The body of the pull request (``pr.md``)."""
    summary = "\n".join(plan.strip().splitlines()[:25]) if plan.strip() else "(no plan)"
    lines = [
        f"# {fr.id}: {fr.title}",
        "",
        "## Feature request",
        "",
        fr.body.strip(),
        "",
        "## Plan (summary)",
        "",
        summary,
        "",
        "## Iterations",
        "",
    ]
    for cp in job.history:
        lines.append(
            (f"- round {cp.round} · " if job.round > 1 else "- ")
            + f"iteration {cp.iteration} · {cp.stage}: {cp.outcome}"
            + (f" ({cp.attempts} attempts)" if cp.attempts > 1 else "")
        )
    tests = [cp for cp in job.history if cp.stage is Stage.TESTER]
    result = "passed" if tests and tests[-1].outcome is Outcome.OK else "not run"
    lines += ["", "## Tests", "", f"Last run: {result} (iteration {job.iteration}).", ""]
    lines += [
        "## Review",
        "",
        review or "(no review)",
        "",
        "## Diff stat",
        "",
        "```text",
        diff_stat.rstrip() or "(no changes)",
        "```",
        "",
        f"Branch `{job.branch}` · job `{job.id}` · opened by opus",
    ]
    return "\n".join(lines) + "\n"


def github_client(rt: Runtime) -> GitHub:
    """A client for ``[delivery] repository``, sharing the runtime's ETags and rate limit."""
    d = rt.config.delivery
    assert d.repository is not None
    return GitHub(
        d.repository,
        token=rt.environ.get(d.token_env),
        api_url=d.api_url,
        transport=rt.http_transport,
        cache=rt.github_cache,
        clock=lambda: rt.now().timestamp(),
    )


class Delivery:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._clean: dict[str, tuple[str | None, str | None]] = {}
        """Job id → (base, branch) commits last seen to merge cleanly (local delivery)."""

    def _github(self) -> GitHub:
        return github_client(self.rt)

    async def deliver(
        self, job: Job, fr: FeatureRequest, worktree: Path
    ) -> tuple[Status, str | None]:
        """Write ``pr.md``, push and open the PR if configured; merge at once if auto-approved."""
        rt, d = self.rt, self.rt.config.delivery
        ws = rt.workspace(job)
        assert job.base_commit is not None
        since, tag = job.base_commit, artifact_tag(job.round, job.iteration)

        def describe() -> str:  # one hand-off: the stat, the plan and verdict, pr.md
            stat = ws.diff_stat(worktree, since)
            plan = rt.registry.read_artifact(job.id, "plan.md")
            raw = rt.registry.read_artifact(job.id, f"review-{tag}.json")
            review = ""
            if raw:
                verdict = Verdict.model_validate(json.loads(raw))
                review = f"{verdict.summary} (confidence {verdict.confidence})"
            body = rt.redactor(pr_description(job, fr, plan or "", stat, review))
            # rebuilt at every delivery: nothing resumes from it
            rt.registry.write_artifact(job.id, "pr.md", body, sync=False)
            return body

        body = await anyio.to_thread.run_sync(describe)
        if d.kind == "github":
            token = rt.environ.get(d.token_env)
            # a rebased branch (a conflict round with update = "rebase") replaces the old one
            force = job.round > 1 and rt.config.reactions.update == "rebase"
            earlier = self._earlier_commits(job) if job.pr_number is None else set()

            def push() -> None:
                # a retry's branch was reset to the base: it replaces an earlier job's push,
                # never commits someone else pushed (then git refuses, and says so)
                there = ws.remote_head(job.branch, d.remote, token) if earlier else None
                replaces = there if there in earlier else None
                ws.push(worktree, job.branch, d.remote, token, force=force, replaces=replaces)

            await anyio.to_thread.run_sync(push)
            base = rt.config.repos[job.repo].base
            if job.pr_number is not None:  # a rework round: the same PR, updated
                number = job.pr_number
                pr = await self._github_call(lambda gh: gh.update_pr(number, body=body))
            else:  # (a retry's PR still open for the branch is found, not opened twice)
                title = f"{fr.id}: {fr.title}"
                pr = await self._github_call(
                    lambda gh: gh.open_pr(head=job.branch, base=base, title=title, body=body)
                )
            job.pr_url, job.pr_number = pr.url, pr.number
            log.info("%s: delivered %s", job.fr_id, pr.url)
        if auto_approves(rt.config, fr, job.confidence):
            return await self.merge(job)
        return Status.REVIEW, None

    async def merge(self, job: Job) -> tuple[Status, str | None]:
        """Merge the job's branch (or PR) into the base: DONE, or BLOCKED on a conflict."""
        rt = self.rt
        try:
            if rt.config.delivery.kind == "github" and job.pr_number is not None:
                number = job.pr_number
                try:
                    await self._github_call(lambda gh: gh.merge_pr(number))
                except GitHubError as e:
                    # "not mergeable" for a PR a person merged meanwhile: it is done
                    pr = await self._github_call(lambda gh: gh.pr_state(number))
                    if not pr.merged:
                        raise
                    log.info("%s: PR #%d was merged on GitHub (%s)", job.fr_id, number, e)
            else:
                message = f"opus: merge {job.branch} ({job.fr_id}: {job.title})"
                ws, head = rt.workspace(job), delivered_commit(job)

                def merge() -> None:  # a branch merged by hand and deleted: nothing to do
                    if ws.has_branch(job.branch) or head is None or not ws.in_base(head):
                        ws.merge(job.branch, message)

                await anyio.to_thread.run_sync(merge)
        except MergeConflict as e:
            return Status.BLOCKED, f"merge conflict in: {', '.join(e.paths)}"
        except (WorkspaceError, DeliveryError) as e:
            return Status.BLOCKED, f"could not merge: {e}"
        log.info("%s: merged %s", job.fr_id, job.branch)
        return Status.DONE, None

    def _earlier_commits(self, job: Job) -> set[str]:
        """Commits of the FR's earlier, finished jobs (what a retry's push may replace)."""
        return {
            cp.commit
            for j in self.rt.registry.jobs()
            if j.fr_id == job.fr_id and j.id != job.id and j.status in FINISHED
            for cp in j.history
            if cp.commit
        }

    async def _github_call(self, call: Callable[[GitHub], Awaitable[T]]) -> T:
        """One GitHub request, retried with exponential backoff and jitter on a transient
        failure (HTTP 5xx, a network error: SPEC §3.2) up to ``retries`` times. A rate
        limit is not waited out here: it fails the call, saying when it lifts."""
        retries, n = self.rt.config.pipeline.retries, 1
        while True:
            try:
                async with self._github() as gh:
                    return await call(gh)
            except RateLimited:
                raise
            except GitHubError as e:
                if not e.retryable or n > retries:
                    raise
                delay = min(RETRY_MAX, RETRY_BASE * 2.0 ** (n - 1)) * (0.5 + random.random())
                log.warning("%s; retrying in %.1f s (%d of %d)", e, delay, n, retries)
                await anyio.sleep(delay)
                n += 1

    async def merged_branches(self, jobs: Iterable[Job]) -> dict[str, frozenset[str]]:
        """For local delivery: the merged branches of each repository ``jobs`` are in (one
        git process each), for ``merged_or_closed(job, merged=…)`` over a whole poll."""
        if self.rt.config.delivery.kind == "github":
            return {}
        repos = {j.repo: self.rt.workspace(j) for j in jobs}
        found: dict[str, frozenset[str]] = {}
        for repo, ws in repos.items():
            try:
                found[repo] = await anyio.to_thread.run_sync(ws.merged_branches)
            except WorkspaceError as e:  # each job asks on its own, and says why
                log.debug("%s: cannot list merged branches: %s", repo, e)
        return found

    async def merged_or_closed(
        self, job: Job, *, merged: Mapping[str, frozenset[str]] | None = None
    ) -> Status | None:
        """While in review: DONE if a person merged it, CANCELLED if the PR was closed.
        ``merged``: ``merged_branches`` of this poll (local delivery)."""
        rt = self.rt
        if merged is not None and rt.config.delivery.kind != "github" and job.repo in merged:
            if job.branch in merged[job.repo]:
                return Status.DONE
            ws = rt.workspace(job)
            if read_ref(ws.repo_path, f"refs/heads/{job.branch}") is not None:
                return None  # (there, not merged: read from git's files)
            return await anyio.to_thread.run_sync(self._branch_gone, job)
        if rt.config.delivery.kind == "github" and job.pr_number is not None:
            async with self._github() as gh:
                pr = await gh.pr_state(job.pr_number)
            if pr.merged:
                return Status.DONE
            return Status.CANCELLED if pr.state == "closed" else None
        done = await anyio.to_thread.run_sync(rt.workspace(job).is_merged, job.branch)
        return Status.DONE if done else None

    def _branch_gone(self, job: Job) -> Status | None:
        """A local branch a person deleted while its FR was in review: DONE when its work
        is in the base (merged, then deleted), else CANCELLED (thrown away, as a PR closed
        unmerged); None while it is there after all (a ref git's files did not show)."""
        ws = self.rt.workspace(job)
        if ws.has_branch(job.branch):
            return None
        head = delivered_commit(job)
        if head is not None and ws.in_base(head):
            log.info("%s: %s was merged and deleted", job.fr_id, job.branch)
            return Status.DONE
        log.warning("%s: %s was deleted without being merged", job.fr_id, job.branch)
        return Status.CANCELLED

    async def unmergeable(self, job: Job) -> bool:
        """While in review: whether the branch may no longer merge into its base (SPEC §7),
        for ``Rounds.conflict`` to confirm. GitHub: what it says of the PR (as
        ``merged_or_closed`` last read it, from the runtime's cache). Local: git's merge of
        the two, tried only when the base or the branch moved since it last merged cleanly
        (read from git's files: a poll with nothing moved runs no git)."""
        if self.rt.config.delivery.kind != "github":
            ws = self.rt.workspace(job)
            moved = (read_ref(ws.repo_path, f"refs/heads/{ws.base}"),
                     read_ref(ws.repo_path, f"refs/heads/{job.branch}"))  # fmt: skip
            if None in moved or self._clean.get(job.id) == moved:
                return False
            try:
                paths = await anyio.to_thread.run_sync(
                    lambda: ws.conflicts_with_base(job.branch, forked_from=job.base_commit)
                )
            except WorkspaceError as e:
                log.debug("%s: cannot check for conflicts: %s", job.fr_id, e)
                return False
            if not paths:
                self._clean[job.id] = moved
            return bool(paths)
        if job.pr_number is None:
            return False
        async with self._github() as gh:
            pr = gh.cached_pr(job.pr_number) or await gh.pr_state(job.pr_number)
        return pr is not None and pr.state == "open" and pr.mergeable is False
