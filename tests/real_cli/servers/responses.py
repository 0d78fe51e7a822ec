"""A loopback OpenAI Responses API (``POST /v1/responses``, SSE when ``stream``), as codex
0.171.0 calls it.

Event shapes as the Responses streaming reference and codex's own parser (codex-rs
``ResponsesStreamEvent``) take them: ``response.created``, per output item
``response.output_item.added`` → ``response.output_text.delta`` (text) or
``response.function_call_arguments.delta`` / ``.done`` (a call) →
``response.output_item.done`` (the whole item: ``message`` with ``output_text`` content, or
``function_call`` with ``name``, ``arguments``, ``call_id``), then ``response.completed``
with ``usage`` (``input_tokens``, ``output_tokens`` and their ``*_details``).

codex offers a model it has no metadata for only ``exec_command {cmd}``: every step, the
harness's "write" ones included, is a shell command here.
"""

from __future__ import annotations

import itertools
import json
import shlex
from typing import Any

from ..harness import Request, Response, ScriptedServer, Step, next_step, stage_of

INPUT_TOKENS = 1500
OUTPUT_TOKENS = 25
MODEL = "scripted-responses-1"

_ids = itertools.count(1)


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> Response:
    """An API error as OpenAI words it."""
    return Response.json({"error": {"message": message, "type": kind, "code": None}}, status)


def shell_of(step: Step) -> str:
    """The shell command that plays ``step`` (a write becomes ``printf … > path``)."""
    if step.tool == "write":
        folder = step.path.rpartition("/")[0]
        make = f"mkdir -p {shlex.quote(folder)} && " if folder else ""
        return f"{make}printf '%s' {shlex.quote(step.content)} > {shlex.quote(step.path)}"
    return step.command


class ResponsesServer(ScriptedServer):
    """Plays the model of harness.next_step over the Responses API."""

    def respond(self, request: Request) -> Response:
        if request.method in ("HEAD", "GET"):
            if request.path.endswith("/models"):
                return Response.json({"object": "list", "data": [], "models": []})
            return Response(200)
        if not request.path.endswith("/responses"):
            return error_response(404, f"no route {request.path}")
        body = request.json or {}
        step = self.step_for(body)
        events = self.events(step)
        if body.get("stream"):
            return Response.sse((name, data) for name, data in events)
        return Response.json(events[-1][1]["response"])

    def step_for(self, body: dict[str, Any]) -> Step:
        items = body.get("input") or []
        if isinstance(items, str):
            return next_step(stage_of(items) or "", 0)
        stage = stage_of(json.dumps([i for i in items if i.get("role") == "user"]))
        done = sum(1 for i in items if i.get("type") == "function_call_output")
        return next_step(stage or "", done)

    @staticmethod
    def events(step: Step) -> list[tuple[str, dict[str, Any]]]:
        rid = f"resp_{next(_ids)}"
        created = {"id": rid, "object": "response", "status": "in_progress", "model": MODEL}
        out = [_event("response.created", response=created)]
        iid = f"item_{next(_ids)}"
        item: dict[str, Any]
        if step.tool is None:
            text = {"type": "output_text", "text": step.text, "annotations": []}
            item = {"type": "message", "id": iid, "role": "assistant", "content": [text]}
            added = {**item, "content": []}
            deltas = [
                _event("response.output_text.delta", item_id=iid, output_index=0,
                       content_index=0, delta=step.text),
            ]  # fmt: skip
        else:
            args = json.dumps({"cmd": shell_of(step)})
            call = f"call_{next(_ids)}"
            item = {"type": "function_call", "id": iid, "call_id": call,
                    "name": "exec_command", "arguments": args}  # fmt: skip
            added = {**item, "arguments": ""}
            deltas = [
                _event("response.function_call_arguments.delta", item_id=iid,
                       output_index=0, delta=args),
                _event("response.function_call_arguments.done", item_id=iid,
                       output_index=0, arguments=args),
            ]  # fmt: skip
        out.append(_event("response.output_item.added", output_index=0, item=added))
        out.extend(deltas)
        out.append(_event("response.output_item.done", output_index=0, item=item))
        usage = {
            "input_tokens": INPUT_TOKENS,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": OUTPUT_TOKENS,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
        }
        done = {**created, "status": "completed", "output": [item], "usage": usage}
        out.append(_event("response.completed", response=done))
        return out

    def tool_outputs(self, stage: str) -> list[str]:
        """What codex sent back for the tool calls of ``stage`` (each call's output once)."""
        seen: dict[str, str] = {}
        for request in self.stage_requests(stage):
            for item in (request.json or {}).get("input") or []:
                if item.get("type") == "function_call_output":
                    seen[str(item.get("call_id"))] = str(item.get("output"))
        return list(seen.values())


def _event(name: str, **fields: Any) -> tuple[str, dict[str, Any]]:
    return name, {"type": name, **fields}
