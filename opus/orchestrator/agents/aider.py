"""aider (`aider --message-file`), measured with aider 0.86.2.

- The answer comes from aider's chat history, written to ``OPUS_OUTPUT_FILE``
  (``--chat-history-file``): there aider marks its own lines (banner, warnings, URLs, the
  ``Tokens:`` line, errors) with ``> `` and the prompt with ``#### ``, so the model's last
  answer is what is left. Its stdout is only read for the ``Tokens:`` lines; ``COLUMNS`` is
  wide anyway (it wraps stdout at 80 columns, inside JSON too).
- Planner and reviewer: ``--chat-mode ask --dry-run`` (no edit is applied). aider has no shell
  tool of its own, and ``--yes-always`` never runs a shell block the model suggests
  (``--no-suggest-shell-commands`` asks it not to). The coder edits files; opus commits them
  (``--no-auto-commits``); ``args = ["--auto-test", "--test-cmd", "…"]`` makes it run the
  tests after its edits and show the model what fails.
- Never installs, updates or phones home: ``--no-detect-urls`` (with ``--yes-always`` a URL in
  the prompt made it ``pip install`` Playwright and run apt-get), ``--no-check-update``,
  ``--no-analytics`` (not ``--analytics-disable``, which writes HOME), no release notes, and
  ``LITELLM_LOCAL_MODEL_COST_MAP`` (litellm fetches its price list otherwise). With
  ``base_url`` opus writes the model's metadata file (context size, the configured prices),
  so aider does not download its model list for it either.
- aider's own files stay off the branch: ``--no-gitignore`` (no ``.gitignore`` edit), the chat
  history in the output file, no input history, and the tags cache it leaves at the worktree
  root removed after each run.
- An endpoint error makes aider retry, then exit 0 with no answer: the attempt fails with its
  words (bad key, unknown model and bad request permanent; its retry lines are not progress).
- ``base_url`` / ``api_key_env``: ``--openai-api-base`` and ``OPENAI_API_KEY``; the model is
  then ``openai/<model>``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from ..atomic import atomic_write
from ..errors import AgentCrashed, AgentError, AgentStalled, ConfigError
from ..models import Usage
from ..process_output import Counts, output_tail
from ..supervisor import ProcessResult
from .base import StageContext, StageResult
from .command import MAX_OUTPUT_FILE, Reply, priced_usage
from .preset import PresetAgent

_AIDER_TOKENS = re.compile(
    r"Tokens:\s*(?P<sent>[\d.,]+[kKmM]?)\s+sent,(?:[^\n]*?,)?\s*"
    r"(?P<received>[\d.,]+[kKmM]?)\s+received\.(?:\s*Cost:\s*\$(?P<cost>[\d.,]+)\s+message)?"
)
_ERROR = re.compile(r"\blitellm\.(?P<kind>\w+(?:Error|Exception))\b.*")
PERMANENT = frozenset(
    {
        "AuthenticationError",
        "PermissionDeniedError",
        "NotFoundError",
        "BadRequestError",
        "UnprocessableEntityError",
        "ContextWindowExceededError",
        "ContentPolicyViolationError",
        "UnsupportedParamsError",
    }
)
_NOISE = ("Retrying in ", "litellm.", "The API provider")
"""Lines aider prints while it retries a failing endpoint: not progress."""
OWN_FILES = (".aider.tags.cache.v4", ".aider.chat.history.md", ".aider.input.history")
CONTEXT_TOKENS = 128_000
QUIET = {"COLUMNS": "10000", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "AIDER_CHECK_UPDATE": "false"}


def _count(text: str) -> int:
    text = text.replace(",", "")
    scale = {"k": 1e3, "m": 1e6}.get(text[-1:].lower(), 1.0)
    number = text[:-1] if scale != 1.0 else text
    try:
        return round(float(number) * scale)
    except ValueError:
        return 0


def answer_of(history: str) -> str:
    """The model's last answer in an aider chat history: the last run of lines after the last
    prompt (``#### ``) that aider did not mark as its own (``> ``)."""
    lines = history.splitlines()
    start = max((i + 1 for i, ln in enumerate(lines) if ln.startswith("####")), default=0)
    runs: list[list[str]] = [[]]
    for line in lines[start:]:
        if line.startswith(">") or line.startswith("# aider chat started at"):
            runs.append([])
        else:
            runs[-1].append(line)
    said = [run for run in runs if any(ln.strip() for ln in run)]
    return "\n".join(said[-1]).strip() if said else ""


def error_of(text: str) -> tuple[str, bool] | None:
    """aider's last endpoint error in ``text`` (its words, whether another try may help)."""
    found = list(_ERROR.finditer(text))
    if not found:
        return None
    last = found[-1]
    words = last.group(0).strip().rstrip()
    return words[:400], last["kind"] not in PERMANENT


class AiderAgent(PresetAgent):
    """Aider: ``aider --message-file {prompt_file} --yes-always …``, the chat history in
    ``{output_file}``."""

    executable = "aider"
    home_paths = (".aider.conf.yml", ".aider.model.settings.yml", ".aider.model.metadata.json")
    product = "aider (pip install aider-chat)"

    def endpoint(self, environ: Mapping[str, str]) -> dict[str, str]:
        if not self.section.base_url:
            if self.section.api_key_env:
                raise ConfigError(
                    "kind = 'aider' takes api_key_env only with base_url (for a provider "
                    "aider knows, pass its key variable in env_passthrough)",
                    key=f"agents.{self.stage}",
                )
            return {}
        if not self.section.model:
            raise ConfigError(
                "kind = 'aider' with base_url needs `model` (the model name at that endpoint)",
                key=f"agents.{self.stage}",
            )
        key = self.api_key(environ)
        return {"OPENAI_API_KEY": key or "none"}  # litellm refuses to call without one

    @property
    def model(self) -> str | None:
        model = self.section.model
        if model and self.section.base_url and not model.startswith("openai/"):
            return f"openai/{model}"
        return model

    def cli_env(self, ctx: StageContext) -> dict[str, str]:
        return dict(QUIET)

    def build_argv(self, ctx: StageContext) -> list[str]:
        read_only = ["--chat-mode", "ask", "--dry-run"] if self.read_only else []
        endpoint: list[str] = []
        if self.section.base_url:
            endpoint = ["--openai-api-base", self.section.base_url]
            endpoint += ["--model-metadata-file", str(self._metadata_file(ctx))]
        return self.fill(
            [
                *self.head, "--message-file", "{prompt_file}",
                "--chat-history-file", "{output_file}", "--input-history-file", os.devnull,
                "--yes-always", "--no-auto-commits", "--no-dirty-commits", "--no-gitignore",
                "--no-stream", "--no-pretty", "--no-fancy-input", "--no-detect-urls",
                "--no-suggest-shell-commands", "--no-check-update", "--no-analytics",
                "--no-show-release-notes", "--no-show-model-warnings", *read_only,
                *(["--model", self.model] if self.model else []), *endpoint,
                *self.section.args,
            ],
            ctx,
        )  # fmt: skip

    def _metadata_file(self, ctx: StageContext) -> Path:
        return ctx.artifacts / f"aider-model-{ctx.stage}.json"

    def _write_metadata(self, ctx: StageContext) -> None:
        """The model's context size and the configured prices, so aider reports a cost and
        does not download litellm's model list to learn about a model it cannot know."""
        if not (self.section.base_url and self.model):
            return
        info = {
            "max_input_tokens": CONTEXT_TOKENS,
            "max_output_tokens": self.section.max_tokens or 8192,
            "max_tokens": self.section.max_tokens or 8192,
            "input_cost_per_token": (self.section.price_in_per_mtok or 0.0) / 1e6,
            "output_cost_per_token": (self.section.price_out_per_mtok or 0.0) / 1e6,
            "litellm_provider": "openai",
            "mode": "chat",
        }
        path = self._metadata_file(ctx)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({self.model: info}, indent=2) + "\n"
        atomic_write(path, text.encode(), sync=False)  # a state file: 0600 (SPEC §8)

    def progress(self) -> Counts:
        return lambda tag, line: not line.lstrip().startswith(_NOISE)

    async def run(self, ctx: StageContext) -> StageResult:
        before = {name for name in OWN_FILES if (ctx.worktree / name).exists()}
        self._write_metadata(ctx)
        try:
            return await super().run(ctx)
        except AgentStalled as e:  # it retries a failing endpoint for a minute: say what it saw
            found = error_of(e.output)
            if found is None:
                raise
            stalled = AgentStalled(f"aider: {found[0]} ({e})", output=e.output)
            stalled.usage = e.usage
            raise stalled from e
        finally:
            self._drop_own_files(ctx.worktree, before)

    @staticmethod
    def _drop_own_files(worktree: Path, before: set[str]) -> None:
        for name in OWN_FILES:
            path = worktree / name
            if name in before or not path.exists():
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def _history(self, ctx: StageContext) -> str:
        try:
            with open(ctx.output_file, "rb") as f:
                raw = f.read(MAX_OUTPUT_FILE)
        except OSError:
            return ""
        return ctx.redactor(raw.decode("utf-8", "replace"))

    def _read_output_file(self, ctx: StageContext) -> str:
        """The output file holds aider's chat history: its answer is the model's last one."""
        return answer_of(self._history(ctx))

    def cli_error(self, ctx: StageContext, result: ProcessResult) -> AgentError | None:
        tail = output_tail(result.stdout, result.stderr)
        if result.returncode == 2 and "error:" in result.stderr:  # its argument parser
            said = next(ln for ln in result.stderr.splitlines() if "error:" in ln)
            return AgentCrashed(f"aider: {said.strip()[:400]}", retryable=False, output=tail)
        history = self._history(ctx)
        if answer_of(history):
            return None
        found = error_of(history) or error_of(result.stdout)
        if found is None:
            return None
        words, retryable = found
        failure = AgentCrashed(f"aider: {words}", retryable=retryable, output=tail)
        failure.usage = self._usage(result.stdout)
        return failure

    def _usage(self, stdout: str) -> Usage | None:
        sent = received = 0
        cost: float | None = None
        seen = False
        for m in _AIDER_TOKENS.finditer(stdout):
            seen = True
            sent += _count(m["sent"])
            received += _count(m["received"])
            if m["cost"]:
                cost = (cost or 0.0) + float(m["cost"].replace(",", ""))
        return priced_usage(self.section, sent, received, cost) if seen else None

    def reply(self, ctx: StageContext, result: ProcessResult) -> Reply:
        usage = self._usage(result.stdout)
        return self.answer(answer_of(self._history(ctx)), usage, result)
