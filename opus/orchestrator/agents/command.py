"""The ``command`` agent: any program, run under the supervisor per SPEC §5.1.

Presets subclass :class:`CommandAgent` and override ``build_argv`` / ``stdin_for`` (how the
CLI is invoked) and ``reply`` (how its output reads); the rules per stage live in ``parse``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shlex
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import anyio
from pydantic import ValidationError

from ..config import AgentSection
from ..errors import AgentCrashed, AgentError, AgentNotFound, AgentOutputError
from ..lifecycle import Stage
from ..models import Usage, Verdict
from ..process_output import Counts, output_tail
from ..sandbox import exit_signal
from ..supervisor import ProcessResult, run_process
from ..workspace import worktree_fingerprint
from .base import StageContext, StageResult
from .environment import agent_env, opus_vars

__all__ = (
    "PLACEHOLDERS",
    "CommandAgent",
    "Reply",
    "json_objects",
    "parse_verdict",
    "placeholder_values",
    "priced_usage",
    "split_command",
    "substitute",
)

log = logging.getLogger(__name__)

PLACEHOLDERS = ("prompt_file", "output_file", "worktree", "fr_file", "stage", "iteration", "job_id")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
MAX_OUTPUT_FILE = 8 * 2**20
"""Bytes of ``OPUS_OUTPUT_FILE`` read at most."""
_SCAN_CHARS = 2**20
_SCAN_CANDIDATES = 2000


def split_command(command: str | Sequence[str] | None) -> list[str]:
    """An argv from a ``command`` key: a list as is, a string split like a shell would."""
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else list(command)


def placeholder_values(ctx: StageContext) -> dict[str, str]:
    return {
        "prompt_file": str(ctx.prompt_file),
        "output_file": str(ctx.output_file),
        "worktree": str(ctx.worktree),
        "fr_file": str(ctx.fr.path),
        "stage": ctx.stage.value,
        "iteration": str(ctx.iteration),
        "job_id": ctx.job_id,
    }


def substitute(arg: str, values: Mapping[str, str]) -> str:
    """Replace each ``{placeholder}`` of PLACEHOLDERS in ``arg``; other braces stay."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], arg)


def json_objects(text: str) -> Iterator[dict[str, Any]]:
    """Every JSON object in (the last MiB of) ``text``, scanning ``{`` from the end.

    An object nested in another comes before the one holding it; fenced blocks
    (```json … ```) need no special case.
    """
    text = text[-_SCAN_CHARS:]
    decoder = json.JSONDecoder()
    end = len(text)
    for _ in range(_SCAN_CANDIDATES):
        start = text.rfind("{", 0, end)
        if start < 0:
            return
        end = start
        try:
            obj, _stop = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(obj, dict):
            yield obj


_VERDICT_WORDS = {
    "approve": "approve",
    "approved": "approve",
    "request_changes": "request_changes",
    "changes_requested": "request_changes",
    "request changes": "request_changes",
    "request-changes": "request_changes",
}


def parse_verdict(text: str) -> Verdict:
    """The verdict (SPEC §5.3) in ``text``: all of it as JSON, else the last object with a
    ``verdict`` key. ValueError says why there is none."""
    candidates: Iterator[dict[str, Any]]
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, dict) and "verdict" in whole:
        candidates = iter([whole])
    else:
        candidates = (obj for obj in json_objects(text) if "verdict" in obj)
    obj = next(candidates, None)
    if obj is None:
        raise ValueError("no JSON object with a `verdict` key")
    data = dict(obj)
    if isinstance(data["verdict"], str):
        word = data["verdict"].strip().lower()
        data["verdict"] = _VERDICT_WORDS.get(word, word)
    # the verdict word decides; the rest is taken as well as it can be, never a reason to
    # throw away a clear verdict (a model's "critical", "L12", null, 0.9 or 150)
    data["confidence"] = _confidence(data.get("confidence"))
    summary = data.get("summary")
    data["summary"] = "" if summary is None else str(summary)
    raw_issues = data.get("issues")
    given = raw_issues if isinstance(raw_issues, list) else []
    data["issues"] = [i for i in map(_issue, given) if i is not None]
    try:
        return Verdict.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:3]
        )
        raise ValueError(f"invalid verdict ({problems})") from e


_SEVERITIES = {
    "blocker": "blocker", "critical": "blocker", "fatal": "blocker", "error": "major",
    "major": "major", "high": "major", "minor": "minor", "medium": "minor", "moderate": "minor",
    "warning": "minor", "low": "nit", "nit": "nit", "info": "nit", "trivial": "nit",
    "suggestion": "nit", "style": "nit",
}  # fmt: skip


def _confidence(value: object) -> int:
    """0–100 from what a reviewer gave: a share (0.9: 90), a percentage, text. Anything
    else, or out of range, says nothing: 0 — it never counts toward an auto-approval."""
    if isinstance(value, str):
        try:
            value = float(value.strip().rstrip("%"))
        except ValueError:
            return 0
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if isinstance(value, float) and 0 < value <= 1:
        value *= 100
    return round(value) if 0 <= value <= 100 else 0


def _issue(value: object) -> dict[str, Any] | None:
    """One review issue as SPEC §5.3 has it, from a string or a loosely written object; None
    when it says nothing."""
    if isinstance(value, str):
        return {"message": value} if value.strip() else None
    if not isinstance(value, dict):
        return None
    text = next(
        (value[k] for k in ("message", "description", "text", "body", "title", "comment")
         if isinstance(value.get(k), str) and value[k].strip()),
        None,
    )  # fmt: skip
    if text is None:
        return None
    severity = str(value.get("severity") or value.get("level") or "major").strip().lower()
    file = value.get("file") or value.get("path")
    line = value.get("line")
    if isinstance(line, str):
        digits = re.search(r"\d+", line)
        line = int(digits.group()) if digits else None
    return {
        "severity": _SEVERITIES.get(severity, "major"),
        "message": text,
        "file": str(file) if file else None,
        "line": line if isinstance(line, int) and not isinstance(line, bool) else None,
    }


def priced_usage(
    section: AgentSection, input_tokens: int, output_tokens: int, cost_usd: float | None
) -> Usage:
    """Usage with the backend's cost, else one estimated from the section's prices.

    A cost of 0 with prices configured is estimated too: CLIs report 0 for a model they
    have no price for, and that must not hide the person's ``price_*_per_mtok``."""
    priced = bool(section.price_in_per_mtok or section.price_out_per_mtok)
    if cost_usd is not None and (cost_usd > 0 or not priced):
        return Usage(input_tokens=input_tokens, output_tokens=output_tokens, cost_usd=cost_usd)
    estimate = (
        input_tokens * (section.price_in_per_mtok or 0.0)
        + output_tokens * (section.price_out_per_mtok or 0.0)
    ) / 1e6
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=round(estimate, 6),
        cost_estimated=True,
    )


def _usage_from(obj: Any, section: AgentSection) -> Usage | None:
    """``{"usage": {input_tokens, output_tokens, cost_usd}}`` → Usage; anything else → None."""
    usage = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(usage, dict):
        return None
    try:
        cost = usage.get("cost_usd")
        return priced_usage(
            section,
            int(usage.get("input_tokens") or 0),
            int(usage.get("output_tokens") or 0),
            float(cost) if cost is not None else None,
        )
    except (TypeError, ValueError):
        log.debug("ignoring malformed usage %r", usage)
        return None


@dataclass
class Reply:
    """What an agent said: its final message and, when its CLI reports it, the usage."""

    text: str
    usage: Usage | None = None


class CommandAgent:
    """Runs ``section.command`` + ``section.args`` (or ``argv``) as a stage's agent."""

    home_paths: ClassVar[tuple[str, ...]] = ()
    """Paths under HOME the sandbox's private HOME gets from the real one (presets: their CLI's
    config and credentials)."""

    def __init__(
        self,
        section: AgentSection,
        stage: Stage,
        *,
        argv: Sequence[str] | None = None,
        environ: Mapping[str, str] | None = None,
        grace: float = 5.0,
    ) -> None:
        self.section = section
        self.stage = stage
        self.argv = list(argv) if argv is not None else split_command(section.command)
        if argv is None:
            self.argv += section.args
        self.environ = environ
        self.grace = grace

    # -- hooks ------------------------------------------------------------------------

    def build_argv(self, ctx: StageContext) -> list[str]:
        """The argv of one run, placeholders replaced."""
        if not self.argv:
            raise AgentNotFound(f"[agents.{self.stage}] has no `command`")
        values = placeholder_values(ctx)
        return [substitute(arg, values) for arg in self.argv]

    def stdin_for(self, ctx: StageContext) -> bytes | None:
        """The prompt, unless ``stdin = false`` (then ``/dev/null``)."""
        return ctx.prompt.encode() if self.section.stdin else None

    def build_env(self, ctx: StageContext) -> dict[str, str]:
        return agent_env(
            passthrough=self.section.env_passthrough,
            extra=self.section.env,
            opus_vars=opus_vars(ctx, ctx.fr.path),
            environ=self.environ,
        )

    def not_found(self, exe: str) -> str:
        """The message when ``exe`` does not exist."""
        where = "" if os.sep in exe else " on PATH"
        return f"`{exe}` not found{where}; install it or change [agents.{self.stage}] kind/command"

    def reply(self, ctx: StageContext, result: ProcessResult) -> Reply:
        """The agent's final message (and usage) from its output: here, all of stdout."""
        return Reply(result.stdout)

    def cli_error(self, ctx: StageContext, result: ProcessResult) -> AgentError | None:
        """The program's own error, read from its output before the exit status is judged,
        so the FR's ``error`` carries its words; ``retryable`` False for what another
        attempt cannot fix (bad auth, unknown model, bad flags). None: no error found."""
        return None

    def progress(self) -> Counts | None:
        """Which output lines count as progress for the stall watch (None: all output)."""
        return None

    # -- running ----------------------------------------------------------------------

    def quiet(self) -> bool:
        """True for a CLI that prints nothing until it is done: silence then says nothing,
        so only the stage timeout applies (no stall detection)."""
        return False

    async def run(self, ctx: StageContext) -> StageResult:
        await anyio.to_thread.run_sync(self._prepare, ctx)
        result = await self.execute(ctx, self.build_argv(ctx), self.stdin_for(ctx))
        return await anyio.to_thread.run_sync(self.parse, ctx, result)

    async def execute(
        self,
        ctx: StageContext,
        argv: list[str],
        stdin: bytes | None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the child's deadline)
        watch: bool = True,
    ) -> ProcessResult:
        """Run ``argv`` in the worktree under supervision, with this agent's environment.

        ``timeout`` (also the stall limit) defaults to the context's; ``watch`` = False skips
        the worktree fingerprint (short helper runs such as ``--version``). In a sandbox, a
        signal that ended the process is reported as one (bubblewrap says 128 + N).
        """
        program = argv[0]
        try:
            async with self._sandboxed(ctx, argv, self.build_env(ctx)) as (argv, env):
                result = await run_process(
                    argv,
                    cwd=ctx.worktree,
                    env=env,
                    stdin=stdin,
                    timeout=ctx.timeout if timeout is None else timeout,
                    stall_timeout=(ctx.timeout if self.quiet() else ctx.stall_timeout)
                    if timeout is None
                    else timeout,
                    log_file=ctx.log_file,
                    redactor=ctx.redactor,
                    activity=functools.partial(worktree_fingerprint, ctx.worktree)
                    if watch
                    else None,
                    on_spawn=ctx.on_spawn,
                    on_exit=ctx.on_exit,
                    grace=self.grace,
                    what=self.stage.value,
                    counts=self.progress(),
                    program=program,
                )
        except AgentNotFound as e:
            if isinstance(e.__cause__, FileNotFoundError):
                raise AgentNotFound(self.not_found(program)) from e.__cause__
            raise
        # bubblewrap reports a signal as 128 + N, as a shell does; for the tester that is
        # an exit status like any other (a test run's shell whose child was killed): tests
        # failed, as unsandboxed (SPEC §5.1)
        sandboxed = ctx.sandbox is not None and self.stage is not Stage.TESTER
        sig = exit_signal(result.returncode) if sandboxed else None
        if sig is not None and result.signal is None:
            result = replace(result, returncode=-sig, signal=sig)
        return result

    @asynccontextmanager
    async def _sandboxed(
        self, ctx: StageContext, argv: list[str], env: dict[str, str]
    ) -> AsyncIterator[tuple[list[str], dict[str, str]]]:
        """``argv`` and ``env`` as they run: inside the context's sandbox, if it has one."""
        if ctx.sandbox is None:
            yield argv, env
            return
        async with ctx.sandbox.wrap(
            ctx,
            argv,
            env,
            network=self.section.network,
            home=self.section.home,
            home_paths=self.home_paths,
        ) as wrapped:
            yield wrapped

    def _prepare(self, ctx: StageContext) -> None:
        if not ctx.prompt_file.exists():
            ctx.prompt_file.parent.mkdir(parents=True, exist_ok=True)
            ctx.prompt_file.write_text(ctx.prompt, encoding="utf-8")
        ctx.output_file.parent.mkdir(parents=True, exist_ok=True)
        ctx.output_file.unlink(missing_ok=True)  # a stale answer must not pass for this one
        ctx.output_file.touch(mode=0o600)  # a state file (SPEC §8); empty means no answer

    # -- results ----------------------------------------------------------------------

    def parse(self, ctx: StageContext, result: ProcessResult) -> StageResult:
        """Turn a finished process into the stage's result (SPEC §5.1). Sync: run in a thread."""
        file_text = self._read_output_file(ctx)
        file_json = _load_json(file_text)
        if self.stage is Stage.TESTER:
            return self._tester(ctx, result, file_json)
        spent = _usage_from(file_json, self.section)
        try:
            failure = self.cli_error(ctx, result)
            if failure is not None:
                raise failure
            self.check_exit(result)
            reply = self.reply(ctx, result)
        except AgentError as e:
            e.usage = e.usage or spent  # a crashed attempt was still paid for
            raise
        usage = spent or reply.usage
        if self.stage is Stage.PLANNER:
            plan = file_text if file_text.strip() else reply.text
            if isinstance(file_json, dict):
                # {"plan": …} or {"output": …} holds the plan; {"usage": …} alone, none (the
                # answer is on stdout); any other JSON the agent wrote is its plan, as it is
                given = file_json.get("plan", file_json.get("output"))
                if isinstance(given, str) and given.strip():
                    plan = given
                elif set(file_json) <= {"usage", "plan", "output"}:
                    plan = reply.text
            return StageResult(output=plan, usage=usage)
        if self.stage is Stage.REVIEWER:
            try:
                verdict = self._verdict(file_text, reply.text, result)
            except AgentError as e:
                e.usage = usage  # an unusable answer was still paid for
                raise
            return StageResult(
                output=output_tail(reply.text) or verdict.summary, verdict=verdict, usage=usage
            )
        return StageResult(output=output_tail(reply.text), usage=usage)

    def check_exit(self, result: ProcessResult) -> None:
        """A signal or a non-zero exit of a non-tester agent: AgentCrashed (retryable);
        126/127 (the shell could not run it): AgentNotFound (permanent)."""
        tail = output_tail(result.stdout, result.stderr)
        worded = (ln.strip() for ln in reversed(tail.splitlines()) if _has_words(ln))
        last = next(worded, "")
        said = f": {last[:300]}" if last else ""
        if result.signal is None and result.returncode in (126, 127):
            raise AgentNotFound(
                f"{self.stage} agent cannot run (exit status {result.returncode}){said}; "
                f"check [agents.{self.stage}] command",
                output=tail,
            )
        if result.signal is not None:
            raise AgentCrashed(
                f"{self.stage} agent was killed by signal {result.signal}{said}",
                retryable=True,
                output=tail,
            )
        if result.returncode != 0:
            raise AgentCrashed(
                f"{self.stage} agent exited with status {result.returncode}{said}",
                retryable=True,
                output=tail,
            )

    def _tester(self, ctx: StageContext, result: ProcessResult, file_json: object) -> StageResult:
        tail = output_tail(result.stdout, result.stderr)
        usage = _usage_from(file_json, self.section)
        if result.returncode in (126, 127):
            raise AgentNotFound(
                f"tester command cannot run (exit status {result.returncode}); "
                f"check [agents.tester] command",
                output=tail,
            )
        if result.signal is not None:  # killed (OOM, a person): not a verdict on the code
            raise AgentCrashed(
                f"tester was killed by signal {result.signal}", retryable=True, output=tail
            )
        return StageResult(output=tail, passed=result.returncode == 0, usage=usage)

    def _verdict(self, file_text: str, message: str, result: ProcessResult) -> Verdict:
        problems = []
        for label, text in (("output file", file_text), ("output", message)):
            if not text.strip():
                continue
            try:
                return parse_verdict(text)
            except ValueError as e:
                problems.append(f"{label}: {e}")
        raise AgentOutputError(
            "reviewer gave no usable verdict: " + ("; ".join(problems) or "no output"),
            output=output_tail(result.stdout, result.stderr),
        )

    def _read_output_file(self, ctx: StageContext) -> str:
        try:
            with open(ctx.output_file, "rb") as f:
                os.fchmod(f.fileno(), 0o600)  # (an agent may have put its own file there)
                raw = f.read(MAX_OUTPUT_FILE)
        except OSError:
            return ""
        return ctx.redactor(raw.decode("utf-8", "replace"))


def _has_words(line: str) -> bool:
    """A line that says something (not a lone ``}`` closing a JSON dump)."""
    return any(c.isalpha() for c in line)


def _load_json(text: str) -> object:
    if not text.lstrip().startswith("{"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None
