"""A loopback Anthropic Messages API (``POST /v1/messages``, SSE when ``stream``).

Event shapes as the Messages streaming docs give them: ``message_start`` (the message with
its input usage), per content block ``content_block_start`` / ``content_block_delta``
(``text_delta`` or ``input_json_delta``) / ``content_block_stop``, then ``message_delta``
(stop reason, output usage) and ``message_stop``. Tool calls use Claude Code's own tools:
``Write {file_path, content}`` and ``Bash {command}``.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from ..harness import Request, Response, ScriptedServer, Step, next_step, stage_of

INPUT_TOKENS = 1200
OUTPUT_TOKENS = 40
MODEL = "claude-scripted-1"

_ids = itertools.count(1)


def error_response(status: int, kind: str, message: str) -> Response:
    """An API error as the Messages API words it."""
    return Response.json({"type": "error", "error": {"type": kind, "message": message}}, status)


class AnthropicServer(ScriptedServer):
    """Plays the model of harness.next_step over the Messages API (``push``: the coder
    tries ``git push`` too)."""

    def __init__(self, *, push: bool = False) -> None:
        super().__init__()
        self.push = push

    def respond(self, request: Request) -> Response:
        if request.method == "HEAD" or request.method == "GET":
            return Response(200)
        if not request.path.endswith("/v1/messages"):
            if request.path.endswith("/count_tokens"):
                return Response.json({"input_tokens": INPUT_TOKENS})
            return error_response(404, "not_found_error", f"no route {request.path}")
        body = request.json or {}
        step = self.step_for(body)
        return self.stream(step) if body.get("stream") else Response.json(self.message(step))

    def step_for(self, body: dict[str, Any]) -> Step:
        if not body.get("tools"):  # a side request (titles, summaries): plain text
            return Step(text="ok")
        messages = body.get("messages") or []
        stage = stage_of(json.dumps(messages[:1]))
        done = sum(
            1
            for m in messages
            if m.get("role") == "user" and isinstance(m.get("content"), list)
            for block in m["content"]
            if isinstance(block, dict) and block.get("type") == "tool_result"
        )
        return next_step(stage or "", done, push=self.push)

    @staticmethod
    def blocks(step: Step) -> list[dict[str, Any]]:
        if step.tool == "write":
            tool = {"name": "Write", "input": {"file_path": step.path, "content": step.content}}
        elif step.tool == "shell":
            tool = {"name": "Bash", "input": {"command": step.command, "description": "run"}}
        else:
            return [{"type": "text", "text": step.text}]
        return [{"type": "tool_use", "id": f"toolu_{next(_ids):04d}", **tool}]

    def message(self, step: Step) -> dict[str, Any]:
        return {
            "id": f"msg_{next(_ids):04d}",
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": self.blocks(step),
            "stop_reason": "tool_use" if step.tool else "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": OUTPUT_TOKENS},
        }

    def stream(self, step: Step) -> Response:
        msg = self.message(step)
        blocks = msg.pop("content")
        start = {**msg, "content": [], "stop_reason": None}
        start["usage"] = {"input_tokens": INPUT_TOKENS, "output_tokens": 1}
        events: list[tuple[str | None, Any]] = [
            ("message_start", {"type": "message_start", "message": start}),
            ("ping", {"type": "ping"}),
        ]
        for index, block in enumerate(blocks):
            if block["type"] == "text":
                opened = {"type": "text", "text": ""}
                deltas = [{"type": "text_delta", "text": block["text"]}]
            else:
                opened = {**block, "input": {}}
                raw = json.dumps(block["input"])
                half = len(raw) // 2
                deltas = [
                    {"type": "input_json_delta", "partial_json": raw[:half]},
                    {"type": "input_json_delta", "partial_json": raw[half:]},
                ]
            events.append(
                (
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": opened},
                )
            )
            for delta in deltas:
                events.append(
                    (
                        "content_block_delta",
                        {"type": "content_block_delta", "index": index, "delta": delta},
                    )
                )
            events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        events.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": None},
                    "usage": {"output_tokens": OUTPUT_TOKENS},
                },
            )
        )
        events.append(("message_stop", {"type": "message_stop"}))
        return Response.sse(events)
