"""A loopback Gemini API (``POST /v1beta/models/M:generateContent`` and
``…:streamGenerateContent?alt=sse``), as Gemini CLI 0.61.0 calls it.

Shapes as the Gemini API reference gives them: a ``GenerateContentResponse`` is
``{"candidates": [{"content": {"role": "model", "parts": [...]}, "finishReason": "STOP"}],
"usageMetadata": {"promptTokenCount", "candidatesTokenCount", "totalTokenCount"},
"modelVersion"}``; a part is ``{"text"}`` or ``{"functionCall": {"name", "args"}}``; the
stream sends such objects as ``data:`` lines. The CLI's tools: ``write_file {file_path,
content}`` and ``run_shell_command {command}``. A ``generateContent`` call without tools is
one of the CLI's side questions (its model router, its next-speaker check): it gets a JSON
answer with every key they ask for.
"""

from __future__ import annotations

import json
from typing import Any

from ..harness import Request, Response, ScriptedServer, Step, next_step, stage_of

INPUT_TOKENS = 900
OUTPUT_TOKENS = 30
MODEL = "gemini-2.5-flash"
SIDE_ANSWER = {
    "complexity_reasoning": "A small, well specified change.",
    "complexity_score": 10,
    "reasoning": "The user asked for a small change.",
    "model_choice": "flash",
    "next_speaker": "user",
}


def error_response(status: int, message: str, kind: str) -> Response:
    """An API error as Google words it (``{"error": {code, message, status}}``)."""
    return Response.json({"error": {"code": status, "message": message, "status": kind}}, status)


class GeminiServer(ScriptedServer):
    """Plays the model of harness.next_step over the Gemini API."""

    def respond(self, request: Request) -> Response:
        if request.method in ("HEAD", "GET"):
            return Response.json({"models": [{"name": f"models/{MODEL}"}]})
        body = request.json or {}
        if request.path.endswith(":countTokens"):
            return Response.json({"totalTokens": INPUT_TOKENS})
        if request.path.endswith(":generateContent"):
            if not body.get("tools"):
                return Response.json(self.reply({"text": json.dumps(SIDE_ANSWER)}))
            return Response.json(self.reply(self.part(self.step_for(body))))
        if request.path.endswith(":streamGenerateContent"):
            doc = self.reply(self.part(self.step_for(body)))
            return Response(200, f"data: {json.dumps(doc)}\r\n\r\n".encode(),
                            {"Content-Type": "text/event-stream"})  # fmt: skip
        return error_response(404, f"no route {request.path}", "NOT_FOUND")

    @staticmethod
    def step_for(body: dict[str, Any]) -> Step:
        contents = body.get("contents") or []
        users = [c for c in contents if c.get("role") == "user"]
        stage = stage_of(json.dumps(users))
        done = sum(
            1 for c in contents for p in c.get("parts") or [] if "functionResponse" in p
        )  # fmt: skip
        return next_step(stage or "", done)

    @staticmethod
    def part(step: Step) -> dict[str, Any]:
        if step.tool == "write":
            args = {"file_path": step.path, "content": step.content}
            return {"functionCall": {"name": "write_file", "args": args}}
        if step.tool == "shell":
            return {
                "functionCall": {"name": "run_shell_command", "args": {"command": step.command}}
            }
        return {"text": step.text}

    @staticmethod
    def reply(part: dict[str, Any]) -> dict[str, Any]:
        return {
            "candidates": [
                {"content": {"role": "model", "parts": [part]}, "finishReason": "STOP", "index": 0}
            ],
            "usageMetadata": {
                "promptTokenCount": INPUT_TOKENS,
                "candidatesTokenCount": OUTPUT_TOKENS,
                "totalTokenCount": INPUT_TOKENS + OUTPUT_TOKENS,
            },
            "modelVersion": MODEL,
        }

    def tool_results(self, stage: str) -> list[dict[str, Any]]:
        """What the CLI sent back for the tool calls of ``stage`` (each call once)."""
        seen: dict[str, dict[str, Any]] = {}
        for request in self.stage_requests(stage):
            for content in (request.json or {}).get("contents") or []:
                for part in content.get("parts") or []:
                    if "functionResponse" in part:
                        answer = part["functionResponse"]
                        seen[str(answer.get("id") or len(seen))] = answer
        return list(seen.values())
