"""The ``python`` agent kind: a Python callable runs a stage (SPEC §5).

The callable takes the :class:`StageContext` and may be sync (run in a worker thread) or async
(awaited). What it returns is adapted to a :class:`StageResult`:

- a ``StageResult``: as is (a reviewer's must carry a ``verdict``);
- a ``str``: the planner's plan, the coder's message, the tester's output (passed), the
  reviewer's verdict JSON;
- a ``bool``: the tester's (or coder's) ``passed``;
- a ``dict`` or a ``Verdict``: the reviewer's verdict (validated);
- ``None``: the coder changed the worktree and has nothing to say.

Anything else is a permanent :class:`AgentOutputError`. An ``AgentError`` raised by the
callable propagates; any other exception becomes a permanent ``AgentError`` naming its type.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
from pydantic import ValidationError

from ..config import AgentSection
from ..errors import AgentError, AgentOutputError, AgentTimeout
from ..lifecycle import Stage
from ..models import Verdict
from .base import StageContext, StageResult

logger = logging.getLogger(__name__)

StageFunction = Callable[[StageContext], Any]


class CallableAgent:
    """Runs ``fn(ctx)`` for a stage; ``name`` is used in error messages."""

    def __init__(self, fn: StageFunction, *, name: str | None = None) -> None:
        self._fn: StageFunction | None = fn
        self.name = name or getattr(fn, "__qualname__", None) or repr(fn)

    def _function(self) -> StageFunction:
        assert self._fn is not None
        return self._fn

    async def run(self, ctx: StageContext) -> StageResult:
        fn = self._function()
        try:
            with anyio.fail_after(ctx.timeout):
                value = await _call(fn, ctx)
        except AgentError:
            raise
        except TimeoutError as e:
            raise AgentTimeout(f"{self.name} did not return within {ctx.timeout:g} s") from e
        except Exception as e:
            message = ctx.redactor(f"{self.name} raised {type(e).__name__}: {e}")
            raise AgentError(message, retryable=False) from e
        return adapt(value, ctx.stage, self.name)


class PythonAgent(CallableAgent):
    """``kind = "python"``: imports ``section.callable`` (``"pkg.mod:fn"``) on first use."""

    def __init__(self, section: AgentSection, stage: Stage) -> None:
        if not section.callable:
            raise AgentError(f"[agents.{stage}] kind = 'python' needs `callable`", retryable=False)
        self.spec = section.callable
        self.stage = stage
        self._fn = None
        self.name = self.spec

    def _function(self) -> StageFunction:
        if self._fn is None:
            self._fn = load_callable(self.spec, self.stage)
        return self._fn


def load_callable(spec: str, stage: Stage | None = None) -> StageFunction:
    """Import ``"pkg.mod:attr.path"``; any failure is a permanent AgentError naming it."""
    where = f" for [agents.{stage}]" if stage else ""
    module_name, _, attr_path = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name.strip())
        for attr in attr_path.strip().split("."):
            target = getattr(target, attr)
    except Exception as e:
        raise AgentError(
            f"cannot load callable {spec!r}{where}: {type(e).__name__}: {e}", retryable=False
        ) from e
    if not callable(target):
        raise AgentError(f"{spec!r}{where} is not callable", retryable=False)
    logger.debug("loaded callable %s%s", spec, where)
    fn: StageFunction = target
    return fn


async def _call(fn: StageFunction, ctx: StageContext) -> Any:
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__):
        return await fn(ctx)
    # A sync callable cannot be interrupted: on timeout its thread is abandoned.
    value = await anyio.to_thread.run_sync(functools.partial(fn, ctx), abandon_on_cancel=True)
    if inspect.isawaitable(value):
        value = await value
    return value


def adapt(value: object, stage: Stage, name: str = "the callable") -> StageResult:
    """Turn what a stage callable returned into a StageResult (see the module docstring)."""
    if isinstance(value, StageResult):
        if stage is Stage.REVIEWER and value.verdict is None:
            raise _bad(name, stage, "a StageResult without a verdict")
        return value
    if isinstance(value, bool):
        if stage in (Stage.TESTER, Stage.CODER):
            return StageResult(passed=value, output="passed" if value else "failed")
        raise _bad(name, stage, "a bool")
    if isinstance(value, Verdict):
        return _review(value, name, stage)
    if isinstance(value, dict):
        return _review(value, name, stage)
    if isinstance(value, str):
        if stage is Stage.REVIEWER:
            try:
                data = json.loads(value)
            except ValueError as e:
                raise _bad(name, stage, f"a str that is not verdict JSON ({e})") from e
            return _review(data, name, stage)
        return StageResult(output=value, passed=True)
    if value is None and stage is Stage.CODER:
        return StageResult()
    raise _bad(name, stage, type(value).__name__)


def _review(value: object, name: str, stage: Stage) -> StageResult:
    if stage is not Stage.REVIEWER:
        raise _bad(name, stage, f"a {type(value).__name__} (only the reviewer returns a verdict)")
    try:
        verdict = value if isinstance(value, Verdict) else Verdict.model_validate(value)
    except ValidationError as e:
        raise _bad(name, stage, f"an invalid verdict: {e}") from e
    return StageResult(output=verdict.summary, verdict=verdict)


def _bad(name: str, stage: Stage, what: str) -> AgentOutputError:
    return AgentOutputError(f"{name} returned {what} for the {stage} stage", retryable=False)
