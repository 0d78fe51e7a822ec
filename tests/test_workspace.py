"""The workspace against real git repositories in tmp_path (and one loopback HTTP server)."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from opus.orchestrator import workspace as workspace_module
from opus.orchestrator.errors import ConflictMarkers, MergeConflict, WorkspaceError
from opus.orchestrator.workspace import Created, Workspace

TOKEN = "ghp_s3cretTOKENvalue1234567890"
BASIC = base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
PERSON = {
    "GIT_AUTHOR_NAME": "Person",
    "GIT_AUTHOR_EMAIL": "person@example.org",
    "GIT_COMMITTER_NAME": "Person",
    "GIT_COMMITTER_EMAIL": "person@example.org",
}


@pytest.fixture(autouse=True)
def no_global_git_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No global identity, no system config: the workspace must not need them."""
    empty = tmp_path / "empty-gitconfig"
    empty.write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(empty))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for name in (*PERSON, "EMAIL", "GIT_DIR", "GIT_WORK_TREE"):
        monkeypatch.delenv(name, raising=False)
    for name in (
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)


def git(cwd: Path, *args: str) -> str:
    """Run git as the person would (their own identity)."""
    done = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **PERSON},
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


def commit_file(cwd: Path, name: str, text: str, message: str = "change") -> str:
    (cwd / name).write_text(text)
    git(cwd, "add", "-A")
    git(cwd, "commit", "-q", "-m", message)
    return git(cwd, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    (path / "README.md").write_text("# app\n")
    commit_file(path, "a.txt", "one\ntwo\nthree\n", "initial")
    return path


@pytest.fixture
def ws(repo: Path, tmp_path: Path) -> Workspace:
    return Workspace(repo, base="main", worktrees_dir=tmp_path / "state" / "worktrees")


def branches(repo: Path) -> set[str]:
    return set(git(repo, "for-each-ref", "--format=%(refname:short)", "refs/heads/").split())


def worktree_paths(repo: Path) -> list[str]:
    out = git(repo, "worktree", "list", "--porcelain")
    return [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("worktree ")]


# -- check ----------------------------------------------------------------------------------


def test_constructing_does_no_io(tmp_path: Path) -> None:
    Workspace(tmp_path / "nowhere", base="main", worktrees_dir=tmp_path / "wt")
    assert list(tmp_path.iterdir()) == [tmp_path / "empty-gitconfig"]


def test_check_accepts_a_repository_with_its_base(ws: Workspace, repo: Path) -> None:
    refs = git(repo, "for-each-ref")
    ws.check()  # no WorkspaceError …
    # … and checking changes nothing: no worktree folder, no ref, a clean tree
    assert not ws.worktrees_dir.exists()
    assert git(repo, "for-each-ref") == refs
    assert git(repo, "status", "--porcelain") == ""


def test_check_accepts_a_bare_repository(repo: Path, tmp_path: Path) -> None:
    git(tmp_path, "clone", "-q", "--bare", str(repo), "bare.git")
    ws = Workspace(tmp_path / "bare.git", base="main", worktrees_dir=tmp_path / "wt")
    ws.check()  # no WorkspaceError, and nothing created
    assert not (tmp_path / "wt").exists()
    # the same check on a bare clone without the base branch does fail
    with pytest.raises(WorkspaceError, match="base branch 'develop' not found"):
        Workspace(tmp_path / "bare.git", base="develop", worktrees_dir=tmp_path / "wt").check()


def test_check_rejects_a_folder_that_is_not_a_repository(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(
        WorkspaceError, match=re.escape(f"repository {plain}: not a git repository")
    ):
        Workspace(plain, base="main", worktrees_dir=tmp_path / "wt").check()
    with pytest.raises(WorkspaceError, match="not a git repository"):
        Workspace(tmp_path / "missing", base="main", worktrees_dir=tmp_path / "wt").check()


def test_check_rejects_a_missing_base_branch(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(
        WorkspaceError, match=re.escape(f"base branch 'develop' not found in {repo}")
    ):
        Workspace(repo, base="develop", worktrees_dir=tmp_path / "wt").check()


# -- create / resume / remove ---------------------------------------------------------------


def test_create_adds_a_worktree_on_a_new_branch_from_base(ws: Workspace, repo: Path) -> None:
    base = git(repo, "rev-parse", "main")
    created = ws.create("job-1", "opus/fr-1")
    assert created == Created(ws.worktrees_dir.absolute() / "job-1", "opus/fr-1", base)
    assert (created.path / "a.txt").read_text() == "one\ntwo\nthree\n"
    assert git(created.path, "symbolic-ref", "HEAD") == "refs/heads/opus/fr-1"
    assert ws.head(created.path) == base == ws.base_commit()
    assert git(repo, "symbolic-ref", "HEAD") == "refs/heads/main"
    assert git(repo, "status", "--porcelain") == ""
    assert ws.worktrees_dir.stat().st_mode & 0o777 == 0o700  # SPEC §8: state folders 0700


def test_a_taken_branch_name_gets_the_first_free_suffix(ws: Workspace, repo: Path) -> None:
    first = ws.create("job-1", "opus/fr-1")
    second = ws.create("job-2", "opus/fr-1")
    git(repo, "branch", "opus/fr-1-3")
    third = ws.create("job-3", "opus/fr-1")
    assert (first.branch, second.branch, third.branch) == (
        "opus/fr-1",
        "opus/fr-1-2",
        "opus/fr-1-4",
    )
    assert git(second.path, "symbolic-ref", "--short", "HEAD") == "opus/fr-1-2"


def test_create_again_returns_the_existing_worktree_unchanged(ws: Workspace, repo: Path) -> None:
    created = ws.create("job-1", "opus/fr-1")
    (created.path / "half-done.txt").write_text("work in progress")
    commit_file(repo, "later.txt", "base moved on")
    assert ws.create("job-1", "opus/fr-1") == created
    assert (created.path / "half-done.txt").read_text() == "work in progress"
    suffixed = ws.create("job-2", "opus/fr-1")
    assert ws.create("job-2", "opus/fr-1") == suffixed


def test_create_refuses_a_folder_that_is_not_its_worktree(ws: Workspace) -> None:
    stray = ws.worktrees_dir / "job-1"
    stray.mkdir(parents=True)
    with pytest.raises(WorkspaceError, match="exists and is not a worktree"):
        ws.create("job-1", "opus/fr-1")
    ws.create("job-2", "opus/fr-2")
    with pytest.raises(WorkspaceError, match="is on opus/fr-2, not opus/fr-9"):
        ws.create("job-2", "opus/fr-9")
    with pytest.raises(WorkspaceError, match="invalid job id"):
        ws.create("../escape", "opus/fr-3")


def test_create_recovers_from_a_worktree_folder_deleted_by_hand(ws: Workspace, repo: Path) -> None:
    created = ws.create("job-1", "opus/fr-1")
    subprocess.run(["rm", "-rf", str(created.path)], check=True)
    again = ws.create("job-1", "opus/fr-1")
    assert again.branch == "opus/fr-1"  # it held nothing beyond the base: reused
    assert again.path.is_dir()


def test_a_retry_reuses_the_branch_unless_a_person_committed_to_it(
    ws: Workspace, repo: Path
) -> None:
    first = ws.create("job-1", "opus/fr-1")
    (first.path / "opus.txt").write_text("opus's work")
    mine = ws.commit_all(first.path, "opus(FR-1): coder", since=first.base_commit)
    assert mine is not None
    ws.remove(first.path)
    again = ws.create("job-2", "opus/fr-1", reusable={mine})
    assert again.branch == "opus/fr-1" and ws.head(again.path) == ws.base_commit()  # reset
    (again.path / "person.txt").write_text("a person's fix")
    git(again.path, "add", "-A")
    git(again.path, "commit", "-q", "-m", "a person's commit")
    ws.remove(again.path)
    third = ws.create("job-3", "opus/fr-1", reusable={mine})
    assert third.branch == "opus/fr-1-2"  # the person's commit is kept on opus/fr-1
    assert "person.txt" in git(repo, "ls-tree", "--name-only", "opus/fr-1")


def test_remove_deletes_the_worktree_and_keeps_the_branch(ws: Workspace, repo: Path) -> None:
    created = ws.create("job-1", "opus/fr-1")
    (created.path / "dirty.txt").write_text("uncommitted")
    ws.remove(created.path)
    assert not created.path.exists()
    assert str(created.path) not in worktree_paths(repo)
    assert "opus/fr-1" in branches(repo)
    ws.remove(created.path)  # idempotent


def test_git_failures_are_one_line_workspace_errors(ws: Workspace) -> None:
    with pytest.raises(WorkspaceError) as caught:
        ws.create("job-1", "bad..name")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("git worktree add")
    assert "fatal:" in message
    assert caught.value.__cause__ is not None


# -- commits, reset, diffs ------------------------------------------------------------------


def test_commit_all_commits_every_change_as_opus(ws: Workspace) -> None:
    created = ws.create("job-1", "opus/fr-1")
    (created.path / "new.txt").write_text("new\n")
    (created.path / "README.md").unlink()
    (created.path / "a.txt").write_text("changed\n")
    head = ws.commit_all(created.path, "opus(FR-1): coder, iteration 1", since=created.base_commit)
    assert head is not None and head != created.base_commit
    assert head == ws.head(created.path)
    assert git(created.path, "status", "--porcelain") == ""
    assert git(created.path, "log", "-1", "--format=%an <%ae>|%cn|%s") == (
        "opus <opus@localhost>|opus|opus(FR-1): coder, iteration 1"
    )


def test_commit_all_without_changes_returns_none(ws: Workspace) -> None:
    created = ws.create("job-1", "opus/fr-1")
    assert ws.commit_all(created.path, "nothing", since=created.base_commit) is None
    assert ws.head(created.path) == created.base_commit


def test_commit_all_reports_the_agents_own_commit(ws: Workspace) -> None:
    created = ws.create("job-1", "opus/fr-1")
    agent_head = commit_file(created.path, "agent.txt", "by the agent\n", "agent did it")
    assert ws.commit_all(created.path, "opus: coder", since=created.base_commit) == agent_head
    (created.path / "more.txt").write_text("after its commit\n")
    head = ws.commit_all(created.path, "opus: coder", since=created.base_commit)
    assert head is not None and head != agent_head
    assert git(created.path, "rev-parse", "HEAD~1") == agent_head


def test_commit_all_uses_a_custom_author(repo: Path, tmp_path: Path) -> None:
    ws = Workspace(repo, base="main", worktrees_dir=tmp_path / "wt", author=("Bot", "bot@x.io"))
    created = ws.create("job-1", "opus/fr-1")
    (created.path / "x.txt").write_text("x")
    ws.commit_all(created.path, "m", since=created.base_commit)
    assert git(created.path, "log", "-1", "--format=%an <%ae>") == "Bot <bot@x.io>"


def test_reset_discards_work_after_the_checkpoint(ws: Workspace) -> None:
    created = ws.create("job-1", "opus/fr-1")
    wt = created.path
    (wt / ".gitignore").write_text("venv/\n")
    (wt / "kept.txt").write_text("checkpointed\n")
    checkpoint = ws.commit_all(wt, "stage 1", since=created.base_commit)
    assert checkpoint is not None
    (wt / "venv").mkdir()
    (wt / "venv" / "lib.py").write_text("ignored, stays")
    commit_file(wt, "committed-later.txt", "after the checkpoint")
    (wt / "kept.txt").write_text("half-done edit\n")
    (wt / "scratch").mkdir()
    (wt / "scratch" / "untracked.txt").write_text("half-done file")
    ws.reset(wt, checkpoint)
    assert ws.head(wt) == checkpoint
    assert (wt / "kept.txt").read_text() == "checkpointed\n"
    assert not (wt / "committed-later.txt").exists()
    assert not (wt / "scratch").exists()
    assert (wt / "venv" / "lib.py").read_text() == "ignored, stays"


def test_diff_diff_stat_and_changed_files(ws: Workspace) -> None:
    created = ws.create("job-1", "opus/fr-1")
    wt = created.path
    (wt / "a.txt").write_text("one\nTWO\nthree\n")
    (wt / "new file.txt").write_text("hello\n")
    (wt / "README.md").unlink()
    (wt / "uncommitted.txt").write_text("not in the branch yet")
    git(wt, "add", "a.txt", "new file.txt", "README.md")
    git(wt, "commit", "-q", "-m", "work")
    diff = ws.diff(wt, created.base_commit)
    assert "diff --git a/a.txt b/a.txt" in diff
    assert "-two\n+TWO\n" in diff
    assert "+hello\n" in diff
    assert "deleted file mode" in diff
    assert "uncommitted" not in diff
    assert diff.endswith("\n")
    stat = ws.diff_stat(wt, created.base_commit)
    assert "3 files changed" in stat
    assert "a.txt" in stat
    assert ws.changed_files(wt, created.base_commit) == ["README.md", "a.txt", "new file.txt"]
    assert ws.diff(wt, ws.head(wt)) == ""
    assert ws.changed_files(wt, ws.head(wt)) == []


def test_diff_survives_bytes_that_are_not_utf8(ws: Workspace) -> None:
    created = ws.create("job-1", "opus/fr-1")
    (created.path / "latin1.txt").write_bytes(b"caf\xe9\n")
    ws.commit_all(created.path, "latin-1", since=created.base_commit)
    diff = ws.diff(created.path, created.base_commit)
    assert "+caf\ufffd" in diff
    diff.encode("utf-8")  # no lone surrogates


def work_on_branch(ws: Workspace, job: str = "job-1", name: str = "b.txt") -> Created:
    created = ws.create(job, f"opus/{job}")
    (created.path / name).write_text(f"{job}\n")
    assert ws.commit_all(created.path, f"work of {job}", since=created.base_commit)
    return created


def test_is_merged_before_and_after_a_merge(ws: Workspace, repo: Path) -> None:
    created = work_on_branch(ws)
    assert ws.is_merged(created.branch) is False
    git(repo, "merge", "-q", "--ff-only", created.branch)
    assert ws.is_merged(created.branch) is True
    with pytest.raises(WorkspaceError, match="merge-base"):
        ws.is_merged("no-such-branch")


def test_merge_fast_forwards_the_checked_out_base(ws: Workspace, repo: Path) -> None:
    created = work_on_branch(ws)
    branch_head = ws.head(created.path)
    new = ws.merge(created.branch, "Merge FR-1")
    assert new == branch_head == git(repo, "rev-parse", "main") == git(repo, "rev-parse", "HEAD")
    assert (repo / "b.txt").read_text() == "job-1\n"
    assert git(repo, "status", "--porcelain") == ""
    assert ws.is_merged(created.branch)
    assert ws.merge(created.branch, "again") == new  # already merged: nothing to do


def test_merge_commit_in_the_checked_out_base(ws: Workspace, repo: Path) -> None:
    created = work_on_branch(ws)
    person = commit_file(repo, "c.txt", "the person's work\n")
    new = ws.merge(created.branch, "Merge FR-1 into main")
    assert git(repo, "rev-parse", "main") == new
    assert git(repo, "log", "-1", "--format=%P|%s|%cn", new) == (
        f"{person} {ws.head(created.path)}|Merge FR-1 into main|opus"
    )
    assert (repo / "b.txt").exists() and (repo / "c.txt").exists()
    assert git(repo, "status", "--porcelain") == ""


@pytest.mark.parametrize("diverged", [False, True], ids=["fast-forward", "merge-commit"])
def test_merge_when_base_is_not_checked_out(ws: Workspace, repo: Path, diverged: bool) -> None:
    created = work_on_branch(ws)
    if diverged:
        commit_file(repo, "c.txt", "base moved\n")
    git(repo, "checkout", "-q", "-b", "other")
    (repo / "untracked-of-person.txt").write_text("mine")
    old_base = git(repo, "rev-parse", "main")
    new = ws.merge(created.branch, "Merge FR-1")
    assert git(repo, "rev-parse", "main") == new != old_base
    parents = git(repo, "log", "-1", "--format=%P", new).split()
    assert parents == ([old_base, ws.head(created.path)] if diverged else [old_base])
    assert git(repo, "merge-base", "--is-ancestor", created.branch, "main") == ""
    assert git(repo, "symbolic-ref", "--short", "HEAD") == "other"
    assert not (repo / "b.txt").exists()
    assert git(repo, "status", "--porcelain") == "?? untracked-of-person.txt"
    assert sorted(worktree_paths(repo)) == sorted([str(repo), str(created.path)])
    assert sorted(p.name for p in ws.worktrees_dir.iterdir()) == ["job-1"]
    assert "opus: merge opus/job-1" in git(repo, "reflog", "show", "main", "-1")


def test_merge_in_a_bare_repository(repo: Path, tmp_path: Path) -> None:
    git(tmp_path, "clone", "-q", "--bare", str(repo), "bare.git")
    bare = tmp_path / "bare.git"
    ws = Workspace(bare, base="main", worktrees_dir=tmp_path / "wt")
    created = work_on_branch(ws)
    new = ws.merge(created.branch, "Merge")
    assert git(bare, "rev-parse", "main") == new == ws.head(created.path)
    assert worktree_paths(bare) == [str(bare), str(created.path)]


def test_conflict_in_the_checked_out_base(ws: Workspace, repo: Path) -> None:
    created = ws.create("job-1", "opus/fr-1")
    (created.path / "a.txt").write_text("one\nBRANCH\nthree\n")
    (created.path / "README.md").write_text("# branch readme\n")
    ws.commit_all(created.path, "branch side", since=created.base_commit)
    base = commit_file(repo, "a.txt", "one\nBASE\nthree\n", "base side")
    commit_file(repo, "README.md", "# base readme\n", "base readme")
    base = git(repo, "rev-parse", "HEAD")
    with pytest.raises(MergeConflict) as caught:
        ws.merge(created.branch, "Merge")
    assert caught.value.paths == ["README.md", "a.txt"]
    assert (caught.value.branch, caught.value.base) == ("opus/fr-1", "main")
    assert git(repo, "rev-parse", "main") == base
    assert git(repo, "status", "--porcelain") == ""
    assert (repo / "a.txt").read_text() == "one\nBASE\nthree\n"
    assert not (repo / ".git" / "MERGE_HEAD").exists()


def test_conflict_when_base_is_not_checked_out(ws: Workspace, repo: Path) -> None:
    created = ws.create("job-1", "opus/fr-1")
    (created.path / "a.txt").write_text("one\nBRANCH\nthree\n")
    ws.commit_all(created.path, "branch side", since=created.base_commit)
    base = commit_file(repo, "a.txt", "one\nBASE\nthree\n", "base side")
    git(repo, "checkout", "-q", "-b", "other")
    with pytest.raises(MergeConflict, match=r"conflicts in: a\.txt") as caught:
        ws.merge(created.branch, "Merge")
    assert caught.value.paths == ["a.txt"]
    assert git(repo, "rev-parse", "main") == base
    assert sorted(p.name for p in ws.worktrees_dir.iterdir()) == ["job-1"]
    assert len(worktree_paths(repo)) == 2


def test_merge_refuses_a_dirty_checked_out_base(ws: Workspace, repo: Path) -> None:
    created = work_on_branch(ws)
    base = git(repo, "rev-parse", "main")
    (repo / "a.txt").write_text("the person is editing\n")
    with pytest.raises(WorkspaceError, match=re.escape(f"{repo} has uncommitted changes")):
        ws.merge(created.branch, "Merge")
    assert git(repo, "rev-parse", "main") == base
    assert (repo / "a.txt").read_text() == "the person is editing\n"
    (repo / "a.txt").write_text("one\ntwo\nthree\n")
    (repo / "untracked.txt").write_text("untracked files do not block a merge")
    assert ws.merge(created.branch, "Merge") == ws.head(created.path)


def test_merge_of_a_missing_branch_fails(ws: Workspace) -> None:
    with pytest.raises(WorkspaceError, match="branch 'opus/nothing' not found in"):
        ws.merge("opus/nothing", "Merge")


# -- push and remotes -----------------------------------------------------------------------


@pytest.fixture
def remote(repo: Path, tmp_path: Path) -> Path:
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare))
    git(repo, "remote", "add", "origin", str(bare))
    return bare


def all_bytes_under(*roots: Path) -> Iterator[tuple[Path, bytes]]:
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                yield path, path.read_bytes()


def test_remote_url(ws: Workspace, remote: Path) -> None:
    assert ws.remote_url("origin") == str(remote)
    assert ws.remote_url("upstream") is None


def test_push_to_a_local_bare_remote(ws: Workspace, repo: Path, remote: Path) -> None:
    created = work_on_branch(ws)
    ws.push(created.path, created.branch, "origin", None)
    assert git(remote, "rev-parse", created.branch) == ws.head(created.path)


def test_push_with_a_token_leaves_no_trace_of_it(
    ws: Workspace, repo: Path, remote: Path, tmp_path: Path
) -> None:
    created = work_on_branch(ws)
    ws.push(created.path, created.branch, "origin", TOKEN)
    assert git(remote, "rev-parse", created.branch) == ws.head(created.path)
    for path, data in all_bytes_under(repo / ".git", remote, created.path):
        assert TOKEN.encode() not in data, path
        assert BASIC.encode() not in data, path


def test_rejected_push_raises_without_the_token(ws: Workspace, repo: Path, remote: Path) -> None:
    created = work_on_branch(ws)
    ws.push(created.path, created.branch, "origin", TOKEN)
    commit_file(repo, "elsewhere.txt", "someone else pushed this\n")
    git(repo, "push", "-q", "--force", str(remote), f"main:refs/heads/{created.branch}")
    with pytest.raises(WorkspaceError) as caught:
        ws.push(created.path, created.branch, "origin", TOKEN)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("git push")
    assert "rejected" in message
    assert TOKEN not in message and BASIC not in message


class _Recorder(BaseHTTPRequestHandler):
    seen: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        _Recorder.seen.append(self.headers.get("Authorization"))
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_remote() -> Iterator[str]:
    _Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_push_sends_the_token_as_a_header_only(ws: Workspace, repo: Path, http_remote: str) -> None:
    git(repo, "remote", "add", "gh", f"http://user:urlsecret@{http_remote}/octo/app.git")
    created = work_on_branch(ws)
    with pytest.raises(WorkspaceError) as caught:
        ws.push(created.path, created.branch, "gh", TOKEN)
    assert _Recorder.seen and all(h == f"basic {BASIC}" for h in _Recorder.seen)
    message = str(caught.value)
    assert message.startswith("git push")
    assert "\n" not in message
    for secret in (TOKEN, BASIC, "urlsecret"):
        assert secret not in message


def test_fetch_base_fills_the_tracking_ref_and_leaves_the_local_base(
    ws: Workspace, repo: Path, remote: Path, tmp_path: Path
) -> None:
    git(repo, "push", "-q", "origin", "main")
    local = git(repo, "rev-parse", "main")
    elsewhere = tmp_path / "elsewhere"
    git(tmp_path, "clone", "-q", "-b", "main", str(remote), str(elsewhere))
    commit_file(elsewhere, "upstream.txt", "merged on the remote\n")
    git(elsewhere, "push", "-q", "origin", "main")
    ref = ws.fetch_base("origin", TOKEN)
    assert ref == "refs/remotes/origin/main"
    assert ws.base_commit(ref) == git(elsewhere, "rev-parse", "HEAD") != local
    assert ws.base_commit() == git(repo, "rev-parse", "main") == local  # not moved
    for path, data in all_bytes_under(repo / ".git"):
        assert TOKEN.encode() not in data and BASIC.encode() not in data, path


def test_a_failed_fetch_raises_without_the_token(
    ws: Workspace, repo: Path, http_remote: str
) -> None:
    git(repo, "remote", "add", "gh", f"http://user:urlsecret@{http_remote}/octo/app.git")
    with pytest.raises(WorkspaceError) as caught:
        ws.fetch_base("gh", TOKEN)
    assert _Recorder.seen and all(h == f"basic {BASIC}" for h in _Recorder.seen)
    message = str(caught.value)
    assert message.startswith("git fetch") and "\n" not in message
    for secret in (TOKEN, BASIC, "urlsecret"):
        assert secret not in message


def test_public_names() -> None:
    assert set(workspace_module.__all__) == {
        "PUSH_TIMEOUT",
        "Created",
        "Workspace",
        "worktree_fingerprint",
    }


def test_concurrent_creates_get_distinct_branches(ws: Workspace, repo: Path) -> None:
    results: list[Created] = []
    errors: list[BaseException] = []

    def create(job: str) -> None:
        try:
            results.append(ws.create(job, "opus/fr-1"))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=create, args=(f"job-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert sorted(c.branch for c in results) == [
        "opus/fr-1",
        "opus/fr-1-2",
        "opus/fr-1-3",
        "opus/fr-1-4",
    ]
    assert len(worktree_paths(repo)) == 5


# -- refs read from git's files ---------------------------------------------------------------


def test_heads_and_refs_read_from_files_agree_with_git(ws: Workspace, repo: Path) -> None:
    from opus.orchestrator.workspace import read_head, read_ref

    created = ws.create("job-1", "opus/fr-1")
    commit_file(created.path, "a.txt", "a\n")
    assert read_head(created.path) == git(created.path, "rev-parse", "HEAD")  # a worktree
    assert read_head(repo) == git(repo, "rev-parse", "HEAD")  # the checkout
    assert read_ref(repo, "refs/heads/opus/fr-1") == git(repo, "rev-parse", "opus/fr-1")
    git(repo, "pack-refs", "--all")  # packed refs only now
    assert not (repo / ".git" / "refs" / "heads" / "opus" / "fr-1").exists()
    assert read_ref(repo, "refs/heads/opus/fr-1") == git(repo, "rev-parse", "opus/fr-1")
    assert read_head(created.path) == ws.head(created.path)
    git(created.path, "checkout", "-q", "--detach")
    assert read_head(created.path) == git(created.path, "rev-parse", "HEAD")
    assert read_ref(repo, "refs/heads/nope") is None
    assert read_ref(repo, "refs/heads/../../HEAD") is None


def test_a_base_still_where_the_branch_began_is_not_merged_to_check(
    ws: Workspace, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = ws.create("job-1", "opus/fr-1")
    commit_file(created.path, "a.txt", "mine\n")
    ran: list[list[str]] = []
    real = subprocess.run

    def run(cmd: list[str], *a: object, **k: object) -> object:
        ran.append(cmd)
        return real(cmd, *a, **k)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "run", run)
    assert ws.conflicts_with_base("opus/fr-1", forked_from=created.base_commit) == []
    assert not any("merge-tree" in c for c in ran)
    commit_file(repo, "a.txt", "theirs\n")  # the base moves: now it must be merged to know
    assert ws.conflicts_with_base("opus/fr-1", forked_from=created.base_commit) == ["a.txt"]
    assert any("merge-tree" in c for c in ran)


def test_commit_all_sees_markers_in_the_agents_own_commits_and_commits_only_what_is_staged(
    ws: Workspace,
) -> None:
    created = ws.create("job-1", "opus/fr-1")
    base = created.base_commit
    assert ws.commit_all(created.path, "nothing", since=base) is None
    own = commit_file(created.path, "b.txt", "agent's own\n")  # the agent committed itself
    assert ws.commit_all(created.path, "m", since=base) == own  # nothing left to commit
    (created.path / "c.txt").write_text("<<<<<<< ours\nx\n=======\ny\n>>>>>>> theirs\n")
    commit_file(created.path, "d.txt", "fine\n")
    (created.path / "c.txt").unlink()
    commit_file(created.path, "e.txt", "<<<<<<< a\n1\n=======\n2\n>>>>>>> b\n")
    with pytest.raises(ConflictMarkers):
        ws.commit_all(created.path, "m", since=base)  # a marker in a committed file counts
