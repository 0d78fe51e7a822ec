"""The systemd notify protocol (``sd_notify``) without libsystemd.

One datagram per message to ``$NOTIFY_SOCKET`` (a leading ``@`` names an abstract socket).
Without ``NOTIFY_SOCKET`` every call is a no-op; a failed send is logged once at DEBUG and
never raised, so a missing or restarted manager never stops the service.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ("SystemdNotifier",)

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends ``READY=1``, ``STATUS=…``, ``WATCHDOG=1`` … to the service manager.

    Reads the environment once, at construction; opens its socket at the first send.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self._sock: socket.socket | None = None
        self._logged = False

    @property
    def enabled(self) -> bool:
        """True when a notify socket is configured."""
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines as one datagram; True if it was sent."""
        if self._address is None or not fields:
            return False
        lines = []
        for key, value in fields.items():
            if not key or "=" in key or "\n" in key:
                raise ValueError(f"invalid notify field name {key!r}")
            lines.append(f"{key}={str(value).replace(chr(10), ' ')}")
        return self._send("\n".join(lines).encode(), self._address)

    def ready(self) -> bool:
        """``READY=1``: start-up (and recovery) finished; the service is serving."""
        return self.notify(READY=1)

    def status(self, text: str) -> bool:
        """``STATUS=text``: one line shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def stopping(self) -> bool:
        """``STOPPING=1``: orderly shutdown began."""
        return self.notify(STOPPING=1)

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (required by systemd ≥ 253)."""
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the event loop is alive."""
        return self.notify(WATCHDOG=1)

    def watchdog_interval(self) -> float | None:
        """Seconds between ``watchdog()`` calls: half of ``WATCHDOG_USEC``, or None if unset.

        None as well when ``WATCHDOG_PID`` names another process.
        """
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid:
            try:
                pid = int(self._watchdog_pid)
            except ValueError:
                return None
            if pid != os.getpid():
                return None
        return usec / 2 / 1_000_000

    def close(self) -> None:
        """Close the socket (a later send opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, message: bytes, address: str) -> bool:
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(message, address)
        except OSError as e:
            if not self._logged:
                self._logged = True
                log.debug("sd_notify to %r failed: %s", address, e)
            self.close()
            return False
        return True


def _address(value: str) -> str | None:
    """``@name`` → abstract ``\\0name``; an absolute path as is; anything else → None."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    if value:
        log.debug("NOTIFY_SOCKET=%r is not a unix socket address; notifications disabled", value)
    return None
