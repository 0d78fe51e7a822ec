"""The ``python`` agent kind and CallableAgent: loading, calling, adapting results."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

from opus.orchestrator.agents.base import StageContext, StageResult
from opus.orchestrator.agents.python import CallableAgent, PythonAgent
from opus.orchestrator.config import AgentSection
from opus.orchestrator.errors import AgentError, AgentOutputError, AgentTimeout
from opus.orchestrator.lifecycle import Stage
from opus.orchestrator.models import FeatureRequest, Usage, Verdict
from opus.orchestrator.redact import Redactor


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_ctx(tmp_path: Path, stage: Stage, **kw: Any) -> StageContext:
    fr = FeatureRequest(id="FR-7", title="Greet", path=tmp_path / "FR-7.md", body="Say hello.")
    defaults: dict[str, Any] = {
        "stage": stage,
        "iteration": 1,
        "job_id": "job-7",
        "fr": fr,
        "worktree": tmp_path,
        "artifacts": tmp_path,
        "prompt": "do it",
        "prompt_file": tmp_path / "prompt.md",
        "output_file": tmp_path / "out",
        "log_file": tmp_path / "log",
        "base_commit": "HEAD",
        "timeout": 10.0,
        "stall_timeout": 10.0,
    }
    defaults.update(kw)
    return StageContext(**defaults)


def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> str:
    name = f"opus_test_agent_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


MODULE = """
import threading
from opus.orchestrator.agents.base import StageResult

seen = []

def plan(ctx):
    seen.append(threading.get_ident())
    return f"plan for {ctx.fr.id}"

async def review(ctx):
    return {"verdict": "approve", "confidence": 91, "summary": "fine"}

def boom(ctx):
    raise ValueError("disk on fire")

class Holder:
    @staticmethod
    def test(ctx):
        return False
"""


@pytest.mark.anyio
async def test_python_kind_sync_runs_in_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = write_module(tmp_path, monkeypatch, MODULE)
    agent = PythonAgent(AgentSection(kind="python", callable=f"{mod}:plan"), Stage.PLANNER)
    result = await agent.run(make_ctx(tmp_path, Stage.PLANNER))
    assert result.output == "plan for FR-7"
    assert result.passed
    import importlib

    seen = importlib.import_module(mod).seen
    assert seen and seen[0] != threading.get_ident()


@pytest.mark.anyio
async def test_python_kind_async_dict_becomes_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = write_module(tmp_path, monkeypatch, MODULE)
    agent = PythonAgent(AgentSection(kind="python", callable=f"{mod}:review"), Stage.REVIEWER)
    result = await agent.run(make_ctx(tmp_path, Stage.REVIEWER))
    assert result.verdict == Verdict(verdict="approve", confidence=91, summary="fine")
    assert result.output == "fine"


@pytest.mark.anyio
async def test_python_kind_dotted_attribute_and_bool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = write_module(tmp_path, monkeypatch, MODULE)
    agent = PythonAgent(AgentSection(kind="python", callable=f"{mod}:Holder.test"), Stage.TESTER)
    result = await agent.run(make_ctx(tmp_path, Stage.TESTER))
    assert result.passed is False


@pytest.mark.anyio
async def test_import_error_names_the_callable_and_is_lazy(tmp_path: Path) -> None:
    section = AgentSection(kind="python", callable="no_such_pkg_opus.mod:fn")
    agent = PythonAgent(section, Stage.CODER)  # constructing imports nothing
    with pytest.raises(AgentError) as info:
        await agent.run(make_ctx(tmp_path, Stage.CODER))
    assert info.value.retryable is False
    assert "'no_such_pkg_opus.mod:fn'" in str(info.value)
    assert "[agents.coder]" in str(info.value)
    assert "ModuleNotFoundError" in str(info.value)


@pytest.mark.anyio
async def test_missing_attribute_names_the_callable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = write_module(tmp_path, monkeypatch, MODULE)
    agent = PythonAgent(AgentSection(kind="python", callable=f"{mod}:nope"), Stage.CODER)
    with pytest.raises(AgentError, match=f"{mod}:nope.*AttributeError") as info:
        await agent.run(make_ctx(tmp_path, Stage.CODER))
    assert not info.value.retryable


@pytest.mark.anyio
async def test_other_exceptions_become_permanent_agent_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = write_module(tmp_path, monkeypatch, MODULE)
    agent = PythonAgent(AgentSection(kind="python", callable=f"{mod}:boom"), Stage.CODER)
    with pytest.raises(AgentError) as info:
        await agent.run(make_ctx(tmp_path, Stage.CODER))
    assert type(info.value) is AgentError
    assert not info.value.retryable
    assert "ValueError: disk on fire" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.anyio
async def test_agent_errors_propagate_unchanged(tmp_path: Path) -> None:
    error = AgentError("try again", retryable=True)

    async def fn(ctx: StageContext) -> str:
        raise error

    with pytest.raises(AgentError) as info:
        await CallableAgent(fn).run(make_ctx(tmp_path, Stage.PLANNER))
    assert info.value is error


@pytest.mark.anyio
async def test_exception_text_is_redacted(tmp_path: Path) -> None:
    def fn(ctx: StageContext) -> str:
        raise RuntimeError("token s3cr3t-value leaked")

    ctx = make_ctx(tmp_path, Stage.PLANNER, redactor=Redactor(["s3cr3t-value"]))
    with pytest.raises(AgentError) as info:
        await CallableAgent(fn).run(ctx)
    assert "s3cr3t-value" not in str(info.value)
    assert "***" in str(info.value)


@pytest.mark.parametrize(
    ("stage", "value", "expected"),
    [
        (Stage.PLANNER, "the plan", StageResult(output="the plan")),
        (Stage.CODER, "did it", StageResult(output="did it")),
        (Stage.CODER, None, StageResult()),
        (Stage.TESTER, "3 passed", StageResult(output="3 passed", passed=True)),
        (Stage.TESTER, True, StageResult(output="passed", passed=True)),
        (Stage.TESTER, False, StageResult(output="failed", passed=False)),
        (
            Stage.REVIEWER,
            '{"verdict": "request_changes", "summary": "no"}',
            StageResult(output="no", verdict=Verdict(verdict="request_changes", summary="no")),
        ),
        (
            Stage.REVIEWER,
            Verdict(verdict="approve", confidence=99, summary="ok"),
            StageResult(
                output="ok", verdict=Verdict(verdict="approve", confidence=99, summary="ok")
            ),
        ),
        (
            Stage.CODER,
            StageResult(output="x", passed=False, usage=Usage(input_tokens=3)),
            StageResult(output="x", passed=False, usage=Usage(input_tokens=3)),
        ),
    ],
)
@pytest.mark.anyio
async def test_return_values_are_adapted(
    tmp_path: Path, stage: Stage, value: object, expected: StageResult
) -> None:
    result = await CallableAgent(lambda ctx: value).run(make_ctx(tmp_path, stage))
    assert result == expected


@pytest.mark.parametrize(
    ("stage", "value"),
    [
        (Stage.PLANNER, 42),
        (Stage.PLANNER, None),
        (Stage.PLANNER, True),
        (Stage.PLANNER, {"verdict": "approve"}),
        (Stage.REVIEWER, {"verdict": "maybe"}),
        (Stage.REVIEWER, "not json"),
        (Stage.REVIEWER, StageResult(output="no verdict")),
    ],
)
@pytest.mark.anyio
async def test_unusable_return_values_are_permanent_output_errors(
    tmp_path: Path, stage: Stage, value: object
) -> None:
    with pytest.raises(AgentOutputError) as info:
        await CallableAgent(lambda ctx: value, name="my_fn").run(make_ctx(tmp_path, stage))
    assert not info.value.retryable
    assert "my_fn returned" in str(info.value)
    assert str(stage) in str(info.value)


@pytest.mark.anyio
async def test_async_callable_object_and_timeout(tmp_path: Path) -> None:
    class Slow:
        async def __call__(self, ctx: StageContext) -> str:
            await anyio.Event().wait()  # never set: the timeout must end it
            return "unreachable"

    with pytest.raises(AgentTimeout):
        await CallableAgent(Slow()).run(make_ctx(tmp_path, Stage.PLANNER, timeout=0.05))


@pytest.mark.anyio
async def test_sync_callable_returning_a_coroutine_is_awaited(tmp_path: Path) -> None:
    async def inner() -> str:
        return "from a coroutine"

    result = await CallableAgent(lambda ctx: inner()).run(make_ctx(tmp_path, Stage.PLANNER))
    assert result.output == "from a coroutine"
