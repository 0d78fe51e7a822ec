"""opus.toml: defaults, one clear error per problem, paths, and which values are secrets."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from opus.orchestrator.config import load_config
from opus.orchestrator.errors import ConfigError
from opus.orchestrator.lifecycle import Stage


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vault" / "opus.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_every_default_of_the_spec(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[repos.app]\npath = "../app"\n'))
    assert config.vault.planned == "10_features/03_planned"
    assert config.vault.dashboard == "00_system/opus-dashboard.md"
    assert (config.state.dir, config.state.keep_days) == (".opus", 30)
    repo = config.repos["app"]
    assert (repo.base, repo.branch_prefix) == ("main", "opus/")
    p = config.polling
    assert (p.watch, p.active, p.idle_max, p.backoff, p.debounce_ms) == (True, 30, 300, 2.0, 250)
    q = config.pipeline
    assert (q.max_iterations, q.concurrency, q.stage_timeout, q.stall_timeout, q.retries,
            q.preempt) == (3, 3, 1800, 600, 2, True)  # fmt: skip
    assert config.approval.mode == "manual" and config.approval.min_confidence == 90
    assert config.delivery.kind == "local" and config.delivery.token_env == "GITHUB_TOKEN"
    assert [n.kind for n in config.notify] == ["log"]
    assert (config.budget.daily_usd, config.budget.monthly_usd) == (0, 0)
    assert config.service.shutdown_grace == 60
    assert config.agents.for_stage(Stage.TESTER).command == "python -m pytest -q"


def test_relative_paths_resolve_against_the_files_folder(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[repos.app]\npath = "../app"\n'))
    assert config.repo_path("app") == (tmp_path / "app").resolve()
    assert config.planned_dir == tmp_path / "vault" / "10_features" / "03_planned"
    assert config.state_dir == tmp_path / "vault" / ".opus"
    assert config.default_repo == "app"


@pytest.mark.parametrize(
    ("text", "key", "says"),
    [
        ('[repos.app]\npath = "a"\n[pipeline]\nconcurency = 3\n', "pipeline.concurency",
         "unknown key"),
        ('[repos.app]\npath = "a"\n[pipeline]\nconcurrency = "three"\n', "pipeline.concurrency",
         "integer"),
        ("[repos.app]\nbase = 'main'\n", "repos.app.path", "missing required value"),
        ('[repos.app]\npath = "a"\n[agents.coder]\nkind = "command"\n', "agents.coder",
         "needs `command`"),
        ('[repos.app]\npath = "a"\n[approval]\nauto_priorities = ["urgent"]\n',
         "approval.auto_priorities", "unknown priority"),
        # SPEC §14: a key the agent's kind does not use is refused, never silently ignored
        ('[repos.app]\npath = "a"\n[agents.coder]\nkind = "claude"\ntemperature = 0.2\n',
         "agents.coder", "kind = 'claude' does not use `temperature`"),
        ('[repos.app]\npath = "a"\n[agents.planner]\nkind = "codex"\nstdin = false\n',
         "agents.planner", "kind = 'codex' does not use `stdin`"),
        ('[repos.app]\npath = "a"\n[agents.tester]\nkind = "command"\ncommand = "t"\n'
         'model = "m"\n', "agents.tester", "kind = 'command' does not use `model`"),
        ('[repos.app]\npath = "a"\n[agents.reviewer]\nkind = "openai"\nmodel = "m"\n'
         'env = { A = "1" }\nnetwork = false\n', "agents.reviewer",
         "kind = 'openai' does not use `env`, `network`"),
        ('[repos.app]\npath = "a"\n[agents.ideator]\nkind = "python"\ncallable = "m:f"\n'
         'max_tokens = 9\n', "agents.ideator", "kind = 'python' does not use `max_tokens`"),
        # plan notes in the planned folder would each be a new FR, without end
        ('[repos.app]\npath = "a"\n[vault]\nplans = "10_features/03_planned"\n', "vault",
         "plans: must be a folder outside the planned folder"),
        ('[repos.app]\npath = "a"\n[vault]\nplanned = "p"\nplans = "p/plans"\n', "vault",
         "outside the planned folder"),
        ('[repos.app]\npath = "a"\nbranch_prefix = "my work/"\n', "repos.app.branch_prefix",
         "does not start a git branch name"),
    ],
)  # fmt: skip
def test_a_bad_file_names_the_key_and_the_file(
    tmp_path: Path, text: str, key: str, says: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key is not None and info.value.key.startswith(key)
    assert str(path) in str(info.value) and says in str(info.value)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[repos.app\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nowhere.toml")


def test_secrets_are_the_env_keys_values_and_credential_like_names(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
[repos.app]
path = "a"
[delivery]
kind = "github"
repository = "acme/app"
[agents.reviewer]
kind = "openai"
model = "m"
api_key_env = "LLM_KEY"
[agents.coder]
kind = "claude"
env_passthrough = ["ANTHROPIC_API_KEY", "LANGUAGE"]
env = { SERVICE_TOKEN = "tok-in-the-file", MODE = "fast" }
""",
        )
    )
    environ = {"GITHUB_TOKEN": "ghp-1234", "LLM_KEY": "sk-5678", "ANTHROPIC_API_KEY": "ak-9",
               "LANGUAGE": "en_GB"}  # fmt: skip
    assert sorted(config.secrets(environ)) == sorted(
        ["ghp-1234", "sk-5678", "ak-9", "tok-in-the-file"]
    )


@pytest.mark.parametrize(
    "prefix",
    ["opus/", "feature-", "a.b/", "my work/", "x..", "-x", "a/.b/", "w.lock/", "a//", "q?", "t~",
     "c:", "@{", "tab\t", "back\\", "ok_1/", "é/"],
)  # fmt: skip
def test_branch_prefix_is_checked_as_git_checks_a_branch_name(tmp_path: Path, prefix: str) -> None:
    """The prefix is refused exactly when git refuses ``<prefix>fr-1`` as a branch."""
    git = subprocess.run(["git", "check-ref-format", "--branch", f"{prefix}fr-1"], check=False)
    path = write(tmp_path, f'[repos.app]\npath = "a"\nbranch_prefix = {json.dumps(prefix)}\n')
    try:
        load_config(path)
        refused = False
    except ConfigError as e:
        assert e.key == "repos.app.branch_prefix"
        refused = True
    assert refused == (git.returncode != 0)
