"""A loopback OpenAI Chat Completions API (``POST …/chat/completions``; ``GET …/models``).

Answers streaming (SSE ``chat.completion.chunk`` events, ``data: [DONE]`` last, the usage in
a final chunk with no choices, as with ``stream_options.include_usage``) or as one
``chat.completion``; text, or one ``tool_calls`` entry; every answer carries ``usage``. A
broken endpoint is ``server.fail = error_response(401, …)`` (the harness's ``fail``).

Three scripts of the same model (harness.next_step):

- ``tools``: a tool-using CLI (opencode): its ``write`` tool (``filePath``, ``content``) and
  its ``bash`` tool (``command``, ``description``), tried by the planner and the reviewer
  whether offered or not;
- ``aider``: no tools, aider's ``whole`` edit format (its default for an unknown model): a
  path line, then the whole file fenced. The planner and the reviewer try an edit and a
  shell block too (aider must apply neither);
- ``openai``: opus's own ``openai`` kind: the plan, one unified diff, the verdict JSON —
  or, with ``bad_verdicts``, a reviewer that never gives a valid verdict.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from typing import Any

from ..harness import (
    FAREWELL_CODE,
    FAREWELL_FILE,
    PLAN_TEXT,
    PROBES,
    VERDICT,
    Request,
    Response,
    ScriptedServer,
    Step,
    next_step,
    stage_of,
)

PROMPT_TOKENS = 120
COMPLETION_TOKENS = 30
MODEL = "scripted-chat-1"
FAREWELL_DIFF = (
    "I added the module.\n\n```diff\n--- /dev/null\n+++ b/" + FAREWELL_FILE + "\n"
    "@@ -0,0 +1,2 @@\n" + "".join(f"+{line}\n" for line in FAREWELL_CODE.splitlines()) + "```\n"
)
_OPENAI_KIND = re.compile(r"You are the (planner|coder|reviewer) of an autonomous coding pipeline")
_ids = itertools.count(1)


def error_response(status: int, message: str) -> Response:
    """An API error as OpenAI words it."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = "invalid_api_key" if status == 401 else None
    error = {"message": message, "type": kind, "param": None, "code": code}
    return Response.json({"error": error}, status)


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content or "")


class ChatServer(ScriptedServer):
    """Plays harness.next_step over Chat Completions, in the dialect of ``script``."""

    def __init__(self, script: str = "tools", *, bad_verdicts: bool = False) -> None:
        super().__init__()
        assert script in ("tools", "aider", "openai"), script
        self.script = script
        self.bad_verdicts = bad_verdicts

    def completions(self, stage: str | None = None) -> list[Request]:
        """The chat-completion requests received (of one opus stage when given)."""
        found = [r for r in self.model_requests() if r.path.endswith("/chat/completions")]
        return [r for r in found if stage is None or self.stage(r.json) == stage]

    def stage(self, body: Any) -> str | None:
        messages = body.get("messages") or [] if isinstance(body, dict) else []
        text = "\n".join(_text(m) for m in messages)
        if self.script == "openai":
            m = _OPENAI_KIND.search(text)
            return m.group(1) if m else None
        return stage_of(text)

    def respond(self, request: Request) -> Response:
        if request.method == "GET" and request.path.rstrip("/").endswith("/models"):
            model = {"id": MODEL, "object": "model", "created": 0, "owned_by": "opus-tests"}
            return Response.json({"object": "list", "data": [model]})
        if request.method != "POST" or not request.path.endswith("/chat/completions"):
            return error_response(404, f"no route {request.method} {request.path}")
        body = request.json if isinstance(request.json, dict) else {}
        step = self.step_for(body)
        return self.stream(body, step) if body.get("stream") else self.completion(body, step)

    def step_for(self, body: dict[str, Any]) -> Step:
        messages = body.get("messages") or []
        first = _text(messages[0]) if messages else ""
        if "title generator" in first:  # opencode's session title, when it asks for one
            return Step(text="Say goodbye")
        stage = self.stage(body) or ""
        if self.script == "openai":
            return self.openai_step(stage)
        if self.script == "aider":
            return self.aider_step(stage)
        done = sum(1 for m in messages if m.get("role") == "tool")
        return next_step(stage, done)

    def openai_step(self, stage: str) -> Step:
        if stage == "planner":
            return Step(text=PLAN_TEXT)
        if stage == "coder":
            return Step(text=FAREWELL_DIFF)
        if self.bad_verdicts:
            return Step(text="Looks fine to me, but I will not say it in JSON.")
        return Step(text=json.dumps(VERDICT))

    @staticmethod
    def aider_step(stage: str) -> Step:
        def whole(path: str, text: str) -> str:
            return f"{path}\n```python\n{text}```\n"

        if stage in PROBES:
            wrote, shelled = PROBES[stage]
            tries = whole(wrote, "x = 1\n") + f"\n```bash\necho shell > {shelled}\n```\n"
            if stage == "planner":
                return Step(text=f"{PLAN_TEXT}\n{tries}")
            return Step(text=f"{tries}\n{json.dumps(VERDICT)}")
        if stage == "coder":
            return Step(text="Adding the module.\n\n" + whole(FAREWELL_FILE, FAREWELL_CODE))
        return Step(text="Add farewell()")  # a side request (a commit message, a summary)

    @staticmethod
    def tool_call(step: Step) -> dict[str, Any]:
        if step.tool == "write":
            name, args = "write", {"filePath": step.path, "content": step.content}
        else:
            name, args = "bash", {"command": step.command, "description": "run a command"}
        return {
            "id": f"call_{next(_ids):04d}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)},
        }

    @staticmethod
    def usage() -> dict[str, int]:
        return {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": COMPLETION_TOKENS,
            "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        }

    def completion(self, body: dict[str, Any], step: Step) -> Response:
        message: dict[str, Any] = {"role": "assistant", "content": step.text or None}
        if step.tool:
            message["tool_calls"] = [self.tool_call(step)]
        return Response.json(
            {
                "id": f"chatcmpl-{next(_ids):04d}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model") or MODEL,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": "tool_calls" if step.tool else "stop",
                    }
                ],
                "usage": self.usage(),
            }
        )

    def stream(self, body: dict[str, Any], step: Step) -> Response:
        ident, created = f"chatcmpl-{next(_ids):04d}", int(time.time())

        def chunk(delta: dict[str, Any] | None, finish: str | None = None) -> dict[str, Any]:
            choices = [] if delta is None else [
                {"index": 0, "delta": delta, "finish_reason": finish}
            ]  # fmt: skip
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.get("model") or MODEL,
                "choices": choices,
            }

        events: list[dict[str, Any]] = [chunk({"role": "assistant", "content": ""})]
        if step.tool:
            call = {"index": 0, **self.tool_call(step)}
            events.append(chunk({"tool_calls": [call]}))
        else:
            text = step.text
            events += [chunk({"content": text[i : i + 64]}) for i in range(0, len(text), 64)]
        events.append(chunk({}, "tool_calls" if step.tool else "stop"))
        last = chunk(None)
        last["usage"] = self.usage()
        events.append(last)
        return Response.sse([*((None, e) for e in events), (None, "[DONE]")])
