"""Notifications: tell a person that an FR needs them or finished (SPEC §10).

Kinds (``[[notify]] kind``):

- ``log``      one INFO line through :mod:`logging`;
- ``desktop``  ``notify-send "opus: FR-1 review" "message"`` when it is on ``PATH``;
- ``webhook``  an HTTP POST to ``url`` (or to the URL in the variable ``url_env`` names:
  a webhook URL is often a secret) with ``headers`` and ``headers_env`` (header → variable):
  ``json`` (the event as an object), ``slack`` (``{"text": …}``) or ``ntfy`` (plain text
  body, ``Title`` header);
- ``command``  runs ``command``, its ``{event}``, ``{fr_id}``, ``{status}``, ``{title}``,
  ``{job_id}`` replaced in each argument, with ``OPUS_EVENT``, ``OPUS_FR_ID``,
  ``OPUS_STATUS``, ``OPUS_MESSAGE`` (also ``OPUS_TITLE``, ``OPUS_JOB_ID``) in its
  environment and the event as JSON on standard input;
- ``apprise``  one of the ~100 services Apprise reaches (Slack, ntfy, Matrix, Telegram,
  e-mail…), its Apprise URL in ``url_env`` (or ``url``); the package is imported lazily.

Every field is redacted before it leaves. A notifier that fails (exception, non-2xx answer,
timeout, non-zero exit) is logged as one WARNING; :meth:`Notifier.send` never raises.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from email.header import Header
from typing import IO
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import httpx

from .config import NotifySection
from .redact import Redactor

logger = logging.getLogger(__name__)

#: Variables of opus's own environment a notifier command must not inherit.
_DROP_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


class NotifyFailed(Exception):
    """One notifier could not deliver (internal: logged, never raised by ``send``)."""


class Notifier:
    """Sends events to every ``[[notify]]`` entry whose ``events`` list them."""

    def __init__(
        self,
        sections: Sequence[NotifySection],
        redactor: Redactor | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.sections = list(sections)
        self.redactor = redactor or Redactor()
        self._transport = transport
        self._environ = environ

    async def send(
        self,
        event: str,
        *,
        fr_id: str,
        title: str,
        status: str,
        message: str,
        job_id: str | None = None,
        details: Mapping[str, str] | None = None,
    ) -> None:
        """Deliver one event to every notifier that wants it; failures are only logged."""
        r = self.redactor
        payload: dict[str, object] = {
            "event": event,
            "fr_id": r(fr_id),
            "title": r(title),
            "status": r(status),
            "message": r(message),
            "job_id": job_id,
            "details": {k: r(str(v)) for k, v in (details or {}).items()},
        }
        targets = [s for s in self.sections if event in s.events]
        if not targets:
            return
        async with anyio.create_task_group() as tg:
            for section in targets:
                tg.start_soon(self._deliver, section, payload)

    async def _deliver(self, section: NotifySection, payload: dict[str, object]) -> None:
        try:
            with anyio.fail_after(section.timeout):
                if section.kind == "log":
                    self._log(payload)
                elif section.kind == "desktop":
                    await self._desktop(section, payload)
                elif section.kind == "webhook":
                    await self._webhook(section, payload)
                elif section.kind == "apprise":
                    await self._apprise(section, payload)
                else:
                    await self._command(section, payload)
        except TimeoutError:
            self._warn(section, payload, f"timed out after {section.timeout:g} s")
        except Exception as e:
            self._warn(section, payload, f"{type(e).__name__}: {e}")

    def _warn(self, section: NotifySection, payload: Mapping[str, object], problem: str) -> None:
        logger.warning(
            "notifier %s (%s) failed for %s %s: %s",
            section.kind,
            _target(section),
            payload["event"],
            payload["fr_id"],
            self.redactor(problem),
        )

    @staticmethod
    def _log(p: Mapping[str, object]) -> None:
        bad = p["event"] in ("failed", "blocked", "stuck", "budget")  # SPEC §20: not info
        logger.log(
            logging.WARNING if bad else logging.INFO,
            "%s: %s %s [%s] %s",
            p["event"], p["fr_id"], p["title"], p["status"], p["message"],
        )  # fmt: skip

    async def _desktop(self, section: NotifySection, p: Mapping[str, object]) -> None:
        env = self._env()
        exe = shutil.which("notify-send", path=env.get("PATH"))
        if exe is None:
            raise NotifyFailed("`notify-send` not found on PATH (install libnotify-bin)")
        summary = f"opus: {p['fr_id']} {p['event']}"
        body = str(p["message"] or p["title"])
        await _run([exe, summary, body], env=env, stdin=b"")

    def _url(self, section: NotifySection) -> str:
        if section.url_env:
            url = self._env().get(section.url_env)
            if not url:
                raise NotifyFailed(f"${section.url_env} is not set")
            return url
        assert section.url is not None
        return section.url

    def _headers(self, section: NotifySection) -> dict[str, str]:
        env = self._env()
        headers = dict(section.headers)
        for name, var in section.headers_env.items():
            value = env.get(var)
            if not value:
                raise NotifyFailed(f"headers_env.{name}: ${var} is not set")
            headers[name] = value
        return headers

    async def _webhook(self, section: NotifySection, p: Mapping[str, object]) -> None:
        url, headers = self._url(section), self._headers(section)
        async with httpx.AsyncClient(
            transport=self._transport, timeout=section.timeout, headers=headers
        ) as client:
            if section.format == "json":
                response = await client.post(url, json=dict(p))
            elif section.format == "slack":
                response = await client.post(url, json={"text": _line(p)})
            else:
                title = f"opus: {p['fr_id']} {p['event']}: {p['title']}"
                response = await client.post(
                    url,
                    content=str(p["message"] or p["title"]).encode(),
                    headers={"Title": _header(title), "Content-Type": "text/plain; charset=utf-8"},
                )
        if not response.is_success:
            raise NotifyFailed(f"HTTP {response.status_code}: {response.text[:200]}")

    async def _apprise(self, section: NotifySection, p: Mapping[str, object]) -> None:
        url = self._url(section)
        title = f"opus: {p['fr_id']} {p['event']}: {p['title']}"
        body = str(p["message"] or p["title"])
        ok = await anyio.to_thread.run_sync(_apprise_send, url, title, body)
        if not ok:
            raise NotifyFailed("apprise could not deliver (see its log lines above)")

    async def _command(self, section: NotifySection, p: Mapping[str, object]) -> None:
        assert section.command is not None
        argv = shlex.split(section.command) if isinstance(section.command, str) else section.command
        values = {k: str(p[k] or "") for k in ("event", "fr_id", "status", "title", "job_id")}
        argv = [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in argv]
        env = {k: v for k, v in self._env().items() if k not in _DROP_ENV}
        env.update(
            OPUS_EVENT=str(p["event"]),
            OPUS_FR_ID=str(p["fr_id"]),
            OPUS_TITLE=str(p["title"]),
            OPUS_STATUS=str(p["status"]),
            OPUS_MESSAGE=str(p["message"]),
            OPUS_JOB_ID=str(p["job_id"] or ""),
        )
        data = json.dumps(dict(p), ensure_ascii=False).encode()
        await _run(list(argv), env=env, stdin=data)

    def _env(self) -> dict[str, str]:
        return dict(os.environ if self._environ is None else self._environ)


_PLACEHOLDER = re.compile(r"\{(event|fr_id|status|title|job_id)\}")


def _apprise_send(url: str, title: str, body: str) -> bool:
    """One notification through Apprise (imported here: most installs never need it)."""
    import apprise

    sender = apprise.Apprise()
    if not sender.add(url):
        raise NotifyFailed("apprise does not understand the URL in url_env")
    return bool(sender.notify(title=title, body=body))


def _line(p: Mapping[str, object]) -> str:
    text = f"opus: {p['fr_id']} {p['title']} — {p['event']} ({p['status']})"
    return f"{text}: {p['message']}" if p["message"] else text


def _header(value: str) -> str:
    """An HTTP header value: ASCII as is, else RFC 2047 (ntfy decodes it)."""
    value = " ".join(value.split())
    if value.isascii():
        return value
    return Header(value, "utf-8").encode(maxlinelen=10_000)


def _target(section: NotifySection) -> str:
    """What a warning may name: a webhook's host only (its path is often a secret)."""
    if section.kind in ("webhook", "apprise") and section.url_env:
        return f"${section.url_env}"
    if section.kind == "webhook" and section.url:
        return urlsplit(section.url).netloc or "?"
    if section.kind == "apprise" and section.url:
        return urlsplit(section.url).scheme or "?"
    if section.kind == "command" and section.command:
        cmd = section.command
        return (shlex.split(cmd) if isinstance(cmd, str) else cmd or ["?"])[0]
    return section.kind


async def _run(argv: list[str], *, env: Mapping[str, str], stdin: bytes) -> None:
    """Run a notifier program in its own process group; on cancel or timeout, kill the group."""
    with tempfile.TemporaryFile() as stdin_file, tempfile.TemporaryFile() as stderr_file:
        await anyio.to_thread.run_sync(_fill, stdin_file, stdin)
        process = await anyio.open_process(
            argv,
            stdin=stdin_file,
            stdout=subprocess.DEVNULL,
            stderr=stderr_file,
            env=dict(env),
            start_new_session=True,
        )
        try:
            returncode = await process.wait()
        finally:
            with anyio.CancelScope(shield=True):
                _kill_group(process.pid)
                if process.returncode is None:
                    await process.wait()
        if returncode != 0:
            err = await anyio.to_thread.run_sync(_read_tail, stderr_file)
            raise NotifyFailed(f"{argv[0]} exited {returncode}: {err}".strip())


def _fill(f: IO[bytes], data: bytes) -> None:
    f.write(data)
    f.flush()
    f.seek(0)


def _read_tail(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read()[-500:].decode("utf-8", errors="replace")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
