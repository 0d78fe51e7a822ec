"""The presets' shared contract (SPEC §14): the CLI's own error first, endpoint keys mapped
or refused, prices not hidden by a reported 0, no event stream taken for an answer, and
progress that a CLI's waiting chatter does not fake."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from opus.orchestrator.agents.command import CommandAgent, priced_usage
from opus.orchestrator.agents.presets import build_agent
from opus.orchestrator.config import AgentSection
from opus.orchestrator.errors import AgentCrashed, AgentOutputError, AgentStalled, ConfigError
from opus.orchestrator.lifecycle import Stage
from opus.orchestrator.redact import Redactor
from opus.orchestrator.supervisor import run_process

from .conftest import Vault
from .test_presets import environ_with, make_ctx


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def script(bin_dir: Path, name: str, body: str) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / name
    exe.write_text(f"#!{sys.executable}\nimport sys, json, time\n{body}\n")
    exe.chmod(0o755)
    return exe


def test_claude_maps_base_url_and_api_key_env(tmp_path: Path) -> None:
    section = AgentSection(kind="claude", base_url="http://127.0.0.1:9", api_key_env="MY_KEY")
    agent = build_agent(section, Stage.CODER, environ={"MY_KEY": "sk-secret", "PATH": "/bin"})
    env = agent.build_env(make_ctx(tmp_path, Stage.CODER))  # type: ignore[attr-defined]
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:9"
    assert env["ANTHROPIC_API_KEY"] == "sk-secret"
    assert env["CLAUDE_CODE_MAX_RETRIES"] == "0"


def test_an_unset_api_key_env_is_a_config_error() -> None:
    section = AgentSection(kind="claude", api_key_env="NOT_SET_ANYWHERE")
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE, which is not set"):
        build_agent(section, Stage.CODER, environ={})


def test_agent_env_wins_over_the_presets_defaults(tmp_path: Path) -> None:
    section = AgentSection(kind="claude", env={"CLAUDE_CODE_MAX_RETRIES": "3"})
    agent = build_agent(section, Stage.CODER, environ={})
    env = agent.build_env(make_ctx(tmp_path, Stage.CODER))  # type: ignore[attr-defined]
    assert env["CLAUDE_CODE_MAX_RETRIES"] == "3"


def test_a_preset_that_cannot_take_an_endpoint_refuses_it() -> None:
    # the base PresetAgent refuses; a preset maps them once its CLI's way is known
    from opus.orchestrator.agents.preset import PresetAgent

    class Plain(PresetAgent):
        executable = "plain"
        product = "Plain CLI"

    with pytest.raises(ConfigError, match="cannot take base_url / api_key_env") as info:
        # (built unvalidated: the config already refuses both keys on a plain command)
        section = AgentSection.model_construct(
            kind="command", command="x", base_url="u", api_key_env="K"
        )
        Plain(section, Stage.CODER)
    assert info.value.key == "agents.coder"


def test_a_reported_zero_cost_does_not_hide_configured_prices() -> None:
    priced = AgentSection(kind="command", command="x", price_in_per_mtok=2, price_out_per_mtok=8)
    usage = priced_usage(priced, 1_000_000, 500_000, 0.0)
    assert usage.cost_usd == pytest.approx(6.0) and usage.cost_estimated
    assert priced_usage(priced, 10, 10, 0.25).cost_usd == 0.25  # a real cost wins
    unpriced = AgentSection(kind="command", command="x")
    assert priced_usage(unpriced, 10, 10, 0.0).cost_usd == 0.0


@pytest.mark.anyio
async def test_no_final_message_never_becomes_the_plan(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    script(
        bin_dir,
        "claude",
        "if '--version' in sys.argv: print('2.1.197'); sys.exit(0)\n"
        "print(json.dumps({'type': 'system', 'subtype': 'init'}))\n"
        "print(json.dumps({'type': 'assistant', 'message': {'content': []}}))",
    )
    agent = build_agent(AgentSection(kind="claude"), Stage.PLANNER, environ=environ_with(bin_dir))
    with pytest.raises(AgentOutputError, match="claude ended without a final message"):
        await agent.run(make_ctx(tmp_path, Stage.PLANNER))


@pytest.mark.anyio
@pytest.mark.parametrize(("code", "retryable"), [("authentication_failed", False),
                                                 ("server_error", True)])  # fmt: skip
async def test_claude_error_codes_decide_without_a_status(
    tmp_path: Path, code: str, retryable: bool
) -> None:
    bin_dir = tmp_path / "bin"
    said = "Not logged in · Please run /login"
    events = [
        {"type": "assistant", "error": code, "message": {"content": [{"text": said}]}},
        {"type": "result", "is_error": True, "api_error_status": None, "result": said},
    ]
    lines = "".join(f"print({json.dumps(json.dumps(e))})\n" for e in events)
    script(bin_dir, "claude", f"if '--version' in sys.argv: sys.exit(0)\n{lines}sys.exit(1)")
    agent = build_agent(AgentSection(kind="claude"), Stage.PLANNER, environ=environ_with(bin_dir))
    with pytest.raises(AgentCrashed, match="Not logged in") as info:
        await agent.run(make_ctx(tmp_path, Stage.PLANNER))
    assert info.value.retryable is retryable


@pytest.mark.anyio
async def test_claude_refusing_its_arguments_is_permanent(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    script(
        bin_dir,
        "claude",
        "if '--version' in sys.argv: print('2.1.197'); sys.exit(0)\n"
        "sys.stderr.write(\"error: unknown option '--nope'\\n(Did you mean --name?)\\n\")\n"
        "sys.exit(1)",
    )
    section = AgentSection(kind="claude", args=["--nope"])
    agent = build_agent(section, Stage.PLANNER, environ=environ_with(bin_dir))
    with pytest.raises(AgentCrashed, match="refused its arguments: error: unknown option") as info:
        await agent.run(make_ctx(tmp_path, Stage.PLANNER))
    assert not info.value.retryable


@pytest.mark.anyio
async def test_exit_status_names_a_line_with_words(tmp_path: Path) -> None:
    exe = script(
        tmp_path / "bin",
        "tool",
        "sys.stderr.write(json.dumps({'error': {'message': 'bad auth'}}, indent=1) + '\\n')\n"
        "sys.exit(41)",
    )
    agent = CommandAgent(AgentSection(kind="command", command=[str(exe)]), Stage.PLANNER)
    with pytest.raises(AgentCrashed) as info:
        await agent.run(make_ctx(tmp_path, Stage.PLANNER))
    assert "status 41" in str(info.value) and "bad auth" in str(info.value)
    assert not str(info.value).endswith(": }")


CHATTER = """\
import time
for _ in range(200):
    print('Reconnecting... waiting', flush=True)
    time.sleep(0.05)
"""


@pytest.mark.anyio
async def test_output_that_is_not_progress_does_not_keep_a_stall_quiet(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(AgentStalled) as info:
        await run_process(
            [sys.executable, "-c", CHATTER],
            cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin"},
            stdin=None,
            timeout=30,
            stall_timeout=0.5,
            log_file=tmp_path / "log",
            redactor=Redactor(),
            counts=lambda tag, line: not line.startswith("Reconnecting"),
            grace=0.5,
        )
    assert time.monotonic() - started < 5
    assert "no progress in its output" in str(info.value)
    assert "Reconnecting... waiting" in str(info.value)  # its own words


@pytest.mark.anyio
async def test_any_output_is_progress_without_a_filter(tmp_path: Path) -> None:
    result = await run_process(
        [sys.executable, "-c", CHATTER.replace("200", "20")],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
        stdin=None,
        timeout=30,
        stall_timeout=0.5,
        log_file=tmp_path / "log",
        redactor=Redactor(),
    )
    assert result.returncode == 0 and result.stdout.count("Reconnecting") == 20


def test_validate_names_what_a_preset_refuses(vault: Vault) -> None:
    from opus.orchestrator.checks import agent_problems
    from opus.orchestrator.config import load_config

    vault.write_config(**{"agents.planner": 'kind = "claude"\napi_key_env = "NOPE_UNSET_KEY"'})
    problems = agent_problems(load_config(vault.config), environ={"PATH": "/usr/bin:/bin"})
    assert f"{vault.config}: [agents.planner] api_key_env names NOPE_UNSET_KEY" in "\n".join(
        problems
    )
    ok = agent_problems(load_config(vault.config), environ={"NOPE_UNSET_KEY": "k", "PATH": ""})
    assert not [p for p in ok if "api_key_env" in p]
