"""Delivery to GitHub end to end, through the library: a real push to a bare remote and a
real loopback HTTP server standing in for the REST API (SPEC §7, §6 secrets)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from opus.orchestrator import Orchestrator, Summary, load_config

from .conftest import Vault, git

TOKEN = "ghp_FAKEtoken0123456789abcdefSECRET"
PULLS = "/repos/acme/app/pulls"
NOTE = "---\nid: {id}\ntitle: Thing {id}\n---\n# Thing\n\nDo {id}.\n"


@dataclass
class Seen:
    """One request the fake GitHub received."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.target).path


@dataclass
class FakeGitHub:
    """The pulls API of one repository (``acme/app``), state held in memory."""

    prs: dict[int, dict[str, Any]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""
    fail_create: int | None = None
    """When set, POST …/pulls answers this status ..."""
    fail_times: int | None = None
    """... this many times (None: every time)."""

    def add(self, head: str, **fields: Any) -> dict[str, Any]:
        number = len(self.prs) + 1
        pr = {
            "number": number,
            "html_url": f"https://github.example/acme/app/pull/{number}",
            "state": "open",
            "merged": False,
            "head": {"ref": head, "label": f"acme:{head}"},
            **fields,
        }
        self.prs[number] = pr
        return pr

    def requests(self, method: str, path: str | None = None) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.method == method and (path is None or s.path == path)]

    def answer(self, seen: Seen) -> tuple[int, Any]:
        with self.lock:
            self.seen.append(seen)
            path, query = seen.path, parse_qs(urlsplit(seen.target).query)
            failing = self.fail_create and (self.fail_times is None or self.fail_times > 0)
            if seen.method == "POST" and path == PULLS and failing:
                if self.fail_times is not None:
                    self.fail_times -= 1
                return self.fail_create, {"message": "Server Error"}
            if seen.method == "POST" and path == PULLS:
                data = json.loads(seen.body)
                if any(
                    p["head"]["ref"] == data["head"] and p["state"] == "open"
                    for p in self.prs.values()
                ):
                    return 422, {
                        "message": "Validation Failed",
                        "errors": [{"message": "A pull request already exists"}],
                    }
                pr = self.add(
                    data["head"], title=data["title"], body=data["body"], base={"ref": data["base"]}
                )
                return 201, pr
            if seen.method == "GET" and path == PULLS:
                owner_head = query.get("head", [""])[0]
                state = query.get("state", ["open"])[0]
                return 200, [
                    p
                    for p in self.prs.values()
                    if p["head"]["label"] == owner_head and p["state"] == state
                ]
            match = re.fullmatch(PULLS + r"/(\d+)(/merge)?", path)
            if match and int(match.group(1)) in self.prs:
                pr = self.prs[int(match.group(1))]
                if seen.method == "GET" and not match.group(2):
                    return 200, pr
                if seen.method == "PATCH" and not match.group(2):
                    pr.update(json.loads(seen.body))
                    return 200, pr
                if seen.method == "PUT" and match.group(2):
                    if pr["state"] != "open":  # as GitHub answers for a merged or closed PR
                        return 405, {"message": "Pull Request is not mergeable"}
                    pr.update(state="closed", merged=True)
                    return 200, {"merged": True, "message": "Pull Request successfully merged"}
            return 404, {"message": "Not Found"}


class Handler(BaseHTTPRequestHandler):
    server: Server

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        seen = Seen(self.command, self.path, dict(self.headers.items()), self.rfile.read(length))
        status, data = self.server.github.answer(seen)
        body = json.dumps(data).encode()
        self.send_response(status)
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
def github() -> Iterator[FakeGitHub]:
    server = Server(("127.0.0.1", 0), Handler)
    server.github = FakeGitHub(url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.github
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def remote(vault: Vault, tmp_path: Path) -> Path:
    bare = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    git(vault.repo, "remote", "add", "origin", str(bare))
    git(vault.repo, "push", "-q", "origin", "main")  # as on GitHub: the base is there
    return bare


@pytest.fixture
def gh_vault(vault: Vault, github: FakeGitHub, remote: Path) -> Vault:
    vault.write_config(
        delivery=(
            'kind = "github"\nrepository = "acme/app"\nremote = "origin"\n'
            f'token_env = "GITHUB_TOKEN"\napi_url = "{github.url}"'
        )
    )
    return vault


def meta(note: Path) -> dict[str, Any]:
    data = yaml.safe_load(note.read_text().split("---\n")[1])
    assert isinstance(data, dict)
    return data


def set_status(note: Path, status: str) -> None:
    """A person's edit of the note's ``status``."""
    text = note.read_text()
    note.write_text(re.sub(r"(?m)^status: .*$", f"status: {status}", text, count=1))


def registry_job(vault: Vault, fr_id: str) -> dict[str, Any]:
    jobs = json.loads((vault.state / "registry.json").read_text())["jobs"]
    (job,) = [j for j in jobs if j["fr_id"] == fr_id]
    assert isinstance(job, dict)
    return job


async def run_once(vault: Vault) -> Summary:
    environ = {**os.environ, "GITHUB_TOKEN": TOKEN}
    async with Orchestrator(load_config(vault.config), environ=environ) as orch:
        return await orch.run_once()


def files_holding(root: Path, needles: list[bytes]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {n!r}" for n in needles if n in data]
    return found


@pytest.mark.anyio
async def test_delivery_pushes_opens_the_pr_and_detects_the_merge(
    gh_vault: Vault, github: FakeGitHub, remote: Path, tmp_path: Path
) -> None:
    note = gh_vault.note("FR-1.md", NOTE.format(id="FR-1"))
    summary = await run_once(gh_vault)
    assert summary.statuses == {"FR-1": "review"}

    # the branch is on the bare remote, at the commit of the local branch
    pushed = git(remote, "rev-parse", "refs/heads/opus/fr-1")
    assert pushed == git(gh_vault.repo, "rev-parse", "opus/fr-1")
    assert git(remote, "show", "opus/fr-1:FR-1.txt") == "change of iteration 1"

    # one PR, opened with the pr.md body, head → base
    (post,) = github.requests("POST", PULLS)
    sent = json.loads(post.body)
    job = registry_job(gh_vault, "FR-1")
    pr_md = (gh_vault.state / "jobs" / job["id"] / "pr.md").read_text()
    assert sent["body"] == pr_md and "FR-1" in pr_md
    assert (sent["head"], sent["base"], sent["title"]) == ("opus/fr-1", "main", "FR-1: Thing FR-1")
    url = "https://github.example/acme/app/pull/1"
    assert meta(note)["pr_url"] == url
    assert job["pr_url"] == url

    # the token went only to the API, and only as the Authorization header
    for seen in github.seen:
        assert seen.headers.get("Authorization") == f"Bearer {TOKEN}"
        others = {k: v for k, v in seen.headers.items() if k != "Authorization"}
        assert TOKEN not in json.dumps(others)
        assert TOKEN.encode() not in seen.body and TOKEN not in seen.target

    # a later run while the PR is open changes nothing
    summary = await run_once(gh_vault)
    assert summary.statuses == {"FR-1": "review"}
    assert github.requests("GET", f"{PULLS}/1")

    # a person merges the PR on GitHub → done
    github.prs[1].update(state="closed", merged=True)
    summary = await run_once(gh_vault)
    assert summary.statuses == {"FR-1": "done"}
    assert meta(note)["status"] == "done"
    assert github.requests("PUT") == []
    assert len(github.requests("POST")) == 1

    # the token is nowhere on disk: vault, state, repo, bare remote, fixtures
    basic = base64.b64encode(f"x-access-token:{TOKEN}".encode())
    assert files_holding(tmp_path, [TOKEN.encode(), basic]) == []


@pytest.mark.anyio
async def test_a_pr_closed_unmerged_cancels_the_fr(gh_vault: Vault, github: FakeGitHub) -> None:
    note = gh_vault.note("FR-1.md", NOTE.format(id="FR-1"))
    assert (await run_once(gh_vault)).statuses == {"FR-1": "review"}
    github.prs[1].update(state="closed", merged=False)
    assert (await run_once(gh_vault)).statuses == {"FR-1": "cancelled"}
    data = meta(note)
    assert data["status"] == "cancelled"
    assert data["pr_url"] == "https://github.example/acme/app/pull/1"
    assert github.requests("PUT") == []
    # the branch is kept
    assert "opus/fr-1" in git(gh_vault.repo, "branch", "--list", "opus/fr-1")


@pytest.mark.anyio
async def test_approved_merges_the_pr_through_the_api(gh_vault: Vault, github: FakeGitHub) -> None:
    note = gh_vault.note("FR-1.md", NOTE.format(id="FR-1"))
    assert (await run_once(gh_vault)).statuses == {"FR-1": "review"}
    set_status(note, "approved")
    assert (await run_once(gh_vault)).statuses == {"FR-1": "done"}
    (put,) = github.requests("PUT", f"{PULLS}/1/merge")
    assert put.headers.get("Authorization") == f"Bearer {TOKEN}"
    assert json.loads(put.body)["merge_method"] == "merge"
    assert github.prs[1]["merged"] is True
    assert meta(note)["status"] == "done"
    job = registry_job(gh_vault, "FR-1")
    assert job["status"] == "done"
    assert not (gh_vault.state / "worktrees" / job["id"]).exists()


@pytest.mark.anyio
async def test_an_open_pr_for_the_branch_is_adopted(gh_vault: Vault, github: FakeGitHub) -> None:
    github.add("opus/fr-1", title="opened by hand", body="")
    note = gh_vault.note("FR-1.md", NOTE.format(id="FR-1"))
    assert (await run_once(gh_vault)).statuses == {"FR-1": "review"}
    assert len(github.requests("POST", PULLS)) == 1  # answered 422
    (lookup,) = github.requests("GET", PULLS)
    query = parse_qs(urlsplit(lookup.target).query)
    assert query == {"head": ["acme:opus/fr-1"], "state": ["open"]}
    assert meta(note)["pr_url"] == "https://github.example/acme/app/pull/1"
    assert len(github.prs) == 1


@pytest.mark.anyio
async def test_auto_approval_merges_the_new_pr_at_once(gh_vault: Vault, github: FakeGitHub) -> None:
    note = gh_vault.note("FR-1.md", "---\nid: FR-1\napproval: auto\n---\n# Auto\n\nGo.\n")
    assert (await run_once(gh_vault)).statuses == {"FR-1": "done"}
    assert [s.method for s in github.seen] == ["POST", "PUT"]
    assert github.prs[1]["merged"] is True
    assert meta(note)["pr_url"] == "https://github.example/acme/app/pull/1"


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """GitHub's backoff in milliseconds instead of seconds (the schedule is unchanged)."""
    import opus.orchestrator.delivery as delivery

    monkeypatch.setattr(delivery, "RETRY_BASE", 0.01)


@pytest.mark.anyio
@pytest.mark.usefixtures("quick_retries")
async def test_an_api_failure_fails_the_fr_with_a_clean_error(
    gh_vault: Vault, github: FakeGitHub, remote: Path
) -> None:
    github.fail_create = 502
    note = gh_vault.note("FR-1.md", NOTE.format(id="FR-1"))
    assert (await run_once(gh_vault)).statuses == {"FR-1": "failed"}
    retries = load_config(gh_vault.config).pipeline.retries
    assert len(github.requests("POST", PULLS)) == 1 + retries  # SPEC §3.2: retried
    data = meta(note)
    assert "delivery failed" in data["error"] and "502" in data["error"]
    assert TOKEN not in note.read_text()
    assert "pr_url" not in data
    job = registry_job(gh_vault, "FR-1")
    assert job["history"][-1]["stage"] == "delivery"
    assert job["history"][-1]["outcome"] == "error"
    assert git(remote, "rev-parse", "refs/heads/opus/fr-1")  # the push happened first


@pytest.mark.anyio
async def test_a_rework_round_updates_the_same_pr(
    gh_vault: Vault, github: FakeGitHub, remote: Path
) -> None:
    note = gh_vault.note("FR-1.md", NOTE.format(id="FR-1"))
    assert (await run_once(gh_vault)).statuses == {"FR-1": "review"}
    text = note.read_text().replace("status: review", "status: changes-requested\nfeedback: more")
    note.write_text(text)
    assert (await run_once(gh_vault)).statuses == {"FR-1": "review"}
    assert meta(note)["round"] == 2
    assert len(github.requests("POST", PULLS)) == 1  # not recreated
    (patch,) = github.requests("PATCH", f"{PULLS}/1")
    job = registry_job(gh_vault, "FR-1")
    pr_md = (gh_vault.state / "jobs" / job["id"] / "pr.md").read_text()
    assert json.loads(patch.body) == {"body": pr_md} and "round 2" in pr_md
    assert git(remote, "rev-parse", "opus/fr-1") == git(gh_vault.repo, "rev-parse", "opus/fr-1")
    assert git(remote, "show", "opus/fr-1:FR-1.txt") == "change of round 2, iteration 1"


def merged_elsewhere(remote: Path, clone: Path, shared: str) -> str:
    """Another PR merged on GitHub: a commit changing shared.txt pushed to the remote's
    main from a clone of its own; returns that commit."""
    subprocess.run(["git", "clone", "-q", "-b", "main", str(remote), str(clone)], check=True)
    (clone / "shared.txt").write_text(shared)
    git(clone, "add", "shared.txt")
    git(clone, "commit", "-q", "-m", "another PR")
    git(clone, "push", "-q", "origin", "main")
    return git(clone, "rev-parse", "HEAD")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@pytest.mark.anyio
async def test_a_base_moved_on_the_remote_starts_a_conflict_round(
    gh_vault: Vault, github: FakeGitHub, remote: Path, tmp_path: Path
) -> None:
    """Another PR merged on GitHub changed what this one changes: the local base never
    moved, yet approving starts a conflict round against the remote's base, and the PR gets
    the resolution instead of being merged."""
    resolved = {"write": {"shared.txt": "upstream was here\nFR-1 was here\n"}}
    gh_vault.script({"*": {"coder": [{"write": {"shared.txt": "FR-1 was here\n"}}],
                           "coder@2": [resolved]}})  # fmt: skip
    note = gh_vault.note("FR-1.md", NOTE.format(id="FR-1"))
    assert (await run_once(gh_vault)).statuses == {"FR-1": "review"}
    local_main = git(gh_vault.repo, "rev-parse", "main")

    upstream = merged_elsewhere(remote, tmp_path / "elsewhere", "upstream was here\n")

    set_status(note, "approved")
    assert (await run_once(gh_vault)).statuses == {"FR-1": "review"}
    assert meta(note)["round"] == 2
    assert github.requests("PUT") == []  # not merged: it would not have merged cleanly
    (coder,) = gh_vault.runs("coder", "FR-1")[1:]
    feedback = read_json(Path(coder["feedback"]))
    assert feedback["source"] == "conflict"
    assert (
        "`origin/main`" in feedback["message"] and "conflicts in shared.txt" in feedback["message"]
    )
    # the PR's branch now holds the remote's base: it merges cleanly; the local main is as it was
    git(remote, "merge-base", "--is-ancestor", upstream, "opus/fr-1")
    assert git(remote, "show", "opus/fr-1:shared.txt") == "upstream was here\nFR-1 was here"
    assert git(gh_vault.repo, "rev-parse", "main") == local_main
    assert len(github.requests("PATCH", f"{PULLS}/1")) == 1  # the same PR, updated


@pytest.mark.anyio
async def test_a_pr_github_cannot_merge_gets_a_conflict_round_while_in_review(
    gh_vault: Vault, github: FakeGitHub, remote: Path, tmp_path: Path
) -> None:
    """No approval needed: once GitHub says the PR cannot merge and opus's own check agrees,
    a conflict round resolves it; while GitHub says so but the branch merges cleanly,
    nothing starts."""
    resolved = {"write": {"shared.txt": "upstream was here\nFR-1 was here\n"}}
    gh_vault.script({"*": {"coder": [{"write": {"shared.txt": "FR-1 was here\n"}}],
                           "coder@2": [resolved]}})  # fmt: skip
    note = gh_vault.note("FR-1.md", NOTE.format(id="FR-1"))
    assert (await run_once(gh_vault)).statuses == {"FR-1": "review"}

    github.prs[1]["mergeable"] = False  # (GitHub's word alone: the base has not moved)
    assert (await run_once(gh_vault)).statuses == {"FR-1": "review"}
    assert "round" not in meta(note)

    merged_elsewhere(remote, tmp_path / "elsewhere", "upstream was here\n")
    assert (await run_once(gh_vault)).statuses == {"FR-1": "review"}
    assert meta(note)["round"] == 2
    (coder,) = gh_vault.runs("coder", "FR-1")[1:]
    assert read_json(Path(coder["feedback"]))["source"] == "conflict"
    assert git(remote, "show", "opus/fr-1:shared.txt") == "upstream was here\nFR-1 was here"
    assert github.requests("PUT") == []  # a person still approves or merges it


@pytest.mark.anyio
@pytest.mark.usefixtures("quick_retries")
async def test_a_passing_api_failure_is_retried_and_the_pr_opened(
    gh_vault: Vault, github: FakeGitHub
) -> None:
    github.fail_create, github.fail_times = 502, 1
    note = gh_vault.note("FR-1.md", NOTE.format(id="FR-1"))
    assert (await run_once(gh_vault)).statuses == {"FR-1": "review"}
    assert len(github.requests("POST", PULLS)) == 2
    assert meta(note)["pr_url"] == "https://github.example/acme/app/pull/1"


@pytest.mark.anyio
@pytest.mark.usefixtures("quick_retries")
async def test_a_retry_after_a_delivery_replaces_its_own_earlier_push(
    gh_vault: Vault, github: FakeGitHub, remote: Path
) -> None:
    """SPEC §7: a retry reuses the branch name, reset to the base. Its push replaces the
    earlier job's branch on the remote (it was a non-fast-forward, refused for ever)."""
    github.fail_create = 502
    note = gh_vault.note("FR-1.md", NOTE.format(id="FR-1"))
    assert (await run_once(gh_vault)).statuses == {"FR-1": "failed"}
    first = git(remote, "rev-parse", "refs/heads/opus/fr-1")
    github.fail_create = None
    (gh_vault.repo / "base.txt").write_text("the base moved on\n")  # the retry's commit differs
    git(gh_vault.repo, "add", "base.txt")
    git(gh_vault.repo, "commit", "-qm", "base moves")
    set_status(note, "planned")
    assert (await run_once(gh_vault)).statuses == {"FR-1": "review"}, meta(note)
    second = git(remote, "rev-parse", "refs/heads/opus/fr-1")
    assert second != first
    assert second == git(gh_vault.repo, "rev-parse", "refs/heads/opus/fr-1")
    assert meta(note)["branch"] == "opus/fr-1"


@pytest.mark.anyio
@pytest.mark.usefixtures("quick_retries")
async def test_a_retry_never_replaces_commits_someone_else_pushed(
    gh_vault: Vault, github: FakeGitHub, remote: Path, tmp_path: Path
) -> None:
    github.fail_create = 502
    note = gh_vault.note("FR-1.md", NOTE.format(id="FR-1"))
    assert (await run_once(gh_vault)).statuses == {"FR-1": "failed"}
    # a colleague adds a commit to the branch on the remote
    other = tmp_path / "colleague"
    git(tmp_path, "clone", "-q", "-b", "opus/fr-1", str(remote), str(other))
    (other / "theirs.txt").write_text("mine\n")
    git(other, "add", "theirs.txt")
    git(other, "-c", "user.name=C", "-c", "user.email=c@x", "commit", "-qm", "theirs")
    git(other, "push", "-q", "origin", "opus/fr-1")
    theirs = git(remote, "rev-parse", "refs/heads/opus/fr-1")
    github.fail_create = None
    set_status(note, "planned")
    assert (await run_once(gh_vault)).statuses == {"FR-1": "failed"}
    assert "delivery failed" in meta(note)["error"]
    assert git(remote, "rev-parse", "refs/heads/opus/fr-1") == theirs  # kept


@pytest.mark.anyio
async def test_approved_on_a_pr_merged_by_hand_is_done(gh_vault: Vault, github: FakeGitHub) -> None:
    note = gh_vault.note("FR-1.md", NOTE.format(id="FR-1"))
    assert (await run_once(gh_vault)).statuses == {"FR-1": "review"}
    github.prs[1].update(state="closed", merged=True)  # merged on GitHub ...
    set_status(note, "approved")  # ... and approved in the note before opus looked
    assert (await run_once(gh_vault)).statuses == {"FR-1": "done"}
    assert meta(note)["status"] == "done"
