"""A stand-in for an agent CLI, installed under that CLI's name (claude, codex, …).

It appends what it got (argv, stdin and whether it was a pipe, env, the aider message
file) to ``calls.jsonl`` next to itself, then answers in that CLI's documented headless
format: a plan, or for the reviewer (``$OPUS_STAGE``) a message holding a verdict.
``mode.json`` next to it may say ``{"error": true}`` (report a failure) or ``{"think": S}``
(stay silent for S seconds first, as a CLI with JSON output does while it works).
"""

import json
import os
import stat
import sys
from pathlib import Path

HERE = Path(sys.argv[0]).resolve().parent
NAME = Path(sys.argv[0]).name
VERDICT = {
    "verdict": "request_changes",
    "confidence": 70,
    "summary": "Needs a test.",
    "issues": [{"severity": "major", "message": "add a test", "file": "app.py"}],
}


def message() -> str:
    if os.environ.get("OPUS_STAGE") == "reviewer":
        return "I reviewed the diff.\n```json\n" + json.dumps(VERDICT) + "\n```\n"
    return f"# Plan from {NAME}\n\n1. Do the thing.\n"


def arg_after(flag: str) -> str:
    return sys.argv[sys.argv.index(flag) + 1]


def main() -> int:
    if sys.argv[1:] == ["--version"]:
        print(f"{NAME} 9.9.9")
        with (HERE / "calls.jsonl").open("a") as f:
            f.write(json.dumps({"version": True}) + "\n")
        return 0
    if NAME == "codex" and sys.argv[1:2] == ["sandbox"]:
        return 0  # `codex sandbox -- true`: its own sandbox starts
    mode_file = HERE / "mode.json"
    mode = json.loads(mode_file.read_text()) if mode_file.exists() else {}
    kind = "pipe" if stat.S_ISFIFO(os.fstat(0).st_mode) else "chardev"
    got = {
        "argv": sys.argv[1:],
        "stdin": sys.stdin.read(),
        "stdin_kind": kind,
        "env": dict(os.environ),
        "cwd": str(Path.cwd()),
    }
    if NAME == "aider":
        got["message_file"] = Path(arg_after("--message-file")).read_text()
    with (HERE / "calls.jsonl").open("a") as f:
        f.write(json.dumps(got) + "\n")
    if mode.get("think"):
        import time

        time.sleep(mode["think"])  # silent, like a CLI that prints one JSON object at the end
    text = message()
    if NAME == "claude":
        print(
            json.dumps(
                {
                    "type": "result",
                    "subtype": "error_during_execution" if mode.get("error") else "success",
                    "is_error": bool(mode.get("error")),
                    "result": mode.get("said", "boom") if mode.get("error") else text,
                    "api_error_status": mode.get("status"),
                    "session_id": "s-1",
                    "num_turns": 3,
                    "total_cost_usd": 0.0123,
                    "usage": {
                        "input_tokens": 100,
                        "cache_creation_input_tokens": 10,
                        "cache_read_input_tokens": 5,
                        "output_tokens": 42,
                    },
                }
            )
        )
        return 1 if mode.get("error") else 0
    if NAME == "codex":
        events = [
            {"type": "thread.started", "thread_id": "t-1"},
            {"type": "turn.started"},
            {"type": "item.completed", "item": {"id": "i0", "type": "reasoning", "text": "hm"}},
            {"type": "item.completed", "item": {"id": "i1", "type": "agent_message", "text": text}},
            {
                "type": "turn.completed",
                "usage": {"input_tokens": 1200, "cached_input_tokens": 200, "output_tokens": 80},
            },
        ]
        for event in events:
            print(json.dumps(event))
        Path(arg_after("-o")).write_text(text)
        return 0
    if NAME == "aider":
        tokens = "Tokens: 3.0k sent, 42 received. Cost: $0.0063 message, $0.0063 session."
        print(f"Aider v0.86.0\nMain model: some-model\n{text}\n{tokens}")
        asked = "".join(f"#### {line}  \n" for line in got["message_file"].splitlines())
        history = (  # as aider writes it: its own lines "> ", the prompt "#### "
            "\n# aider chat started at 2026-12-01 12:00:00\n\n> Aider v0.86.0  \n"
            f"> Main model: some-model  \n\n{asked}\n{text}\n> {tokens}  \n"
        )
        Path(arg_after("--chat-history-file")).write_text(history)
        return 0
    if NAME == "opencode":
        first, _, rest = text.partition("\n")
        events = [
            {"type": "step_start", "part": {"type": "step-start"}},
            {"type": "text", "part": {"type": "text", "text": "Looking around."}},
            {
                "type": "step_finish",
                "part": {
                    "type": "step-finish",
                    "cost": 0.001,
                    "tokens": {
                        "input": 500,
                        "output": 20,
                        "reasoning": 5,
                        "cache": {"read": 100, "write": 0},
                    },
                },
            },
            {"type": "step_start", "part": {"type": "step-start"}},
            {"type": "text", "part": {"type": "text", "text": first}},
            {"type": "text", "part": {"type": "text", "text": rest}},
            {
                "type": "step_finish",
                "part": {
                    "type": "step-finish",
                    "cost": 0.002,
                    "tokens": {
                        "input": 700,
                        "output": 30,
                        "reasoning": 0,
                        "cache": {"read": 0, "write": 0},
                    },
                },
            },
        ]
        for event in events:
            print(json.dumps(event))
        return 0
    if NAME == "gemini" and "stream-json" in sys.argv:
        events = [
            {"type": "init", "session_id": "s-1", "model": "gemini-2.5-pro"},
            {"type": "message", "role": "user", "content": "the prompt"},
            {"type": "message", "role": "assistant", "content": "Let me look.", "delta": True},
            {"type": "tool_use", "tool_name": "read_file", "tool_id": "t1", "parameters": {}},
            {"type": "tool_result", "tool_id": "t1", "status": "success"},
            {"type": "message", "role": "assistant", "content": text, "delta": True},
            {
                "type": "result",
                "status": "error" if mode.get("error") else "success",
                **({"error": {"type": "unknown", "message": mode.get("said", "boom")}}
                   if mode.get("error") else {}),
                "stats": {"input_tokens": 1000, "output_tokens": 55, "tool_calls": 1},
            },
        ]  # fmt: skip
        for event in events:
            print(json.dumps(event))
        return 1 if mode.get("error") else 0
    if NAME == "gemini":
        print(
            json.dumps(
                {
                    "response": text,
                    "stats": {
                        "models": {
                            "gemini-2.5-pro": {
                                "api": {"totalRequests": 2},
                                "tokens": {
                                    "prompt": 900,
                                    "candidates": 40,
                                    "total": 950,
                                    "cached": 0,
                                    "thoughts": 10,
                                    "tool": 0,
                                },
                            },
                            "gemini-2.5-flash": {
                                "tokens": {"prompt": 100, "candidates": 5, "thoughts": 0}
                            },
                        }
                    },
                }
            )
        )
        return 0
    raise SystemExit(f"fake_cli: unknown name {NAME}")


if __name__ == "__main__":
    sys.exit(main())
