"""The opencode and aider presets' own rules (SPEC §14), read from the outputs the real CLIs
gave (opencode 1.18.33, aider 0.86.2 against tests/real_cli/servers/chat.py); the real CLIs
themselves run in tests/real_cli."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opus.orchestrator.agents.aider import AiderAgent, answer_of, error_of
from opus.orchestrator.agents.opencode import OpencodeAgent
from opus.orchestrator.config import AgentSection
from opus.orchestrator.errors import AgentError, ConfigError
from opus.orchestrator.lifecycle import Stage
from opus.orchestrator.supervisor import ProcessResult

from .test_presets import make_ctx

OPENCODE_401 = json.dumps(
    {
        "type": "error",
        "error": {
            "name": "APIError",
            "data": {
                "message": "Incorrect API key provided: sk-bad",
                "statusCode": 401,
                "isRetryable": False,
            },
        },
    }
)
OPENCODE_500 = OPENCODE_401.replace("401", "500").replace("false", "true")
OPENCODE_UNKNOWN_MODEL = (
    '{"type":"error","error":{"name":"UnknownError","data":{"message":"Unexpected server'
    ' error. Check server logs for details.","ref":"err_2f6c"}}}'
)
OPENCODE_LOG = (
    "timestamp=2026-12-01T14:43:44.846Z level=ERROR run=44d5 message=failed ref=err_2f6c "
    'error="ProviderModelNotFoundError: Model not found: opus/nope." cause="…"\n'
)
STEP = json.dumps(
    {
        "type": "step_finish",
        "part": {"tokens": {"input": 120, "output": 30, "cache": {"read": 0}}, "cost": 0},
    }
)


def own(*lines: str) -> str:
    """Lines as aider writes its own into the chat history: "> " first, two spaces last."""
    return "".join(f"> {line}  \n" for line in lines)


AIDER_HISTORY = (
    "\n# aider chat started at 2026-12-01 14:44:48\n\n"
    + own(
        'Update git name with: git config user.name "Your Name"',
        "/venv/bin/aider --message-file /p.md --yes-always",
        "Aider v0.86.2",
        "Model: openai/scripted with ask edit format",
    )
    + "\n#### Plan the greet() helper. See https://example.com/docs for details.  \n\n"
    + "## Plan\n\n1. Add `greet()` to `hello.py`.\n\n2. Test it.\n\n"
    + own("Tokens: 120 sent, 30 received.")
)
AIDER_500 = "\n#### Plan.  \n" + own(
    "litellm.InternalServerError: InternalServerError: OpenAIException - boom",
    "The API provider's servers are down or overloaded.",
    "Retrying in 0.2 seconds...",
    "litellm.InternalServerError: InternalServerError: OpenAIException - boom",
    "The API provider's servers are down or overloaded.",
)


def section(kind: str, **keys: object) -> AgentSection:
    return AgentSection.model_validate({"kind": kind, **keys})


def result(stdout: str, stderr: str = "", code: int = 0) -> ProcessResult:
    return ProcessResult(returncode=code, stdout=stdout, stderr=stderr, signal=None)


# -- opencode ------------------------------------------------------------------------------


def test_opencode_read_only_stages_deny_edit_bash_and_task(tmp_path: Path) -> None:
    for stage in (Stage.PLANNER, Stage.REVIEWER):
        agent = OpencodeAgent(section("opencode"), stage)
        env = agent.cli_env(make_ctx(tmp_path, stage))
        assert json.loads(env["OPENCODE_PERMISSION"]) == {
            "edit": "deny",
            "bash": "deny",
            "task": "deny",
        }
    coder = OpencodeAgent(section("opencode"), Stage.CODER)
    allowed = json.loads(coder.cli_env(make_ctx(tmp_path, Stage.CODER))["OPENCODE_PERMISSION"])
    assert allowed["edit"] == "allow" and allowed["bash"]["*"] == "allow"
    assert allowed["bash"]["git push *"] == "deny"


def test_opencode_never_installs_updates_or_phones_home(tmp_path: Path) -> None:
    env = OpencodeAgent(section("opencode"), Stage.CODER).cli_env(make_ctx(tmp_path, Stage.CODER))
    for name in ("OPENCODE_DISABLE_AUTOUPDATE", "OPENCODE_DISABLE_MODELS_FETCH"):
        assert env[name] == "1"
    assert env["OPENCODE_DISABLE_LSP_DOWNLOAD"] == "1" and env["npm_config_offline"] == "true"
    config = json.loads(env["OPENCODE_CONFIG_CONTENT"])
    assert config == {"autoupdate": False, "share": "disabled"}


def test_opencode_base_url_becomes_a_custom_provider(tmp_path: Path) -> None:
    keys = {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "MY_KEY", "model": "m1"}
    agent = OpencodeAgent(section("opencode", **keys), Stage.CODER, environ={"MY_KEY": "sk-1"})
    ctx = make_ctx(tmp_path, Stage.CODER)
    env = agent.build_env(ctx)
    config = json.loads(env["OPENCODE_CONFIG_CONTENT"])
    provider = config["provider"]["opus"]
    assert provider["npm"] == "@ai-sdk/openai-compatible"
    assert provider["options"] == {"baseURL": "http://127.0.0.1:9/v1", "apiKey": "{env:MY_KEY}"}
    assert env["MY_KEY"] == "sk-1" and "sk-1" not in env["OPENCODE_CONFIG_CONTENT"]
    argv = agent.build_argv(ctx)
    assert argv[argv.index("--model") + 1] == "opus/m1"
    assert "--title" in argv  # no separate title request, whose usage no event reports
    assert agent.stdin_for(ctx) == ctx.prompt.encode()  # any size, no file to read


def test_opencode_refuses_what_it_cannot_map() -> None:
    with pytest.raises(ConfigError, match="needs `model`"):
        OpencodeAgent(section("opencode", base_url="http://x/v1"), Stage.CODER)
    with pytest.raises(ConfigError, match="api_key_env only with base_url"):
        OpencodeAgent(section("opencode", api_key_env="K"), Stage.CODER, environ={"K": "v"})


@pytest.mark.parametrize(
    ("stdout", "stderr", "words", "retryable"),
    [
        (OPENCODE_401, "", "Incorrect API key provided: sk-bad (HTTP 401)", False),
        (OPENCODE_500, "", "Incorrect API key provided: sk-bad (HTTP 500)", True),
        (OPENCODE_UNKNOWN_MODEL, OPENCODE_LOG, "ProviderModelNotFoundError: Model not", False),
    ],
)
def test_opencode_errors_in_its_words(
    tmp_path: Path, stdout: str, stderr: str, words: str, retryable: bool
) -> None:
    agent = OpencodeAgent(section("opencode", price_in_per_mtok=1.0), Stage.PLANNER)
    ctx = make_ctx(tmp_path, Stage.PLANNER)
    error = agent.cli_error(ctx, result(STEP + "\n" + stdout, stderr, code=1))
    assert isinstance(error, AgentError)
    assert words in str(error) and error.retryable is retryable
    assert error.usage is not None and error.usage.input_tokens == 120  # still paid for


def test_opencode_zero_cost_does_not_hide_the_configured_prices(tmp_path: Path) -> None:
    keys = {"price_in_per_mtok": 3.0, "price_out_per_mtok": 15.0}
    agent = OpencodeAgent(section("opencode", **keys), Stage.CODER)
    text = json.dumps({"type": "text", "part": {"text": "done"}})
    reply = agent.reply(make_ctx(tmp_path, Stage.CODER), result(f"{text}\n{STEP}\n"))
    assert reply.text == "done" and reply.usage is not None
    assert reply.usage.cost_usd == pytest.approx((120 * 3.0 + 30 * 15.0) / 1e6)
    assert reply.usage.cost_estimated


# -- aider ---------------------------------------------------------------------------------


def test_aider_answer_is_the_models_alone() -> None:
    assert answer_of(AIDER_HISTORY) == "## Plan\n\n1. Add `greet()` to `hello.py`.\n\n2. Test it."
    assert answer_of(AIDER_500) == ""


def test_aider_errors_say_which_are_permanent() -> None:
    said = error_of(AIDER_500)
    assert said is not None and said[1] is True and "InternalServerError" in said[0]
    auth = error_of(own("litellm.AuthenticationError: AuthenticationError: bad key"))
    assert auth is not None and auth[1] is False
    assert error_of(AIDER_HISTORY) is None


def test_aider_endpoint_error_fails_the_attempt_instead_of_becoming_the_plan(
    tmp_path: Path,
) -> None:
    agent = AiderAgent(section("aider"), Stage.PLANNER)
    ctx = make_ctx(tmp_path, Stage.PLANNER)
    ctx.output_file.write_text(AIDER_500)
    error = agent.cli_error(ctx, result("Aider v0.86.2\n"))
    assert error is not None and error.retryable
    assert str(error).startswith("aider: litellm.InternalServerError")
    ctx.output_file.write_text(AIDER_HISTORY)
    assert agent.cli_error(ctx, result("")) is None


def test_aider_flags_and_base_url(tmp_path: Path) -> None:
    keys = {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "MY_KEY", "model": "m1"}
    agent = AiderAgent(section("aider", **keys), Stage.REVIEWER, environ={"MY_KEY": "sk-1"})
    ctx = make_ctx(tmp_path, Stage.REVIEWER)
    argv = agent.build_argv(ctx)
    for flag in ("--no-detect-urls", "--no-analytics", "--no-check-update", "--no-gitignore"):
        assert flag in argv
    assert "--analytics-disable" not in argv
    assert argv[argv.index("--chat-history-file") + 1] == str(ctx.output_file)
    assert argv[argv.index("--model") + 1] == "openai/m1"
    assert argv[argv.index("--openai-api-base") + 1] == "http://127.0.0.1:9/v1"
    assert "--chat-mode" in argv and "--dry-run" in argv
    env = agent.build_env(ctx)
    assert env["OPENAI_API_KEY"] == "sk-1" and int(env["COLUMNS"]) >= 1000
    with pytest.raises(ConfigError, match="api_key_env only with base_url"):
        AiderAgent(section("aider", api_key_env="K"), Stage.CODER, environ={"K": "v"})


def test_aider_own_files_are_removed_after_a_run(tmp_path: Path) -> None:
    worktree = tmp_path / "wt"
    (worktree / ".aider.tags.cache.v4").mkdir(parents=True)
    (worktree / ".aider.tags.cache.v4" / "cache.db").write_text("x")
    (worktree / ".aider.input.history").write_text("mine")  # there before: kept
    AiderAgent._drop_own_files(worktree, before={".aider.input.history"})
    assert not (worktree / ".aider.tags.cache.v4").exists()
    assert (worktree / ".aider.input.history").exists()
