"""The codex and gemini presets' own rules (the real CLIs prove them in tests/real_cli/)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import anyio
import pytest

from opus.orchestrator.agents.codex import CodexAgent, _counts, git_commit_dirs
from opus.orchestrator.agents.gemini import CODER_POLICY, GeminiAgent
from opus.orchestrator.config import AgentSection
from opus.orchestrator.errors import AgentCrashed
from opus.orchestrator.lifecycle import Stage
from opus.orchestrator.supervisor import ProcessResult

from .test_presets import anyio_backend, make_ctx  # noqa: F401 (a fixture)

ENV = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent-home", "K": "sk-secret"}


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_a_worktrees_commit_dirs_are_its_git_dir_objects_and_its_branchs_ref_folders(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "-c", "user.name=a", "-c", "user.email=a@b", "commit", "-q", "--allow-empty",
        "-m", "x")  # fmt: skip
    git(repo, "worktree", "add", "-q", "-b", "job", str(tmp_path / "wt"))
    common = (repo / ".git").resolve()
    (common / "logs" / "refs" / "heads").mkdir(parents=True, exist_ok=True)
    dirs = git_commit_dirs(tmp_path / "wt")
    # only the job branch's ref folder: other branches (the person's main) stay shut, as in
    # opus's sandbox, where codex's own sandbox nests (its writable roots must be writable)
    assert dirs == [common / "worktrees" / "wt", common / "objects", common / "refs" / "heads",
                    common / "logs" / "refs" / "heads"]  # fmt: skip
    assert common / "hooks" not in dirs and common not in dirs  # hooks and config stay shut


def test_codex_maps_the_endpoint_to_a_provider_of_its_own(tmp_path: Path) -> None:
    section = AgentSection(kind="codex", base_url="http://127.0.0.1:9/v1", api_key_env="K")
    agent = CodexAgent(section, Stage.REVIEWER, environ=ENV)
    argv = agent.build_argv(make_ctx(tmp_path, Stage.REVIEWER))
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "-c"]
    assert 'model_provider="opus"' in overrides
    assert 'model_providers.opus.base_url="http://127.0.0.1:9/v1"' in overrides
    assert 'model_providers.opus.wire_api="responses"' in overrides
    assert 'model_providers.opus.env_key="K"' in overrides
    assert "model_providers.opus.request_max_retries=0" in overrides
    assert "allow_login_shell=false" in overrides
    assert argv[argv.index("--sandbox") : argv.index("--sandbox") + 2] == ["--sandbox", "read-only"]
    assert "--add-dir" not in argv and "--ignore-user-config" in argv
    assert "sk-secret" not in " ".join(argv)  # the key goes by environment only
    assert agent.build_env(make_ctx(tmp_path, Stage.REVIEWER))["K"] == "sk-secret"


def test_codex_gets_a_temp_folder_of_its_own_when_its_home_is_under_the_temp_folder(
    tmp_path: Path,
) -> None:
    environ = {**ENV, "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path)}
    agent = CodexAgent(AgentSection(kind="codex"), Stage.CODER, environ=environ)
    ctx = make_ctx(tmp_path, Stage.CODER)
    env = agent.build_env(ctx)
    assert env["TMPDIR"] != str(tmp_path)
    assert not (tmp_path / "home" / ".codex").is_relative_to(env["TMPDIR"])


def result(code: int, stdout: str = "", stderr: str = "") -> ProcessResult:
    return ProcessResult(returncode=code, stdout=stdout, stderr=stderr, signal=None)


def events(*items: dict[str, object]) -> str:
    return "".join(json.dumps(i) + "\n" for i in items)


@pytest.mark.parametrize(
    ("said", "retryable"),
    [
        ("unexpected status 401 Unauthorized: Incorrect API key provided", False),
        ("Missing environment variable: `K`.", False),
        ("We're currently experiencing high demand, which may cause temporary errors.", True),
    ],
)
def test_codex_reads_its_own_error_before_the_exit_status(
    tmp_path: Path, said: str, retryable: bool
) -> None:
    agent = CodexAgent(AgentSection(kind="codex"), Stage.PLANNER, environ=ENV)
    out = events(
        {"type": "turn.started"},
        {"type": "error", "message": f"Reconnecting... 1/5 ({said})"},
        {"type": "turn.failed", "error": {"message": said}},
    )
    error = agent.cli_error(make_ctx(tmp_path, Stage.PLANNER), result(1, out))
    assert isinstance(error, AgentCrashed)
    assert str(error) == f"codex: {said}" and error.retryable is retryable


def test_codexs_reconnecting_notices_are_no_progress() -> None:
    waiting = {"type": "error", "message": "Reconnecting... waiting for network (Connection)"}
    assert not _counts("out", json.dumps(waiting))
    assert _counts("out", json.dumps({"type": "item.completed", "item": {}}))
    assert not _counts("err", "Reading additional input from stdin...")


def test_gemini_runs_in_a_home_of_its_own_with_the_api_key_auth_selected(
    tmp_path: Path,
) -> None:
    real = tmp_path / "real-home"
    (real / ".gemini").mkdir(parents=True)
    (real / ".gemini" / "settings.json").write_text('{"mcpServers": {"mine": {}}}')
    (real / ".gemini" / "oauth_creds.json").write_text("{}")
    section = AgentSection(kind="gemini", base_url="http://127.0.0.1:9", api_key_env="K")
    environ = {**ENV, "HOME": str(real), "TMPDIR": str(tmp_path)}
    agent = GeminiAgent(section, Stage.CODER, environ=environ)
    ctx = make_ctx(tmp_path, Stage.CODER)
    env = agent.build_env(ctx)
    assert env["GOOGLE_GEMINI_BASE_URL"] == "http://127.0.0.1:9"
    assert env["GEMINI_API_KEY"] == "sk-secret"
    home = agent.own_home(env)
    assert home.parent == tmp_path  # in the temp folder it gets (the sandbox's private one)
    own = home / ".gemini"
    settings = json.loads((own / "settings.json").read_text())
    assert settings["security"]["auth"]["selectedType"] == "gemini-api-key"
    assert settings["privacy"]["usageStatisticsEnabled"] is False and "mcpServers" not in settings
    assert (own / "oauth_creds.json").resolve() == real / ".gemini" / "oauth_creds.json"
    assert not (own / "settings.json").samefile(real / ".gemini" / "settings.json")
    argv = agent.build_argv(ctx)
    policy = Path(argv[argv.index("--policy") + 1])
    assert policy.read_text() == CODER_POLICY and "--skip-trust" in argv
    reviewer = GeminiAgent(section, Stage.REVIEWER, environ=ENV).build_argv(ctx)
    assert reviewer[reviewer.index("--approval-mode") + 1] == "plan" and "--policy" not in reviewer


@pytest.mark.parametrize(
    ("code", "stdout", "stderr", "said", "retryable"),
    [
        (55, "", "Gemini CLI is not running in a trusted directory. To proceed, …",
         "Gemini CLI is not running in a trusted directory", False),
        (41, "", "Warning: 256-color support not detected.\nInvalid auth method selected.\n",
         "Invalid auth method selected.", False),
        (1, events({"type": "result", "status": "error", "error": {"message":
         '[API Error: {"error":{"code":401,"message":"API key not valid.",'
         '"status":"UNAUTHENTICATED"}}]'}}),
         "", "API key not valid.", False),
        (1, events({"type": "result", "status": "error", "error": {"message":
         "[API Error: exception TypeError: fetch failed sending request]"}}),
         "", "fetch failed sending request", True),
    ],
)  # fmt: skip
def test_gemini_reads_its_own_error_on_stdout_or_stderr(
    tmp_path: Path, code: int, stdout: str, stderr: str, said: str, retryable: bool
) -> None:
    agent = GeminiAgent(AgentSection(kind="gemini"), Stage.PLANNER, environ=ENV)
    error = agent.cli_error(make_ctx(tmp_path, Stage.PLANNER), result(code, stdout, stderr))
    assert isinstance(error, AgentCrashed)
    assert str(error).startswith("gemini: ") and said in str(error), str(error)
    assert error.retryable is retryable


@pytest.mark.anyio
async def test_gemini_gets_its_home_in_its_temp_folder_for_the_run_only(tmp_path: Path) -> None:
    from .test_presets import calls, environ_with, install

    bin_dir = tmp_path / "bin"
    install(bin_dir, "gemini")
    temp = tmp_path / "temp"
    temp.mkdir()
    environ = {**environ_with(bin_dir), "TMPDIR": str(temp)}
    agent = GeminiAgent(AgentSection(kind="gemini"), Stage.PLANNER, environ=environ)
    result = await agent.run(make_ctx(tmp_path, Stage.PLANNER))
    assert "Plan from gemini" in result.output
    (call,) = [c for c in calls(bin_dir) if "argv" in c]
    home = Path(call["env"]["GEMINI_CLI_HOME"])
    assert home.parent == temp and home.name.startswith("opus-gemini-")
    assert not await anyio.Path(home).exists()  # removed once the run is over
