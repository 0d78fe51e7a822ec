"""Keep secret values out of everything opus writes."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

MASK = "***"


class Redactor:
    """Replaces every known secret value (at least 4 characters long) with ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._pattern: re.Pattern[str] | None = None
        self._bytes: re.Pattern[bytes] | None = None
        self.longest = 0
        """Length in bytes of the longest secret (0 when there is none)."""
        self.update(secrets)

    def update(self, secrets: Iterable[str]) -> None:
        values = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(v) for v in values)) if values else None
        self._bytes = (
            re.compile(b"|".join(re.escape(v.encode()) for v in values)) if values else None
        )
        self.longest = max((len(v.encode()) for v in values), default=0)

    def safe_cut(self, data: bytes, cut: int) -> int:
        """``cut``, moved back to the start of any secret it would split in two."""
        if self._bytes is not None:
            for match in self._bytes.finditer(data):
                if match.start() < cut < match.end():
                    return match.start()
        return cut

    def __call__(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(MASK, text)

    def __bool__(self) -> bool:
        return self._pattern is not None


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the rendered message of every record."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        if self.redactor:
            record.msg = self.redactor(record.getMessage())
            record.args = None
        return True
